"""The alignment heatmap helper draws what it is given."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from attention.plotting import plot_alignments

matplotlib.use("Agg")


def test_heatmaps_show_the_matrices_and_tokens() -> None:
    src, tgt = ["ein", "Hund", "bellt", "."], ["a", "dog", "barks"]
    prior = torch.softmax(torch.randn(3, 4), -1)
    post = torch.eye(3, 4)
    fig = plot_alignments({"prior": prior, "posterior": post}, src, tgt)
    a, b = fig.axes
    assert [t.get_text() for t in a.get_xticklabels()] == src
    assert [t.get_text() for t in b.get_yticklabels()] == tgt
    assert a.get_title() == "prior" and b.get_title() == "posterior"
    shown = b.images[0].get_array()
    assert shown.shape == (3, 4) and float(shown[1, 1]) == 1.0 and float(shown[1, 0]) == 0.0
    torch.testing.assert_close(torch.as_tensor(a.images[0].get_array().data),
                               prior.float(), rtol=0, atol=0)
    fig.canvas.draw()  # renders without error
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"expected \(len\(target\), len\(source\)\) = \(2, 3\)"):
        plot_alignments({"p": torch.ones(3, 2)}, ["a", "b", "c"], ["x", "y"])
