"""Every TOFU formula of rkld.metrics pinned on hand-computed cases."""
import json
import math

import numpy as np
import pytest
import torch

from rkld import metrics

UTILITY_NAMES = list(metrics.MODEL_UTILITY_KEYS)


def test_answer_average_nll_counts_answer_tokens_only_including_eos():
    # Vocabulary of 2; every position predicts token 0 with probability 3/4.
    logits = torch.tensor([math.log(3.0), 0.0]).expand(2, 4, 2).clone()
    labels = torch.tensor([[-100, 0, 1, -100],       # question, answer 0, EOS-like 1, padding
                           [-100, -100, -100, 1]])   # a single supervised token
    nll = metrics.answer_average_nll(logits, labels)
    expected_first = (-math.log(0.75) - math.log(0.25)) / 2
    assert nll.dtype == torch.float32
    assert nll.tolist() == pytest.approx([expected_first, -math.log(0.25)], rel=1e-6)
    assert metrics.probability(nll.numpy()) == pytest.approx(
        [math.exp(-expected_first), 0.25], rel=1e-6)


def test_answer_average_nll_rejects_sequences_without_answer():
    logits = torch.zeros(1, 3, 5)
    with pytest.raises(ValueError, match="no supervised answer token"):
        metrics.answer_average_nll(logits, torch.full((1, 3), -100))
    with pytest.raises(ValueError, match=r"logits \[B, T, V\]"):
        metrics.answer_average_nll(logits, torch.zeros(1, 4, dtype=torch.long))


def test_truth_ratio_is_geometric_mean_of_perturbed_over_paraphrased():
    # p_para = e^-1; perturbed probabilities e^-1, e^-2, e^-3 -> geometric mean e^-2 -> R = e^-1.
    ratios = metrics.truth_ratio([1.0, 0.5], [[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    assert ratios == pytest.approx([math.exp(-1.0), 1.0], rel=1e-9)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        metrics.truth_ratio([1.0, 2.0], [1.0, 2.0])


def test_truth_ratio_aggregates():
    # forget: min(R, 1/R) -> 0.5, 0.5, 1
    assert metrics.forget_truth_ratio_score([0.5, 2.0, 1.0]) == pytest.approx(2 / 3, rel=1e-9)
    # retain / real authors / world facts: max(0, 1 - R) -> 0.75, 0, 0.5
    assert metrics.utility_truth_ratio_score([0.25, 1.5, 0.5]) == pytest.approx(1.25 / 3, rel=1e-9)
    with pytest.raises(ValueError, match="finite"):
        metrics.forget_truth_ratio_score([0.5, float("nan")])


def test_normalised_probability():
    out = metrics.normalised_probability([0.5, 0.2], [[0.1, 0.2, 0.2], [0.2, 0.2, 0.2]])
    assert out == pytest.approx([0.5, 0.25], rel=1e-9)


def test_rouge_l_recall_uses_the_stemmer():
    (score,) = metrics.rouge_scores(["the cats sat"], ["the cat sat on the mat"])
    # With stemming "cats" -> "cat": LCS = 3 of the reference's 6 tokens.
    assert score["rougeL_recall"] == pytest.approx(0.5)
    assert score["rougeL_f1"] == pytest.approx(2 / 3)
    assert score["rouge1_recall"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="1 generations but 2 references"):
        metrics.rouge_scores(["a"], ["a", "b"])


def test_forget_quality_small_exact_case_and_identity():
    # Fully separated, 3 vs 3: p = 2 / C(6, 3) = 0.1.
    assert metrics.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1, rel=1e-12)
    assert metrics.forget_quality([0.3, 0.5, 0.9], [0.3, 0.5, 0.9]) == pytest.approx(1.0)


@pytest.mark.parametrize("n, floor", [(40, 1.86e-23), (200, 1.94e-119), (400, 1.06e-239)])
def test_forget_quality_floors_when_fully_separated(n, floor):
    fq = metrics.forget_quality(np.linspace(0.1, 0.2, n), np.linspace(0.5, 0.9, n))
    assert fq == pytest.approx(2 / math.comb(2 * n, n), rel=1e-9)
    assert fq == pytest.approx(floor, rel=5e-3)


def _write_log(path, ratios):
    log = {"forget_truth_ratio": {"agg_value": 0.0,
                                  "value_by_index": {str(i): {"score": r}
                                                     for i, r in enumerate(ratios)}}}
    path.write_text(json.dumps(log))
    return path


def test_forget_quality_reads_open_unlearning_logs(tmp_path):
    model_log = _write_log(tmp_path / "model.json", [1, 2, 3])
    retain_log = _write_log(tmp_path / "retain.json", [4, 5, 6])
    assert metrics.forget_quality(model_log, str(retain_log)) == pytest.approx(0.1)
    loaded = json.loads(retain_log.read_text())
    assert metrics.forget_quality([1, 2, 3], loaded) == pytest.approx(0.1)
    # value_by_index keys are read in numeric order, not string order.
    _write_log(tmp_path / "many.json", list(range(12)))
    assert metrics.forget_truth_ratios(tmp_path / "many.json").tolist() == list(range(12))


def test_forget_quality_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference log"):
        metrics.forget_quality([1, 2], tmp_path / "absent.json")
    (tmp_path / "other.json").write_text(json.dumps({"retain_Q_A_Prob": {}}))
    with pytest.raises(ValueError, match="forget_truth_ratio.value_by_index"):
        metrics.forget_quality(tmp_path / "other.json", [1, 2])
    with pytest.raises(ValueError, match="non-empty"):
        metrics.forget_quality([], [1, 2])


def test_model_utility_is_the_harmonic_mean_of_nine_components():
    assert metrics.model_utility({k: 0.5 for k in UTILITY_NAMES}) == pytest.approx(0.5)
    values = {k: 1.0 for k in UTILITY_NAMES}
    values["wf_Truth_Ratio"] = 0.5
    assert metrics.model_utility(values) == pytest.approx(9 / (8 + 2))
    # Log entries ({"agg_value": x}) are accepted; extra keys are ignored.
    logs = {k: {"agg_value": v} for k, v in values.items()}
    logs["forget_quality"] = {"agg_value": 1e-9}
    assert metrics.model_utility(logs) == pytest.approx(0.9)
    values["ra_Q_A_ROUGE"] = 0.0
    assert metrics.model_utility(values) == 0.0


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -0.1, "0.5"])
def test_model_utility_names_a_bad_component(bad):
    values = {k: 0.5 for k in UTILITY_NAMES}
    values["ra_Truth_Ratio"] = bad
    with pytest.raises((TypeError, ValueError), match="ra_Truth_Ratio"):
        metrics.model_utility(values)


def test_model_utility_names_a_missing_component():
    values = {k: 0.5 for k in UTILITY_NAMES if k != "retain_Q_A_ROUGE"}
    with pytest.raises(KeyError, match="retain_Q_A_ROUGE"):
        metrics.model_utility(values)
