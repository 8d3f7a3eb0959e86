"""TOFU metrics, defined exactly as the reference evaluation code defines them.

Every function here is pure (numbers in, numbers out); :mod:`rkld.evaluate` runs the models and
feeds them. Per-example values follow open-unlearning's conventions so that its published logs
and ours are interchangeable:

- length-normalised probability ``p(a|q) = exp(-avgNLL)``, where avgNLL is the mean next-token
  NLL over the answer tokens, EOS included;
- truth ratio ``R = gm_j p(perturbed_j) / p(paraphrased)``, i.e.
  ``exp(avgNLL(para) - mean_j avgNLL(pert_j))`` (the reference computes it as
  ``p_wrong / (p_correct + 1e-10)``): a model that knows the
  answer has R well below 1. The forget set scores ``mean(min(R, 1/R))`` (1 is best: true and
  false answers equally likely); retain / real authors / world facts score ``mean(max(0, 1 - R))``;
- normalised probability (real authors, world facts) ``p_true / (p_true + sum_j p_pert_j)``;
- ROUGE-L recall of the greedy generation against the reference answer (stemmer on);
- forget quality: the p-value of the two-sample Kolmogorov-Smirnov test between the forget-set
  truth ratios of the model and of the retain model;
- model utility: the harmonic mean of nine numbers (probability, ROUGE-L, truth-ratio score on
  retain, real authors and world facts).

The ``1e-10`` guards are the reference's own; they matter only when probabilities underflow.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

# Guard the reference code adds to denominators (it changes results only when p < ~1e-8).
REFERENCE_EPS = 1e-10

# The nine components of model utility, named as open-unlearning names them.
MODEL_UTILITY_KEYS = (
    "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
    "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio",
)
# The log entry whose per-example ``score`` is the forget-set truth ratio R.
FORGET_TRUTH_RATIO_KEY = "forget_truth_ratio"


def answer_average_nll(logits: torch.Tensor, labels: torch.Tensor,
                       ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token NLL over the supervised (answer) tokens of each sequence, in float32.

    ``logits`` is ``[B, T, V]`` and ``labels`` ``[B, T]`` in the Hugging Face convention (aligned
    with the inputs; position t predicts label t+1). Returns ``[B]``. A sequence without any
    supervised token is an error: its probability would be undefined.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"answer_average_nll: expected logits [B, T, V] and labels [B, T]; got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    targets = labels[:, 1:]
    token_nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=ignore_index,
        reduction="none")
    counts = (targets != ignore_index).sum(dim=1)
    if bool((counts == 0).any()):
        bad = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"answer_average_nll: sequences {bad} of the batch have no supervised "
                         f"answer token (all labels are {ignore_index}); was the answer truncated?")
    return token_nll.sum(dim=1) / counts


def probability(avg_nll) -> np.ndarray:
    """Length-normalised probability ``exp(-avgNLL)`` (any array shape)."""
    return np.exp(-np.asarray(avg_nll, dtype=np.float64))


def truth_ratio(correct_avg_nll, wrong_avg_nll) -> np.ndarray:
    """Per-example truth ratio ``gm_j p(wrong_j) / p(correct)``.

    Args:
        correct_avg_nll: ``[N]`` avgNLL of the paraphrased answer (forget, retain) or of the
            true answer (real authors, world facts).
        wrong_avg_nll: ``[N, K]`` avgNLL of the K perturbed answers.
    """
    correct = np.asarray(correct_avg_nll, dtype=np.float64)
    wrong = np.asarray(wrong_avg_nll, dtype=np.float64)
    if correct.ndim != 1 or wrong.ndim != 2 or wrong.shape[0] != correct.shape[0]:
        raise ValueError(f"truth_ratio: expected correct_avg_nll [N] and wrong_avg_nll [N, K]; got "
                         f"{correct.shape} and {wrong.shape}")
    # The geometric mean of the perturbed probabilities is exp(-mean of their avgNLL).
    wrong_prob = np.exp(-wrong.mean(axis=1))
    return wrong_prob / (np.exp(-correct) + REFERENCE_EPS)


def forget_truth_ratio_score(ratios) -> float:
    """Forget-set aggregate ``mean(min(R, 1/R))``: 1 when true and false answers are equally
    likely."""
    r = _nonempty_1d("forget_truth_ratio_score", ratios)
    return float(np.mean(np.minimum(r, 1.0 / (r + REFERENCE_EPS))))


def utility_truth_ratio_score(ratios) -> float:
    """Retain / real-authors / world-facts aggregate ``mean(max(0, 1 - R))``: higher is better."""
    r = _nonempty_1d("utility_truth_ratio_score", ratios)
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def normalised_probability(correct_prob, wrong_prob) -> np.ndarray:
    """Per-example ``p_true / (p_true + sum_j p_wrong_j)`` from ``[N]`` and ``[N, K]``
    probabilities."""
    correct = np.asarray(correct_prob, dtype=np.float64)
    wrong = np.asarray(wrong_prob, dtype=np.float64)
    if correct.ndim != 1 or wrong.ndim != 2 or wrong.shape[0] != correct.shape[0]:
        raise ValueError(f"normalised_probability: expected correct_prob [N] and wrong_prob "
                         f"[N, K]; got {correct.shape} and {wrong.shape}")
    return correct / (correct + wrong.sum(axis=1) + REFERENCE_EPS)


_ROUGE_SCORER = None


def rouge_scores(generations: Sequence[str], references: Sequence[str]) -> list[dict]:
    """ROUGE of each generation against its reference answer (stemmer on), as the reference logs it.

    Returns one dict per pair with ``rouge1_recall``, ``rougeL_f1`` and ``rougeL_recall``;
    TOFU's ROUGE metric is ``rougeL_recall``.
    """
    global _ROUGE_SCORER
    if len(generations) != len(references):
        raise ValueError(f"rouge_scores: {len(generations)} generations but {len(references)} "
                         f"references")
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer
        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    out = []
    for generation, reference in zip(generations, references):
        score = _ROUGE_SCORER.score(reference, generation)   # (target, prediction)
        out.append({"rouge1_recall": score["rouge1"].recall,
                    "rougeL_f1": score["rougeL"].fmeasure,
                    "rougeL_recall": score["rougeL"].recall})
    return out


def forget_quality(unlearned, reference) -> float:
    """Kolmogorov-Smirnov p-value between two sets of forget-set truth ratios.

    Each argument is a sequence of per-example truth ratios R, a loaded evaluation log (dict),
    or a path to a ``TOFU_EVAL.json`` in open-unlearning's schema, whose
    ``forget_truth_ratio.value_by_index[i].score`` holds R. ``unlearned`` is the model under
    test, ``reference`` the retain model (never trained on the forget set). 1 means the two
    distributions are indistinguishable; when they are fully separated the p-value bottoms out
    at 2 / C(2n, n) for n examples each (1.86e-23 for n = 40).
    """
    from scipy.stats import ks_2samp
    model_r = forget_truth_ratios(unlearned, "unlearned")
    reference_r = forget_truth_ratios(reference, "reference")
    return float(ks_2samp(model_r, reference_r).pvalue)


def forget_truth_ratios(source, name: str = "source") -> np.ndarray:
    """Per-example forget-set truth ratios from a sequence, a loaded log or a TOFU_EVAL.json
    path."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"forget_quality: {name} log {path!r} does not exist; expected "
                                    f"a TOFU_EVAL.json written by `rkld eval` or open-unlearning")
        with open(path) as f:
            source = json.load(f)
        name = f"{name} log {path!r}"
    if isinstance(source, Mapping):
        entry = source.get(FORGET_TRUTH_RATIO_KEY)
        if not isinstance(entry, Mapping) or not isinstance(entry.get("value_by_index"), Mapping):
            raise ValueError(f"forget_quality: {name} has no '{FORGET_TRUTH_RATIO_KEY}."
                             f"value_by_index' entry; keys present: {sorted(source)[:20]}")
        by_index = entry["value_by_index"]
        # Keys are example indices (strings after a JSON round trip); order them numerically.
        ordered = sorted(by_index.items(), key=lambda kv: int(kv[0]))
        values = []
        for index, item in ordered:
            if not isinstance(item, Mapping) or "score" not in item:
                raise ValueError(f"forget_quality: {name}: value_by_index[{index!r}] has no "
                                 f"'score'; got {item!r}")
            if item["score"] is not None:   # the reference skips examples it could not score
                values.append(item["score"])
        source = values
    return _nonempty_1d(f"forget_quality ({name})", source)


