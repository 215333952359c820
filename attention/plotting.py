"""Alignment heatmaps with matplotlib (an optional dependency: the ``examples`` extra).

:func:`plot_alignments` draws one or more alignment matrices side by side, e.g. the prior
:math:`p(z \\mid x)` and the posterior :math:`p(z \\mid x, y)` of one sentence pair, with the
source words along the x axis and the target words along the y axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["plot_alignments"]


def plot_alignments(matrices: dict[str, torch.Tensor], source: Sequence[str],
                    target: Sequence[str], *, axes: Sequence[Any] | None = None,
                    cmap: str = "Greys") -> Any:
    """Heatmaps of alignment probabilities, one panel per entry of ``matrices``.

    :param matrices: panel title -> ``(len(target), len(source))`` probabilities (rows: target
        positions, columns: source positions); padded positions must be cut off by the caller.
    :param source: the source tokens (x tick labels).
    :param target: the target tokens (y tick labels).
    :param axes: optional matplotlib axes to draw into, one per panel.
    :param cmap: a matplotlib colour map name.
    :return: the matplotlib ``Figure``.
    :raises ImportError: if matplotlib is not installed (``pip install -e ".[examples]"``).
    :raises ValueError: if a matrix does not have shape ``(len(target), len(source))``.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_alignments needs matplotlib: pip install -e '.[examples]' (or pip install "
            "matplotlib)"
        ) from e
    shape = (len(target), len(source))
    for title, m in matrices.items():
        if tuple(m.shape) != shape:
            raise ValueError(f"alignment {title!r} has shape {tuple(m.shape)}; expected "
                             f"(len(target), len(source)) = {shape}")
    if axes is None:
        width = max(3.0, 0.35 * len(source) + 1.5)
        fig, ax_arr = plt.subplots(1, len(matrices), squeeze=False,
                                   figsize=(width * len(matrices), 0.35 * len(target) + 1.5))
        axes = list(ax_arr[0])
    elif len(axes) != len(matrices):
        raise ValueError(f"got {len(axes)} axes for {len(matrices)} alignments")
    fig = axes[0].figure
    for ax, (title, m) in zip(axes, matrices.items(), strict=True):
        ax.imshow(m.detach().float().cpu().numpy(), cmap=cmap, vmin=0.0, vmax=1.0,
                  aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(source)), list(source), rotation=90)
        ax.set_yticks(range(len(target)), list(target))
        ax.set_title(title)
        ax.set_xlabel("source")
        ax.set_ylabel("target")
    fig.tight_layout()
    return fig
