"""The optimizer named by ``optim.optimizer``: torch's AdamW, or bitsandbytes' 8-bit AdamW where installed."""
from __future__ import annotations

import torch

from ..errors import UserError

OPTIMIZERS = ("adamw", "adamw8bit")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class for ``name``; a one-line error naming the install line when bitsandbytes is missing.

    Both take ``(params, lr=, betas=, weight_decay=)``. AdamW8bit keeps the moments of tensors with
    4096+ elements in 8 bits (block-wise quantised, state ``uint8``); smaller tensors keep 32-bit moments.
    """
    if name == "adamw":
        return torch.optim.AdamW
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("optim.optimizer=adamw8bit needs bitsandbytes, which is not installed (pip install bitsandbytes)") from None
    return bitsandbytes.optim.AdamW8bit
