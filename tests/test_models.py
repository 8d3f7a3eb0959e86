"""Tiny models, loading, the captured final hidden state and the logits-are-linear check."""
import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from rkld.data import collate, encode_qa, load_benchmark
from rkld.models import (
    build_tiny_model,
    check_logits_are_linear,
    check_same_vocabulary,
    final_hidden,
    load_model,
    output_head,
    supervised_positions,
    train_tokenizer,
)

TINY = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64)

@pytest.fixture(scope="module")
def texts():
    return [r["question"] + " " + r["answer"] for r in load_benchmark("synthetic").split("full")]

@pytest.fixture(scope="module")
def tiny(texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    model, tokenizer = build_tiny_model(texts, out, seed=1, **TINY)
    return model, tokenizer, out

def test_tiny_model_is_deterministic_and_reloads(tiny, texts):
    model, tokenizer, out = tiny
    again, tokenizer_again = build_tiny_model(texts, seed=1, **TINY)
    assert tokenizer_again.get_vocab() == tokenizer.get_vocab()
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
    other, _ = build_tiny_model(texts, seed=2, **TINY)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    loaded, loaded_tokenizer = load_model(out)
    check_same_vocabulary(tokenizer, loaded_tokenizer, "built", "loaded")
    assert loaded.config.hidden_size == 32 and len(loaded_tokenizer) == loaded.config.vocab_size
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    ids = tokenizer("Where was Zapoum born?")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Where was Zapoum born?"

def test_final_hidden_is_the_lm_head_input(tiny):
    model, tokenizer, _ = tiny
    batch = collate([encode_qa(tokenizer, "Where was X born?", "X was born in Marlow.", 64),
                     encode_qa(tokenizer, "Q?", "A.", 64)], tokenizer.pad_token_id)
    hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    weight, bias = output_head(model)
    assert bias is None
    torch.testing.assert_close(hidden @ weight.T, logits, rtol=0, atol=1e-5)
    rows, targets = supervised_positions(hidden, batch["labels"])
    # Row-major order: example 0's answer positions, then example 1's.
    expected = [(b, t) for b in range(2) for t in range(hidden.shape[1] - 1)
                if batch["labels"][b, t + 1] != -100]
    assert rows.shape == (len(expected), 32)
    assert torch.equal(targets, torch.stack([batch["labels"][b, t + 1] for b, t in expected]))
    assert torch.equal(rows, torch.stack([hidden[b, t] for b, t in expected]))
    # Gradients flow through the captured state.
    rows.sum().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None

class _ScaledLogits(LlamaForCausalLM):
    """A model that multiplies its logits after the head, unknown to its config."""
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

def test_models_with_transformed_logits_are_refused(tiny):
    model, _, _ = tiny
    check_logits_are_linear(model)
    capped = LlamaForCausalLM(copy.deepcopy(model.config))
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping = 30.0.*not lm_head"):
        check_logits_are_linear(capped)
    scaled = _ScaledLogits(model.config)
    with pytest.raises(ValueError, match="logits differ from lm_head"):
        check_logits_are_linear(scaled)
    tied_config = model.config.__class__(**{**model.config.to_dict(), "tie_word_embeddings": True})
    check_logits_are_linear(LlamaForCausalLM(tied_config))    # plain tied embeddings are fine

def test_vocabulary_and_loading_errors(tiny, tmp_path):
    _, tokenizer, _ = tiny
    other = train_tokenizer(["completely different words"], vocab_size=300)
    with pytest.raises(ValueError, match="original model and strengthened model must share"):
        check_same_vocabulary(tokenizer, other, "original model", "strengthened model")
    with pytest.raises(FileNotFoundError, match="expected a Hugging Face model folder"):
        load_model(tmp_path)


def test_tiny_tokenizer_cuts_long_runs_without_whitespace():
    """BPE training is superlinear in a pre-token's length: a text without whitespace is cut
    into runs of at most PRE_TOKEN_CHARS characters (the time is measured in the report of
    this change, not here); encoding still round-trips."""
    from rkld.models import PRE_TOKEN_CHARS
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(5000))
    tokenizer = train_tokenizer([text, "plain words here"], vocab_size=300)
    pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    assert len(pieces) == -(-len(text) // PRE_TOKEN_CHARS)
    assert max(len(piece) for piece, _ in pieces) == PRE_TOKEN_CHARS
    sample = "plain words " + text[:100]
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == sample
    short = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("plain words here")
    assert [piece for piece, _ in short] == ["plain", "Ġwords", "Ġhere"]
