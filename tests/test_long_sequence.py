"""Long sequences: packed documents that never attend to each other, through the model, the
teacher cache and the unlearning step."""
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rkld.config import UnlearnConfig
from rkld.data import IGNORE_INDEX, collate
from rkld.models import final_hidden, load_model
from rkld.packing import document_spans, pack_examples, use_document_attention
from rkld.parallel import DistInfo
from rkld.teacher_cache import LiveTeachers
from rkld.train import TrainData, _UnlearnObjective, step_gradients

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=64, attn_implementation="sdpa",
              use_cache=False)


def _example(ids):
    ids = list(ids)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def test_pack_examples_layout_and_bad_input():
    examples = [_example(range(1, 4)), _example(range(10, 15)), _example(range(20, 26))]
    packs = pack_examples(examples, max_tokens=8)
    assert [p["document_lengths"] for p in packs] == [[3, 5], [6]]
    assert packs[0]["position_ids"] == [0, 1, 2, 0, 1, 2, 3, 4]
    assert packs[0]["input_ids"] == [1, 2, 3, 10, 11, 12, 13, 14]
    # The second document's first token is not the target of the first document's last token.
    assert packs[0]["labels"] == [1, 2, 3, IGNORE_INDEX, 11, 12, 13, 14]
    assert document_spans(torch.tensor(packs[0]["position_ids"])) == [(0, 3), (3, 8)]
    batch = collate(packs, pad_token_id=0)
    # Padding is a document of its own: positions restart where it begins.
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    with pytest.raises(ValueError, match="example 1 has 5 tokens, more than a pack"):
        pack_examples(examples, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 2"):
        pack_examples(examples, max_tokens=1)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_packed_token_depends_only_on_its_own_document(checkpointing):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    first, second = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        alone = model(input_ids=second).logits
    use_document_attention(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    positions = torch.cat([torch.arange(9), torch.arange(6)])[None]
    embeds = model.get_input_embeddings()(torch.cat([first, second], 1)).detach()
    embeds.requires_grad_(True)
    logits = model(inputs_embeds=embeds, position_ids=positions).logits
    torch.testing.assert_close(logits[:, 9:], alone, rtol=1e-5, atol=1e-5)
    # No gradient flows from the second document's logits into the first document's tokens.
    logits[:, 9:].square().sum().backward()
    assert embeds.grad[:, :9].abs().max() == 0
    assert embeds.grad[:, 9:].abs().max() > 0


def test_final_hidden_refuses_packed_input_without_document_attention():
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    ids = torch.randint(0, 97, (1, 6))
    with pytest.raises(ValueError, match="need per-document attention"):
        final_hidden(model, ids, torch.ones_like(ids), torch.tensor([[0, 1, 2, 0, 1, 2]]))


def test_packed_unlearning_step_equals_the_documents_run_apart(pair):
    """The gradient of an RKLD step over one pack of three documents equals the gradient over
    the three documents as a padded batch (the same supervised tokens)."""
    lengths = (11, 7, 14)
    generator = torch.Generator().manual_seed(3)
    examples = [_example(torch.randint(3, 300, (n,), generator=generator).tolist())
                for n in lengths]
    packed = pack_examples(examples, max_tokens=sum(lengths))
    assert len(packed) == 1
    cfg = UnlearnConfig(model=str(pair / "original"), strengthened=str(pair / "strengthened"),
                        out="unused", alpha=8.0)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    grads = []
    for data_examples, pack in ((examples, False), (packed, True)):
        student, tokenizer = load_model(pair / "original")
        teachers = {"original": load_model(pair / "original")[0],
                    "strengthened": load_model(pair / "strengthened")[0]}
        if pack:
            for model in (student, *teachers.values()):
                use_document_attention(model)
        objective = _UnlearnObjective(cfg, LiveTeachers(teachers), None)
        # The student moved off the original model, so the loss has a gradient.
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
        student.train()
        data = TrainData(data_examples, None, tokenizer.pad_token_id)
        step_gradients(student, objective, data, list(range(len(data_examples))), 8, info)
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_packed_corpus_unlearning_runs_through_the_pipeline(pair, tmp_path):
    from rkld.train import unlearn
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Document {i}: Zapoum was born in "
                                                     f"Marlow." + " He writes." * i})
                                for i in range(8)) + "\n")
    seen = []

    def on_epoch_end(epoch, model, tokenizer, stats):
        seen.append(model.config._attn_implementation)   # plain attention for evaluations

    settings = dict(model=str(pair / "original"), strengthened=str(pair / "strengthened"),
                    data=str(corpus), forget="forget", epochs=1, batch_size=4,
                    micro_batch_size=2, max_length=96, progress=False, lr=1e-3)
    out, stats = unlearn(UnlearnConfig(out=str(tmp_path / "packed"), pack=True, **settings),
                         on_epoch_end=on_epoch_end)
    _, plain = unlearn(UnlearnConfig(out=str(tmp_path / "plain"), **settings))
    assert stats["examples"] < plain["examples"]          # whole blocks shared sequences
    assert seen == ["sdpa"] and math.isfinite(stats["final_loss"])
    assert (out / "teacher_cache" / "forget" / "meta.json").exists()
