"""benchmarks/probes/text_features.py on tiny ShapesEval models built here: what each text encoder can and cannot tell apart."""
from __future__ import annotations

import json

import pytest
from helpers import load_benchmark

from dgpo.shapes.model import bidirectional_text_encoder, build_tiny_model


@pytest.fixture(scope="module")
def probe():
    return load_benchmark("probes/text_features")


def test_the_bidirectional_encoder_pools_a_bag_of_words_and_keeps_the_binding_in_the_sequence(probe):
    model = build_tiny_model()
    model.text_encoder = bidirectional_text_encoder(model.tokenizer)
    result = probe.text_feature_differences(model)
    binding = result["colour binding"]
    assert binding["pooled"] == 0.0 and binding["sequence"] > 0.1, "the same words in another order: same bag, other tokens"
    assert result["shape swap"]["pooled"] > 0.1, "the last word is part of the pooled vector"
    left_right = dict(zip(result["left / right"]["tokens"], result["left / right"]["token_differences"]))
    assert left_right["left"] > 0.5 > left_right["circle"] > 0, "the relation token differs most, the shape tokens through their context blocks"
    same = probe.text_feature_differences(model, {"same": ("a red circle", "a red circle")})["same"]
    assert same["sequence"] == same["pooled"] == 0.0 and not any(same["token_differences"])


def test_the_probe_reads_a_saved_model_directory_and_writes_its_json(probe, tmp_path, capsys):
    build_tiny_model().save_pretrained(tmp_path / "tiny")
    report = probe.main(["--model", str(tmp_path / "tiny"), "--tokens", "--output", str(tmp_path / "features.json")])
    assert json.loads((tmp_path / "features.json").read_text()) == report
    assert set(report["pairs"]) == set(probe.PAIRS) and report["command"].startswith("python benchmarks/probes/text_features.py --model")
    assert all(r["sequence"] > 0 and len(r["tokens"]) == len(r["token_differences"]) for r in report["pairs"].values())
    assert "colour binding" in capsys.readouterr().out


def test_the_seen_combinations_probe_splits_every_prompt_of_a_category_as_training_does(tmp_path):
    from dgpo.shapes.prompts import test_specs, train_specs

    probe = load_benchmark("probes/shapes_seen_combinations")
    build_tiny_model().save_pretrained(tmp_path / "tiny")
    args = ["--model", str(tmp_path / "tiny"), "--category", "counting", "--category", "position", "--images-per-prompt", "2",
            "--threads", "1", "--output", str(tmp_path / "combos.json")]
    report = probe.main(args)
    assert json.loads((tmp_path / "combos.json").read_text()) == report
    for category, rates in report["models"]["base"].items():
        splits = {"train": {s.prompt for s in train_specs() if s.category == category}, "test": {s.prompt for s in test_specs() if s.category == category}}
        assert {p for p, row in rates["prompts"].items() if row["split"] == "train"} == splits["train"]
        assert {p for p, row in rates["prompts"].items() if row["split"] == "test"} == splits["test"]
        assert all(row["pass"] in (0.0, 0.5, 1.0) for row in rates["prompts"].values()), "two images a prompt"
        assert rates["test_mean"] == pytest.approx(sum(rates["prompts"][p]["pass"] for p in splits["test"]) / len(splits["test"]))
    # The images are keyed by prompt and index: the same model measures the same.
    assert probe.main(args) == report
