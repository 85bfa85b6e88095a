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
