"""Argument checks shared by the functions of :mod:`attention.functional`.

Each check raises :class:`ValueError` naming the argument, its shape or dtype, and what was
expected; none does tensor work beyond reading shapes and dtypes (no host-device sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "broadcasts_to",
    "check_baseline_log_lik",
    "check_mask",
    "check_num_samples",
    "check_scores",
    "shape_of",
]


def shape_of(x: Tensor) -> tuple[int, ...]:
    """``x``'s shape as a plain tuple, the form error messages print."""
    return tuple(x.shape)


def broadcasts_to(src: torch.Size, dst: torch.Size) -> bool:
    """Whether a tensor shaped ``src`` broadcasts to exactly ``dst``."""
    try:
        return torch.broadcast_shapes(src, dst) == dst
    except RuntimeError:
        return False


def check_scores(name: str, x: object, shape: torch.Size | None, dtype: torch.dtype | None
                 ) -> None:
    """Check that ``x`` is a floating tensor ``(..., S)``.

    Without ``shape`` it must have at least one dim and ``S >= 1`` (it defines the shape); with
    ``shape`` (the first argument's, named ``prior_logits`` in the messages) it must broadcast to
    it, and with ``dtype`` it must have that dtype.

    :raises ValueError: naming ``name`` and the shapes or dtypes involved.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    if shape is None:
        if x.dim() < 1 or x.shape[-1] < 1:
            raise ValueError(
                f"{name} has shape {shape_of(x)}; expected (..., S) with at least one source "
                "position S >= 1"
            )
        return
    if dtype is not None and x.dtype != dtype:
        raise ValueError(
            f"{name} has dtype {x.dtype} but prior_logits has {dtype}; convert them to one dtype"
        )
    if not broadcasts_to(x.shape, shape):
        raise ValueError(
            f"{name} has shape {shape_of(x)}, which does not broadcast to prior_logits' shape "
            f"{tuple(shape)} (..., S)"
        )


def check_baseline_log_lik(x: object, shape: torch.Size) -> None:
    """Check that ``x`` is a floating tensor broadcastable to the query shape ``shape[:-1]``.

    :raises ValueError: naming ``baseline_log_lik`` and the shapes.
    """
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        what = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"baseline_log_lik must be a floating tensor, got {what}")
    if not broadcasts_to(x.shape, shape[:-1]):
        raise ValueError(
            f"baseline_log_lik has shape {shape_of(x)}, which does not broadcast to the query "
            f"shape {tuple(shape[:-1])} (prior_logits' shape {tuple(shape)} without S)"
        )


def check_num_samples(num_samples: object) -> None:
    """Check that ``num_samples`` is an int ``>= 1``.

    :raises ValueError: naming the value given.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")


def check_mask(mask: Tensor | None, shape: torch.Size, arg: str = "prior_logits"
               ) -> Tensor | None:
    """Check ``mask`` (bool, ``True`` at real source positions) against the scores ``arg``.

    :return: the mask broadcast to ``shape`` (a view, no copy), or ``None`` without a mask.
    :raises ValueError: if ``mask`` is not a bool tensor or does not broadcast to ``shape``.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        what = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor (True = real source position), got {what}")
    if not broadcasts_to(mask.shape, shape):
        raise ValueError(
            f"mask has shape {shape_of(mask)}, which does not broadcast to {arg}' shape "
            f"{tuple(shape)} (..., S)"
        )
    return mask.expand(shape)
