"""ShapesEval's plugin module, declared in pyproject.toml under the ``dgpo.plugins`` entry point group as an outside
package would declare its own; importing it registers all of ShapesEval:

- the ``shapes`` model backend (``dgpo.shapes.model``), through ``dgpo.models.register_backend``;
- the ``shapes`` evaluator, the backend's default (``dgpo.shapes.evaluator``), through ``register_evaluator``;
- the rewards shapes_partial, shapes_strict, shapes_focused (``dgpo.shapes.rewards``), through ``register_reward``;
- the prompt sources ``shapes:train`` and ``shapes:test`` (``dgpo.shapes.sources``), through ``register_prompt_source``;
- the `dgpo pretrain-shapes` command (``dgpo.shapes.commands``), through ``dgpo.commands.register_command``.
"""
from . import commands, evaluator, model, rewards, sources  # noqa: F401
