"""The figures' layout: readable tick labels on wide truth-ratio ranges, one colour scheme for
the retain reference and the models, no empty model-utility axis."""
import numpy as np
import pytest
from matplotlib.colors import to_rgba

from rkld import plots


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions draw, kept instead of (and also) saved."""
    drawn = []
    save = plots._save

    def keep(fig, path):
        drawn.append(fig)
        return save(fig, path)
    monkeypatch.setattr(plots, "_save", keep)
    return drawn


def _overlapping_labels(fig) -> list:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for ax in fig.axes:
        boxes = [label.get_window_extent(renderer) for label in ax.get_xticklabels()
                 if label.get_visible() and label.get_text()]
        boxes.sort(key=lambda box: box.x0)
        found += [(ax.get_title(), a, b) for a, b in zip(boxes, boxes[1:]) if a.x1 > b.x0]
    return found


def _hist_colors(ax) -> list:
    """The face colour of each histogram drawn on ``ax``, in drawing order (alpha dropped)."""
    colors = []
    for container in ax.containers:
        colors.append(to_rgba(container.patches[0].get_facecolor(), 1.0))
    return colors


def test_truth_ratio_panels_labels_do_not_overlap_on_wide_ranges(figures, tmp_path):
    # TOFU-like: truth ratios of an unlearned model span many decades.
    rng = np.random.default_rng(0)
    ratios = {name: list(10 ** rng.uniform(-9, 3, 40)) for name in
              ("target", "retain", "rkld", "fkld", "ga")}
    plots.truth_ratio_panels(ratios, "retain", tmp_path / "panels.png")
    assert _overlapping_labels(figures[-1]) == []
    plots.truth_ratio_histogram({"model": ratios["rkld"], "retain reference": ratios["retain"]},
                                tmp_path / "hist.png", reference="retain reference")
    assert _overlapping_labels(figures[-1]) == []


def test_truth_ratio_figures_share_one_colour_scheme(figures, tmp_path):
    rng = np.random.default_rng(1)
    model, retain = list(rng.uniform(0.2, 2, 30)), list(rng.uniform(0.2, 2, 30))
    plots.truth_ratio_panels({"retain": retain, "rkld": model, "ga": model}, "retain",
                             tmp_path / "panels.png")
    for ax in figures[-1].axes:
        assert _hist_colors(ax) == [to_rgba(plots.REFERENCE_COLOR), to_rgba(plots.MODEL_COLORS[0])]
    # rkld eval's histogram: the model's log first in the mapping, the reference still grey
    plots.truth_ratio_histogram({"model": model, "retain reference": retain},
                                tmp_path / "hist.png", reference="retain reference")
    assert _hist_colors(figures[-1].axes[0]) == [to_rgba(plots.REFERENCE_COLOR),
                                                 to_rgba(plots.MODEL_COLORS[0])]


def test_epoch_curve_draws_no_utility_axis_without_utility(figures, tmp_path):
    plots.epoch_curve([1, 2, 3], [1e-3, 0.2, 0.05], [None, None, None], tmp_path / "a.png")
    assert len(figures[-1].axes) == 1
    assert "not computed" in figures[-1].axes[0].get_title()
    plots.epoch_curve([1, 2, 3], [1e-3, 0.2, 0.05], [0.5, None, 0.4], tmp_path / "b.png")
    assert len(figures[-1].axes) == 2
    assert figures[-1].axes[1].get_ylabel() == "model utility"
