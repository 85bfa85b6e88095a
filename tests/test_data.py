"""Tests of the prompt source and the per-process group layout of a step."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from dgpo.train.data import GroupLayout, LayoutError, PromptSource

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- GroupLayout


def _layout_error(**kwargs) -> str:
    with pytest.raises(LayoutError) as info:
        GroupLayout(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "world_size, micro_batch, group_size",
    [(1, 3, 4), (2, 3, 4), (4, 1, 3), (1, 5, 2), (2, 5, 4)],
)
def test_layout_rejects_micro_steps_that_split_groups(world_size, micro_batch, group_size):
    message = _layout_error(group_size=group_size, groups_per_step=12, micro_batch=micro_batch, world_size=world_size)
    assert f"micro_batch {micro_batch}" in message
    assert f"= {world_size * micro_batch} images" in message
    assert f"groups of {group_size}" in message
    assert "multiple of group_size" in message


@pytest.mark.parametrize(
    "world_size, micro_batch, group_size, groups_per_step",
    [(1, 8, 4, 3), (2, 4, 4, 3), (4, 6, 4, 4), (2, 12, 4, 4)],
)
def test_layout_rejects_steps_that_are_not_whole_micro_steps(world_size, micro_batch, group_size, groups_per_step):
    per_micro = world_size * micro_batch // group_size
    assert groups_per_step % per_micro  # the case is invalid
    message = _layout_error(
        group_size=group_size, groups_per_step=groups_per_step, micro_batch=micro_batch, world_size=world_size
    )
    assert f"groups_per_step {groups_per_step}" in message
    assert f"{per_micro} groups" in message


def _valid_layouts():
    out = []
    for world_size in (1, 2, 4):
        for group_size in (2, 3, 4, 6, 12):
            for groups_per_micro in (1, 2, 3):
                if (groups_per_micro * group_size) % world_size:
                    continue
                micro_batch = groups_per_micro * group_size // world_size
                for micro_steps in (1, 2, 3):
                    out.append((world_size, group_size, micro_batch, groups_per_micro * micro_steps))
    return out


VALID = _valid_layouts()


def _all_ranks(world_size, group_size, micro_batch, groups_per_step):
    return [GroupLayout(group_size, groups_per_step, micro_batch, world_size, rank) for rank in range(world_size)]


@pytest.mark.parametrize("world_size, group_size, micro_batch, groups_per_step", VALID)
def test_layout_covers_every_sample_once_with_whole_groups(world_size, group_size, micro_batch, groups_per_step):
    layouts = _all_ranks(world_size, group_size, micro_batch, groups_per_step)
    first = layouts[0]
    total = group_size * groups_per_step
    assert first.samples_per_step == total

    counts = Counter(n for layout in layouts for micro in layout.local_samples() for n in micro)
    assert counts == Counter(range(total)), "every sample of the step exactly once"

    per_rank = [layout.local_samples() for layout in layouts]
    assert all(len(micros) == first.micro_steps for micros in per_rank)
    for micros in per_rank:
        for micro in micros:
            assert len(micro) == micro_batch
            assert micro == list(range(micro[0], micro[0] + micro_batch)), "a contiguous slice per process"

    for m in range(first.micro_steps):
        union = {n for micros in per_rank for n in micros[m]}
        assert len(union) == world_size * micro_batch
        for group in {n // group_size for n in union}:
            assert set(range(group * group_size, (group + 1) * group_size)) <= union, (
                f"micro-step {m} holds only part of group {group}"
            )


@pytest.mark.parametrize(
    "group_size, micro_batch, groups_per_step", [(2, 1, 4), (4, 2, 4), (4, 6, 6), (12, 12, 8), (3, 3, 6)]
)
def test_two_processes_match_one_process_with_double_micro_batch(group_size, micro_batch, groups_per_step):
    one = GroupLayout(group_size, groups_per_step, 2 * micro_batch, world_size=1).local_samples()
    two = [GroupLayout(group_size, groups_per_step, micro_batch, 2, rank).local_samples() for rank in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1])
    for m, micro in enumerate(one):
        assert sorted(two[0][m] + two[1][m]) == sorted(micro)


# ----------------------------------------------------------------------------- PromptSource


def test_shapes_sources_are_nonempty_and_disjoint():
    train = PromptSource.load("shapes:train")
    test = PromptSource.load("shapes:test")
    assert train.prompts and test.prompts
    assert train.name == "shapes:train" and test.name == "shapes:test"
    assert not {p.text for p in train.prompts} & {p.text for p in test.prompts}
    for p in train.prompts[:5] + test.prompts[:5]:
        assert p.metadata["objects"] and p.metadata["category"]


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "no_such_prompts.txt"
    with pytest.raises(FileNotFoundError, match="no_such_prompts.txt"):
        PromptSource.load(str(path))


@pytest.mark.parametrize("content", ["", "\n\n   \n\t\n"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_empty_file_is_an_error(tmp_path, content, suffix):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match="empty") as info:
        PromptSource.load(str(path))
    assert str(path) in str(info.value)


def test_text_file_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n  two squares  \nthree crosses\n")
    source = PromptSource.load(str(path))
    assert [p.text for p in source.prompts] == ["a red circle", "two squares", "three crosses"]
    assert all(p.metadata == {} for p in source.prompts)


def test_jsonl_file_with_metadata(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "a red circle", "metadata": {"category": "colors"}}, {"prompt": "a square"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    source = PromptSource.load(str(path))
    assert [p.text for p in source.prompts] == ["a red circle", "a square"]
    assert source.prompts[0].metadata == {"category": "colors"}
    assert source.prompts[1].metadata == {}


BAD_LINES = [
    "not json at all",
    '{"text": "no prompt field"}',
    "[1, 2]",
    '"just a string"',
    "42",
    '{"prompt": "x", "metadata": [1, 2]}',
    '{"prompt": "x", "metadata": "ab"}',
    '{"prompt": null}',
]


@pytest.mark.parametrize("bad", BAD_LINES)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + bad + '\n{"prompt": "also fine"}\n')
    with pytest.raises(ValueError) as info:
        PromptSource.load(str(path))
    assert f"{path}:3" in str(info.value)


def _numbered_source(tmp_path, n: int) -> PromptSource:
    path = tmp_path / "numbered.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(n)))
    return PromptSource.load(str(path))


def test_for_step_is_deterministic_in_seed_and_step(tmp_path):
    source = _numbered_source(tmp_path, 37)
    first = [p.text for p in source.for_step(seed=3, step=5, count=8)]
    source.for_step(seed=3, step=2, count=8)  # no hidden state between calls
    assert [p.text for p in source.for_step(seed=3, step=5, count=8)] == first
    fresh = _numbered_source(tmp_path, 37)
    assert [p.text for p in fresh.for_step(seed=3, step=5, count=8)] == first
    assert [p.text for p in source.for_step(seed=3, step=6, count=8)] != first


def test_for_step_differs_between_seeds():
    source = PromptSource.load("shapes:train")
    a = [p.text for p in source.for_step(seed=0, step=0, count=16)]
    b = [p.text for p in source.for_step(seed=1, step=0, count=16)]
    assert a != b


@pytest.mark.parametrize("n, count", [(10, 5), (10, 3), (37, 8), (5, 12)])
def test_for_step_covers_every_prompt_once_per_epoch(tmp_path, n, count):
    source = _numbered_source(tmp_path, n)
    steps = -(-2 * n // count)  # enough steps for two whole epochs
    drawn = [p.text for step in range(steps) for p in source.for_step(seed=7, step=step, count=count)]
    everything = sorted(p.text for p in source.prompts)
    assert sorted(drawn[:n]) == everything, "epoch 0 is a permutation of the prompts"
    assert sorted(drawn[n : 2 * n]) == everything, "epoch 1 is a permutation of the prompts"
    assert drawn[:n] != everything or drawn[n : 2 * n] != everything, "the order is shuffled"


def test_shapes_train_draws_every_category_equally_and_holds_every_prompt():
    from dgpo.shapes.prompts import train_specs

    source = PromptSource.load("shapes:train")
    per_category = Counter(p.metadata["category"] for p in source.prompts)
    assert len(set(per_category.values())) == 1 and len(per_category) >= 5
    assert {p.text for p in source.prompts} == {s.prompt for s in train_specs()}
    n = len(source.prompts)
    drawn = [p.metadata["category"] for step in range(n // 10) for p in source.for_step(seed=0, step=step, count=10)]
    assert Counter(drawn) == per_category, "one epoch draws every category equally"


def test_for_step_covers_shapes_train_once_per_epoch():
    source = PromptSource.load("shapes:train")
    n, count = len(source.prompts), 64
    drawn = [p.text for step in range(-(-n // count)) for p in source.for_step(seed=0, step=step, count=count)][:n]
    assert Counter(drawn) == Counter(p.text for p in source.prompts)


def test_for_step_is_a_slice_of_one_stream(tmp_path):
    # a step's draw depends only on its positions: two half-size steps equal one full step
    source = _numbered_source(tmp_path, 11)
    whole = source.for_step(seed=2, step=1, count=6)
    halves = source.for_step(seed=2, step=2, count=3) + source.for_step(seed=2, step=3, count=3)
    assert whole == halves


@pytest.mark.parametrize("recipe", ["sd35m/geneval", "sd35m/ocr", "sd35m/pickscore", "flux/geneval", "sana/geneval"])
def test_gpu_recipes_keep_the_global_batch_on_1_to_8_processes_and_refuse_32(recipe):
    from dgpo.train.config import load_config

    config = load_config(REPO / "configs" / f"{recipe}.yaml")
    d = config.data
    for processes in (1, 2, 4, 8):
        layouts = [GroupLayout(d.group_size, d.groups_per_step, d.micro_batch, processes, rank) for rank in range(processes)]
        samples = sorted(i for layout in layouts for micro in layout.local_samples() for i in micro)
        assert samples == list(range(d.group_size * d.groups_per_step))
    with pytest.raises(LayoutError):
        GroupLayout(d.group_size, d.groups_per_step, d.micro_batch, 32, 0)


SHAPES_RECIPES = sorted([*(REPO / "configs" / "shapes").glob("*.yaml"), *(REPO / "benchmarks" / "shapes_sweep").glob("*.yaml")])


@pytest.mark.parametrize("recipe", SHAPES_RECIPES, ids=lambda p: p.stem)
def test_shapes_recipes_and_sweep_variants_load_with_a_valid_layout(recipe):
    from dgpo.train.config import load_config

    d = load_config(recipe).data
    samples = sorted(i for micro in GroupLayout(d.group_size, d.groups_per_step, d.micro_batch).local_samples() for i in micro)
    assert samples == list(range(d.group_size * d.groups_per_step))


def test_the_prompt_file_format_is_read_from_its_content_not_its_name(tmp_path):
    rows = [{"prompt": "a red circle", "metadata": {"category": "colors"}}, {"prompt": "a square"}]
    jsonl_named_json = tmp_path / "prompts.json"
    jsonl_named_json.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    listed = tmp_path / "list.txt"
    listed.write_text(json.dumps(["a red circle", {"prompt": "a square", "metadata": {"n": 1}}], indent=2))
    for path in (jsonl_named_json, listed):
        assert [p.text for p in PromptSource.load(str(path)).prompts] == ["a red circle", "a square"]
    assert PromptSource.load(str(jsonl_named_json)).prompts[0].metadata == {"category": "colors"}
    text_named_jsonl = tmp_path / "prompts.jsonl"
    text_named_jsonl.write_text("a red circle\n")
    with pytest.raises(ValueError, match="named .jsonl but holds no JSON"):
        PromptSource.load(str(text_named_jsonl))
    listed.write_text('["a red circle",')
    with pytest.raises(ValueError, match="not a JSON list"):
        PromptSource.load(str(listed))
