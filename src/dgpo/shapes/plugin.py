"""ShapesEval's registry hook (listed in ``dgpo.registry.PLUGINS``): registers its evaluator and prompt sources.

Its model adapter registers as the ``shapes`` backend in ``dgpo.models`` and its rewards
(shapes_partial, shapes_strict, shapes_focused) in ``dgpo.rewards``."""
from . import evaluator, sources  # noqa: F401
