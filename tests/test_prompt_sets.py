"""The paper recipes' prompt sets: every recipe's prompt files exist or are written by `dgpo prompts fetch`; fetching
checks, converts and keeps training prompts out of the test set (on small files made here, no download); and a
reward reported per category (GenEval per tag) prints its benchmark's table in `dgpo eval`."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dgpo.cli import main
from dgpo.errors import UserError
from dgpo.prompt_catalog import PROMPT_SETS, PromptSet, fetch_prompt_sets, git_blob_hash, select
from dgpo.prompt_set import set_scores
from dgpo.rewards import REWARD_CATEGORIES, REWARDS, RewardCategories, category_means, register_categories, register_reward
from dgpo.rewards.geneval import Detection, is_geneval_metadata, judge, select_detections
from dgpo.train.config import load_config
from dgpo.train.data import PROMPT_SOURCES, PromptSource

ROOT = Path(__file__).resolve().parent.parent
PROMPT_FIELDS = ("data.prompts", "eval.prompts", "eval.ood_prompts")
TEMPLATES = ("configs/your-model/",)  # recipes whose prompt files are the user's own, named as placeholders
NOT_RECIPES = ("configs/accelerate/",)  # accelerate's launch configs


def recipes() -> list[Path]:
    return [p for p in sorted(ROOT.glob("configs/**/*.yaml")) if not str(p.relative_to(ROOT)).startswith(NOT_RECIPES)]


@pytest.mark.parametrize("recipe", recipes(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_names_prompt_files_in_the_repository_or_fetched_into_it(recipe):
    config = load_config(recipe)
    fetched = {f"prompts/{s.file}" for s in PROMPT_SETS}
    for field in PROMPT_FIELDS:
        section, name = field.split(".")
        spec = getattr(getattr(config, section), name)
        if not spec or spec in PROMPT_SOURCES or str(recipe.relative_to(ROOT)).startswith(TEMPLATES):
            continue
        assert not Path(spec).is_absolute() and ".." not in Path(spec).parts, f"{recipe}: {field}={spec} points outside the repository"
        assert (ROOT / spec).is_file() or spec in fetched, f"{recipe}: {field}={spec} is neither in the repository nor a `dgpo prompts fetch` set"


def test_the_fetched_files_are_ignored_by_git_and_the_paper_recipes_train_and_evaluate_on_them():
    ignored = [line.lstrip("/") for line in (ROOT / "prompts/.gitignore").read_text().splitlines() if line and not line.startswith("#")]
    assert sorted(ignored) == sorted(s.file for s in PROMPT_SETS)
    for benchmark in ("geneval", "ocr", "pickscore"):
        config = load_config(ROOT / f"configs/sd35m/{benchmark}.yaml")
        assert (config.data.prompts, config.eval.prompts) == (f"prompts/{benchmark}_train.jsonl", f"prompts/{benchmark}_test.jsonl")
        train = next(s for s in PROMPT_SETS if s.file == f"{benchmark}_train.jsonl")
        assert train.held_out == f"{benchmark}_test.jsonl"


def test_git_blob_hash_is_gits_object_name(tmp_path):
    data = "a photo of a cat\nnaïve ünïcode\n".encode()
    (tmp_path / "f").write_bytes(data)
    expected = subprocess.run(["git", "hash-object", str(tmp_path / "f")], capture_output=True, text=True, check=True).stdout.strip()
    assert git_blob_hash(data) == expected


GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}], "prompt": "a photo of two dogs"},
]


def made_up_sets(files: dict[str, bytes], **counts) -> tuple[list[PromptSet], dict[str, bytes]]:
    """Prompt sets for files made in the test, served by URL from memory: (sets, url -> content)."""
    converters = {"geneval_test": "geneval", "geneval_train": "geneval"}
    sets = [PromptSet(f"{name}.jsonl", "someone/prompts", "0" * 40, f"data/{name}", git_blob_hash(data), converters.get(name, "lines"),
                      "MIT", counts.get(name), held_out=f"{name.split('_')[0]}_test.jsonl" if name.endswith("_train") else "")
            for name, data in files.items()]
    return sets, {s.url: files[s.file.removesuffix(".jsonl")] for s in sets}


def test_fetch_converts_each_set_into_prompt_files_dgpos_loader_reads(tmp_path):
    files = {
        "geneval_test": "".join(json.dumps(line) + "\n" for line in GENEVAL_LINES).encode(),
        "geneval_train": (json.dumps({"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a photo of a red cup"})
                          + "\n").encode(),
        # A user's prompt may start with '{' or '[': it stays a prompt, not JSON.
        "pickscore_test": b'{curly} braces first, "quoted" words\n\n  [a] painting of a fox  \n',
    }
    sets, served = made_up_sets(files, geneval_test=2, pickscore_test=2)
    counts = fetch_prompt_sets(sets, tmp_path / "prompts", fetch=served.__getitem__, log=lambda line: None)
    assert counts == {"geneval_test.jsonl": 2, "geneval_train.jsonl": 1, "pickscore_test.jsonl": 2}
    geneval = PromptSource.load(str(tmp_path / "prompts/geneval_test.jsonl")).prompts
    assert [p.text for p in geneval] == ["a photo of a cat", "a photo of two dogs"]
    assert [p.metadata for p in geneval] == GENEVAL_LINES and all(is_geneval_metadata(p.metadata) for p in geneval)
    pickscore = PromptSource.load(str(tmp_path / "prompts/pickscore_test.jsonl")).prompts
    assert [(p.text, p.metadata) for p in pickscore] == [('{curly} braces first, "quoted" words', {}), ("[a] painting of a fox", {})]


@pytest.mark.parametrize("problem, message", [
    ("overlap", "1 training prompts are in ocr_test.jsonl, e.g. 'the word \"hi\" on a sign'"),
    ("blob", "downloaded content has git blob"),
    ("count", "2 prompts, expected 3"),
])
def test_fetch_refuses_a_leaking_training_set_or_a_file_other_than_the_one_described_and_writes_nothing(tmp_path, problem, message):
    files = {"ocr_test": b'the word "hi" on a sign\na sign reading "no"\n', "ocr_train": b'a cup saying "yes"\nthe word "hi" on a sign\n'}
    if problem != "overlap":
        files["ocr_train"] = b'a cup saying "yes"\n'
    sets, served = made_up_sets(files, ocr_test=3 if problem == "count" else 2)
    if problem == "blob":
        served[sets[1].url] += b"one more prompt\n"
    with pytest.raises(UserError, match=re.escape(message)):
        fetch_prompt_sets(sets, tmp_path / "prompts", fetch=served.__getitem__, log=lambda line: None)
    assert not (tmp_path / "prompts").exists()


def test_a_training_set_is_fetched_with_its_test_set_and_unknown_names_are_one_line_errors(capsys):
    assert [s.file for s in select(["pickscore_train"])] == ["pickscore_test.jsonl", "pickscore_train.jsonl"]
    assert [s.file for s in select(["ocr_test.jsonl"])] == ["ocr_test.jsonl"]
    assert select([]) == list(PROMPT_SETS)
    assert main(["prompts", "fetch", "gneval"]) == 2
    assert capsys.readouterr().err.strip().startswith("dgpo: error: unknown prompt set gneval; available: geneval_test.jsonl")
    assert main(["prompts", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [s.file for s in PROMPT_SETS]


def test_a_recipe_whose_prompt_set_is_not_fetched_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape("prompt file not found: prompts/ocr_train.jsonl (a paper prompt set, not shipped: "
                                                          "`dgpo prompts fetch ocr` from the repository root")):
        PromptSource.load(load_config(ROOT / "configs/sd35m/ocr.yaml").data.prompts)
    with pytest.raises(FileNotFoundError, match="prompt file not found: mine.txt \\(or use a registered prompt source: shapes:test"):
        PromptSource.load("mine.txt")


# ----------------------------------------------------------------------------- per-category reporting

CATEGORY_FAKE = "test_geneval_fake_detector"
PASSING_TAGS = {"single_object", "colors"}  # the fake detector finds the objects of these prompts and nothing for the others


def fake_detections(metadata: dict) -> list[Detection]:
    """What the prompt asks for, side by side, in the asked colour: GenEval's decision layer passes it."""
    if metadata["tag"] not in PASSING_TAGS:
        return []
    found, left = [], 0.0
    for requirement in metadata["include"]:
        for _ in range(int(requirement["count"])):
            found.append(Detection(requirement["class"], 0.95, (left, 0.0, left + 10.0, 10.0), color=requirement.get("color")))
            left += 20.0
    return found


