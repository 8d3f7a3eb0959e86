"""The evaluation engine that runs each prompt once (``EvalConfig(engine="cached")``) gives the
numbers of the one-sequence-at-a-time path: probabilities and truth ratios within float
tolerance, generations identical."""
import numpy as np
import pytest
import torch

from rkld.data import load_benchmark
from rkld.evaluate import EvalConfig, evaluate_model
from rkld.models import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    bench = load_benchmark("synthetic", max_authors=10)
    texts = [r["question"] + " " + r["answer"] for r in bench.split("full")]
    model, tokenizer = build_tiny_model(texts, seed=3, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=128,
                                        vocab_size=400)
    # A few steps of training, so that greedy generations are not one repeated token and
    # some of them stop (EOS) before max_new_tokens while others in their batch go on.
    from rkld.data import collate, encode_qa
    batch = collate([encode_qa(tokenizer, r["question"], r["answer"], 64)
                     for r in bench.split("full")[:32]], tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, tokenizer, bench


def _values(logs):
    out = {}
    for key, entry in logs.items():
        for index, value in (entry.get("value_by_index") or {}).items():
            for field in ("prob", "avg_loss", "score"):
                if field in value:
                    out[(key, index, field)] = np.asarray(value[field], dtype=np.float64)
    return out


def _generations(logs):
    return {(key, index): value["generation"] for key, entry in logs.items()
            for index, value in (entry.get("value_by_index") or {}).items()
            if "generation" in value}


@pytest.mark.parametrize("max_length, batch", [(512, 32), (40, 5)])
def test_cached_engine_matches_one_sequence_at_a_time(tiny, max_length, batch):
    """max_length 40 cuts some answers (as encode_qa cuts them); batch 5 makes groups of
    questions whose prompts and answers differ in length (left and right padding)."""
    model, tokenizer, bench = tiny
    common = {"max_new_tokens": 10, "max_length": max_length, "progress": False}
    single = evaluate_model(model, tokenizer, bench, EvalConfig(
        engine="plain", batch_size=1, generation_batch_size=1, **common))
    cached = evaluate_model(model, tokenizer, bench, EvalConfig(
        engine="cached", batch_size=batch, generation_batch_size=batch, **common))
    a, b = _values(cached), _values(single)
    assert a.keys() == b.keys() and len(a) > 300
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=1e-7, err_msg=str(key))
    generations = _generations(cached)
    assert generations == _generations(single)
    lengths = {len(text.split()) for text in generations.values()}
    assert len(lengths) > 1                    # some stopped early, others ran on
    for key in ("forget_truth_ratio", "model_utility", "retain_Q_A_Prob"):
        assert cached[key]["agg_value"] == pytest.approx(single[key]["agg_value"], rel=1e-4)


def test_engine_name_is_checked():
    with pytest.raises(ValueError, match="engine must be one of cached, plain"):
        EvalConfig(engine="fast")
