"""The screens committed under results/ stay reproducible from the recipes their scripts name: a change to a shared recipe
(configs/shapes/dgpo.yaml, which the screens and the baselines inherit) must not silently change what a committed screen
run trained. Each run's saved config.yaml is compared, field by field, with the recipe its script names loaded under the
same protocol (steps, evaluation, seed and threads taken from the saved run), as `dgpo compare --reuse` compares them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dgpo.train.compare import same_training
from dgpo.train.config import load_config

REPO = Path(__file__).resolve().parent.parent
SCREEN_SETS = {
    "benchmarks/recipe_screens.sh": "results/recipe_screens/runs",
    "benchmarks/recipe_screens_round2.sh": "results/recipe_screens_round2/runs",
    "benchmarks/recipe_screens_round3.sh": "results/recipe_screens_round3/runs",
    "benchmarks/recipe_screens_round4.sh": "results/recipe_screens_round4/runs",
    "benchmarks/comparison_screens.sh": "results/comparison/screens/runs",
    "benchmarks/comparison_arms.sh": "results/compare/runs",
    "benchmarks/comparison_ablations.sh": "results/compare/ablations/runs",
    "benchmarks/comparison_cfg_free.sh": "results/compare/cfg_free/runs",
}
# The fields `dgpo compare` sets for every recipe (its protocol) and the overrides the scripts pass to all of them.
PROTOCOL_FIELDS = ("run.seed", "run.max_steps", "run.max_seconds", "run.max_forward_equivalents", "run.threads", "eval.every",
                   "eval.images_per_category", "eval.final_images_per_category", "eval.guidance_scale")


def script_recipes(script: Path) -> dict[str, Path]:
    """NAME=RECIPE arguments of a screen script, its one-letter folder abbreviations (S=configs/shapes/screens) expanded."""
    text = script.read_text()
    folders = dict(re.findall(r"^([A-Z])=(\S+)$", text, re.M))
    return {name: REPO / re.sub(r"\$([A-Z])\b", lambda abbreviation: folders[abbreviation.group(1)], path)
            for name, path in re.findall(r"^\s+(\w+)=(\S+\.yaml)", text, re.M)}


def committed_runs():
    for script, runs in SCREEN_SETS.items():
        recipes = script_recipes(REPO / script)
        for config in sorted((REPO / runs).glob("*/seed-*/config.yaml")):
            yield pytest.param(config, recipes.get(config.parent.parent.name), id=config.parent.parent.name)


def test_the_scripts_abbreviations_expand_to_their_recipes():
    recipes = script_recipes(REPO / "benchmarks/recipe_screens.sh")
    assert recipes["dgpo"].name == "dgpo_baseline.yaml" and recipes["two_updates"].name == "dgpo_two_updates.yaml"


@pytest.mark.parametrize("script", SCREEN_SETS)
def test_every_recipe_a_script_names_exists(script):
    recipes = script_recipes(REPO / script)
    assert recipes and all(path.is_file() for path in recipes.values()), recipes


@pytest.mark.parametrize("saved_config, recipe", list(committed_runs()))
def test_a_committed_screen_run_is_what_its_recipe_trains(saved_config, recipe):
    assert recipe is not None, f"{saved_config} has no recipe in its screen script"
    saved = yaml.safe_load(saved_config.read_text())
    protocol = [f"{section}.{key}={saved[section][key]}" for section, key in (field.split(".") for field in PROTOCOL_FIELDS)]
    assert same_training(saved, load_config(recipe, protocol).to_dict())