def model_utility(values: Mapping) -> float:
    """Harmonic mean of the nine utility components named in :data:`MODEL_UTILITY_KEYS`.

    ``values`` maps each name to a number, or to a log entry ``{"agg_value": number}``. Extra
    keys are ignored. A missing, non-numeric, negative or non-finite component is an error that
    names it. A component equal to 0 makes the utility 0 (the harmonic mean's limit).
    """
    from scipy.stats import hmean
    if not isinstance(values, Mapping):
        raise TypeError(f"model_utility: expected a mapping of component name -> value; got "
                        f"{type(values).__name__}")
    components = []
    for key in MODEL_UTILITY_KEYS:
        if key not in values:
            raise KeyError(f"model_utility: component {key!r} is missing; expected all of "
                           f"{list(MODEL_UTILITY_KEYS)}")
        value = values[key]
        if isinstance(value, Mapping):
            value = value.get("agg_value")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise TypeError(f"model_utility: component {key!r} must be a number; got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"model_utility: component {key!r} must be finite and >= 0; "
                             f"got {value}")
        components.append(float(value))
    if min(components) == 0.0:
        return 0.0
    return float(hmean(components))


def _nonempty_1d(fn: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{fn}: expected a non-empty 1-D sequence of numbers; got shape "
                         f"{array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{fn}: values must be finite; got {array[~np.isfinite(array)][:5]}")
    return array
