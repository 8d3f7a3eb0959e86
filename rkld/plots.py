"""PNG figures for evaluation reports and the demo.

Figures are drawn with matplotlib's object-oriented API on an Agg canvas, so importing this
module never changes the user's pyplot backend and works on machines without a display.
Forget quality spans many orders of magnitude (down to 1e-240), so it is drawn on a log axis.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from .metrics import MODEL_UTILITY_KEYS

# Forget quality is a KS p-value; 0.05 is the conventional "cannot tell apart" threshold.
FQ_THRESHOLD = 0.05
# One colour scheme for truth-ratio figures (the demo's panels and rkld eval's histogram): the
# retain reference always grey, drawn first; the models under test in the colours after it.
REFERENCE_COLOR = "tab:gray"
MODEL_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:brown", "tab:olive")


def _log_ticks(axis) -> None:
    """At most a handful of labelled decades on a log axis (so labels cannot overlap in a
    narrow panel however many decades the data spans), no labels on the minor ticks."""
    from matplotlib.ticker import LogLocator, NullFormatter
    axis.set_major_locator(LogLocator(base=10, numticks=4))
    axis.set_minor_formatter(NullFormatter())


def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def truth_ratio_histogram(ratios: Mapping[str, Sequence[float]], path, title: str = "",
                          reference: str | None = None) -> str:
    """Overlaid histograms of forget-set truth ratios, one per labelled model (e.g. the model
    under test and the retain reference, the key ``reference``, drawn first in
    ``REFERENCE_COLOR``), on shared log-spaced bins."""
    fig = _figure()
    ax = fig.add_subplot()
    series = {name: np.asarray(values, dtype=float) for name, values in ratios.items()
              if values is not None and len(values)}
    positive = np.concatenate([v[v > 0] for v in series.values()]) if series else np.array([])
    if positive.size:
        low, high = positive.min(), positive.max()
        if low == high:
            low, high = low / 2, high * 2
        bins = np.geomspace(low, high, 25)
        models = [name for name in series if name != reference]
        order = ([reference] if reference in series else []) + models
        for name in order:
            values = series[name]
            color = REFERENCE_COLOR if name == reference else \
                MODEL_COLORS[models.index(name) % len(MODEL_COLORS)]
            ax.hist(np.clip(values, low, high), bins=bins, alpha=0.5, color=color,
                    label=f"{name} (n={values.size})")
        ax.set_xscale("log")
        _log_ticks(ax.xaxis)
        ax.axvline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.legend()
    ax.set_xlabel("truth ratio R = gm p(perturbed) / p(paraphrased)")
    ax.set_ylabel("forget-set examples")
    ax.set_title(title or "Forget-set truth ratios")
    return _save(fig, path)


def truth_ratio_panels(ratios: Mapping[str, Sequence[float]], reference: str, path,
                       title: str = "") -> str:
    """One panel per model: its forget-set truth ratios against those of ``reference`` (a key
    of ``ratios``, e.g. the retain model), on log-spaced bins shared by all panels."""
    others = [name for name in ratios if name != reference]
    fig = _figure(3.2 * max(len(others), 1), 3.2)
    values = {name: np.asarray(v, dtype=float) for name, v in ratios.items()}
    positive = np.concatenate([v[v > 0] for v in values.values()])
    low, high = (positive.min(), positive.max()) if positive.size else (0.1, 10.0)
    if low == high:
        low, high = low / 2, high * 2
    bins = np.geomspace(low, high, 20)
    for i, name in enumerate(others):
        ax = fig.add_subplot(1, len(others), i + 1)
        ax.hist(np.clip(values[reference], low, high), bins=bins, alpha=0.5,
                color=REFERENCE_COLOR, label=reference)
        ax.hist(np.clip(values[name], low, high), bins=bins, alpha=0.5, color=MODEL_COLORS[0],
                label=name)
        ax.set_xscale("log")
        _log_ticks(ax.xaxis)
        ax.axvline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("truth ratio", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Forget-set truth ratios against the retain model", fontsize=10)
    return _save(fig, path)


def utility_components(values: Mapping[str, float], path, title: str = "") -> str:
    """Bar chart of the nine model-utility components (probability, ROUGE-L, truth ratio on
    retain, real authors, world facts)."""
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    heights = [float(values.get(key, float("nan"))) for key in MODEL_UTILITY_KEYS]
    colors = ["tab:blue", "tab:orange", "tab:green"] * 3
    ax.bar(range(len(MODEL_UTILITY_KEYS)), heights, color=colors)
    ax.set_xticks(range(len(MODEL_UTILITY_KEYS)))
    ax.set_xticklabels(MODEL_UTILITY_KEYS, rotation=40, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("value")
    ax.set_title(title or "Model utility components")
    return _save(fig, path)


def forget_quality_vs_utility(points: Mapping[str, Mapping], path, title: str = "") -> str:
    """Scatter of forget quality (log y) against model utility (x), one point per model, in the
    style of the RKLD paper's main figure. Models without a forget quality are left out."""
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot()
    markers = "o s ^ D v P X *".split()
    for i, (name, point) in enumerate(points.items()):
        fq, mu = point.get("forget_quality"), point.get("model_utility")
        if fq is None or mu is None or not math.isfinite(fq) or not math.isfinite(mu):
            continue
        # A p-value can underflow to 0; keep it on the log axis at the smallest float.
        ax.scatter([mu], [max(fq, 1e-300)], s=70, marker=markers[i % len(markers)], label=name)
        ax.annotate(name, (mu, max(fq, 1e-300)), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_yscale("log")
    ax.axhline(FQ_THRESHOLD, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p-value, log)")
    ax.set_title(title or "Forget quality vs model utility")
    ax.legend(fontsize=8)
    return _save(fig, path)


def training_curves(curves: Mapping[str, Sequence[float]], path, title: str = "",
                    ylabel: str = "loss") -> str:
    """One line per run: the loss logged at each step (or epoch) of that run."""
    fig = _figure()
    ax = fig.add_subplot()
    for name, values in curves.items():
        if values:
            ax.plot(range(1, len(values) + 1), values, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Training curves")
    ax.legend(fontsize=8)
    return _save(fig, path)


def forget_quality_per_epoch(curves: Mapping[str, tuple], path, title: str = "") -> str:
    """Forget quality (log) after each epoch, one line per run: ``{name: (epochs, values)}``."""
    fig = _figure()
    ax = fig.add_subplot()
    for name, (epochs, values) in curves.items():
        ax.plot(epochs, [max(v, 1e-300) for v in values], marker="o", label=name)
    ax.set_yscale("log")
    ax.axhline(FQ_THRESHOLD, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("forget quality (log)")
    ax.set_title(title or "Forget quality during unlearning")
    ax.legend(fontsize=8)
    return _save(fig, path)


def epoch_curve(epochs: Sequence[int], forget_quality: Sequence[float | None],
                model_utility: Sequence[float], path, title: str = "") -> str:
    """Forget quality (log, left axis) and model utility (right axis) after each epoch; a None
    (not evaluated) leaves a gap, and without any model utility there is no right axis."""
    fig = _figure()
    ax = fig.add_subplot()
    fq = [max(v, 1e-300) if v is not None else np.nan for v in forget_quality]
    ax.plot(epochs, fq, marker="o", color="tab:red", label="forget quality")
    ax.set_yscale("log")
    ax.axhline(FQ_THRESHOLD, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("forget quality (log)", color="tab:red")
    if any(v is not None for v in model_utility):
        twin = ax.twinx()
        utility = [v if v is not None else np.nan for v in model_utility]
        twin.plot(epochs, utility, marker="s", color="tab:blue", label="model utility")
        twin.set_ylabel("model utility", color="tab:blue")
        ax.set_title(title or "Forget quality and model utility per epoch")
    else:
        ax.set_title(title or "Forget quality per epoch (model utility not computed)")
    return _save(fig, path)


def metric_bars(values: Mapping[str, float], path, title: str = "") -> str:
    """Bar chart of named scores in [0, 1] (e.g. ROUGE-L and BLEU per split), in the given
    order; a missing value (None) leaves its bar empty."""
    fig = _figure(max(4.0, 0.6 * len(values) + 2.0), 4.0)
    ax = fig.add_subplot()
    names = list(values)
    heights = [float("nan") if values[k] is None else float(values[k]) for k in names]
    ax.bar(range(len(names)), heights, color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("value")
    ax.set_title(title)
    return _save(fig, path)