def fake_geneval(strict: bool = False):
    """GenEval's pass/fail (or partial credit) on fake detections, the colour taken as asked."""
    def reward(images, prompts, metadata):
        verdicts = [judge(select_detections(fake_detections(m), m["tag"]), m) for m in metadata]
        return [float(v.correct) if strict else v.partial for v in verdicts]

    return reward


@pytest.fixture
def fake_geneval_reward():
    register_reward(CATEGORY_FAKE)(fake_geneval)
    register_categories(CATEGORY_FAKE, REWARD_CATEGORIES.get("geneval"))
    yield CATEGORY_FAKE
    REWARDS.unregister(CATEGORY_FAKE)
    REWARD_CATEGORIES.unregister(CATEGORY_FAKE)


def geneval_line(text: str, tag: str, **requirement) -> dict:
    """A prompt line with GenEval metadata; the text is in the tiny ShapesEval model's vocabulary, the reward reads the metadata."""
    return {"prompt": text, "metadata": {"tag": tag, "include": [{"count": 1, **requirement}]}}


def test_dgpo_eval_prints_genevals_per_category_table_with_its_overall(fake_geneval_reward, tiny_model_dir, tmp_path, capsys):
    # Three single-object prompts pass, one counting and one colour-attribution prompt fail, one colours prompt passes:
    # GenEval's overall, the mean over the four categories, is 0.5; the mean over the six prompts would be 0.667.
    rows = [geneval_line(f"a {colour} circle", "single_object", **{"class": name}) for colour, name in (("red", "cat"), ("blue", "dog"), ("green", "cup"))]
    rows += [geneval_line("a red square", "counting", **{"class": "cat", "count": 2}),
             geneval_line("a blue square", "color_attr", **{"class": "cup", "color": "red"}),
             geneval_line("a green square", "colors", **{"class": "bench", "color": "green"})]
    prompts = tmp_path / "geneval_test.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "eval.json"
    assert main(["eval", "--backend", "shapes", "--model", str(tiny_model_dir), "--evaluator", "prompts", "--prompts", str(prompts),
                 "--metrics", fake_geneval_reward, "--reward-option", f"{fake_geneval_reward}.strict=true", "--images-per-category", "12",
                 "--steps", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"| reward | overall | single | counting | colors | color attribution |\n| --- | --- | --- | --- | --- | --- |\n" \
           f"| {fake_geneval_reward} | 0.500 | 1.000 | 0.000 | 1.000 | 0.000 |" in printed
    result = json.loads(out.read_text())
    assert result["categories"] == {fake_geneval_reward: {"single": 1.0, "counting": 0.0, "colors": 1.0, "color attribution": 0.0}}
    assert result["rewards"][fake_geneval_reward] == result["overall"] == 0.5

    assert main(["eval", "--backend", "shapes", "--model", str(tiny_model_dir), "--evaluator", "prompts", "--prompts", str(prompts),
                 "--metrics", fake_geneval_reward, "--reward-option", "geneval.strict=true"]) == 2
    assert f"dgpo: error: --reward-option geneval.strict: geneval is not one of --metrics ({fake_geneval_reward})" in capsys.readouterr().err


def test_categories_follow_the_declared_order_then_the_order_they_appear_in():
    categories = RewardCategories("tag", {"b": "bee", "a": "ay"})
    scores = np.array([1.0, 0.0, 0.0, 1.0, 0.5])
    assert category_means(scores, [{"tag": t} for t in "acabz"], categories) == {"bee": 1.0, "ay": 0.5, "c": 0.0, "z": 0.5}
    assert category_means(scores, [{"tag": "a"}] * 4 + [{}], categories) is None


def test_a_set_whose_metadata_lacks_a_category_is_scored_per_image(fake_geneval_reward):
    scores = {fake_geneval_reward: np.array([1.0, 1.0, 1.0, 0.0]), "brightness": np.array([0.5, 0.5, 0.5, 0.5])}
    weights = {fake_geneval_reward: 1.0, "brightness": 2.0}
    tags = [{"tag": "single_object"}] * 3 + [{"tag": "counting"}]
    means, categories, overall = set_scores(scores, weights, tags)
    assert categories == {fake_geneval_reward: {"single": 1.0, "counting": 0.0}} and "brightness" not in categories
    assert means == {fake_geneval_reward: 0.5, "brightness": 0.5} and overall == pytest.approx(1.5)
    means, categories, overall = set_scores({**scores, "brightness": np.full(4, np.nan)}, weights, tags)
    assert np.isnan(means["brightness"]) and overall == pytest.approx(0.5)  # a reward applicable to no image is skipped
    means, categories, overall = set_scores(scores, weights, tags[:3] + [{}])
    assert categories == {} and means == {fake_geneval_reward: 0.75, "brightness": 0.5} and overall == pytest.approx(1.75)
