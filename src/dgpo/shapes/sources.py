"""ShapesEval's prompt sets as registered prompt sources: ``shapes:train`` (categories balanced) and ``shapes:test``."""
from __future__ import annotations

from ..train.data import Prompt, balance_categories, register_prompt_source
from .prompts import test_specs, train_specs


@register_prompt_source("shapes:train")
def shapes_train() -> list[Prompt]:
    return balance_categories([Prompt(s.prompt, s.to_metadata()) for s in train_specs()])


@register_prompt_source("shapes:test")
def shapes_test() -> list[Prompt]:
    return [Prompt(s.prompt, s.to_metadata()) for s in test_specs()]
