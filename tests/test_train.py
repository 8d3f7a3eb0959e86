"""The training stages on tiny models: teacher cache vs live teachers, normalisation over
micro-batches, resume, the unlearning variants, and the checks that run before any work."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rkld.config import FinetuneConfig, StrengthenConfig, UnlearnConfig
from rkld.data import collate, load_benchmark
from rkld.models import build_tiny_model, final_hidden, load_model, supervised_positions
from rkld.parallel import DistInfo
from rkld.teacher_cache import LiveTeachers, TeacherCache
from rkld.train import (
    TrainData,
    _encode,
    _paired_retain,
    _UnlearnObjective,
    finetune,
    step_gradients,
    strengthen,
    token_nll_sum,
    unlearn,
)

TINY = {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64}
FAST = dict(max_length=48, progress=False, lr=2e-3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    """A tiny target (original) model and its strengthened version, trained briefly."""
    root = tmp_path_factory.mktemp("models")
    target, stats = finetune(FinetuneConfig(model="tiny", out=str(root / "target"), epochs=2,
                                            batch_size=32, micro_batch_size=32, tiny=TINY,
                                            **dict(FAST, lr=5e-3)))
    strengthened, _ = strengthen(StrengthenConfig(model=str(target), out=str(root / "strong"),
                                                  epochs=3, batch_size=10, micro_batch_size=10,
                                                  **FAST))
    return {"root": root, "target": target, "strong": strengthened, "finetune_stats": stats}


def _unlearn_cfg(models, out, **overrides):
    settings = dict(model=str(models["target"]), strengthened=str(models["strong"]),
                    out=str(out), forget="forget10", epochs=2, batch_size=8, micro_batch_size=8,
                    **FAST)
    settings.update(overrides)
    return UnlearnConfig(**settings)


def _weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def _assert_same_weights(a, b, atol):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol,
                                   msg=lambda m: f"{name}: {m}")


def test_finetune_writes_model_record_and_log(models):
    target = models["target"]
    record = json.loads((target / "run.json").read_text())
    assert record["status"] == "finished" and record["stage"] == "finetune"
    bench = load_benchmark("synthetic")
    assert record["data"] == {"full": bench.fingerprint("full")}
    assert {"torch", "transformers", "rkld"} <= set(record["versions"])
    log = [json.loads(line) for line in (target / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 15))       # 200 examples / 32 -> 7 per epoch
    stats = models["finetune_stats"]
    assert stats["epoch_losses"][1] < stats["epoch_losses"][0]
    model, tokenizer = load_model(target)
    assert model.config.hidden_size == 32 and len(tokenizer) == model.config.vocab_size
    assert (models["strong"] / "run.json").exists()


def test_teacher_cache_holds_the_live_states(models, tmp_path):
    out, _ = unlearn(_unlearn_cfg(models, tmp_path / "u", epochs=1))
    cache = TeacherCache(out / "teacher_cache" / "forget", torch.device("cpu"))
    model, tokenizer = load_model(models["strong"])
    model.eval()
    examples = _encode(tokenizer, load_benchmark("synthetic").split("forget10"),
                       _unlearn_cfg(models, tmp_path), "forget10")
    picked = [3, 0, 17]
    batch = collate([examples[i] for i in picked], tokenizer.pad_token_id)
    with torch.no_grad():
        rows, _ = supervised_positions(final_hidden(model, batch["input_ids"],
                                                    batch["attention_mask"]), batch["labels"])
    torch.testing.assert_close(cache.rows("strengthened", picked), rows, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.head("strengthened")[0], model.lm_head.weight)
    # The states were written through file-backed buffers, gone once the parts are saved.
    assert not list((out / "teacher_cache" / "forget").glob(".*.building"))


def test_teacher_states_are_built_in_a_file_backed_buffer(models, tmp_path, monkeypatch):
    """A process's cached rows ([rows, H] per teacher, large for long documents) are never one
    RAM tensor: the build writes them into a buffer mapped on a file in the cache folder."""
    import rkld.teacher_cache as teacher_cache
    buffers = []
    build_buffer = teacher_cache._file_backed

    def recording(shape, dtype, path):
        store = build_buffer(shape, dtype, path)
        buffers.append((path, store.untyped_storage().filename, shape))
        return store

    monkeypatch.setattr(teacher_cache, "_file_backed", recording)
    out, _ = unlearn(_unlearn_cfg(models, tmp_path / "u", epochs=1))
    assert [path.name for path, _, _ in buffers] == [".original.rank0.building",
                                                     ".strengthened.rank0.building"]
    for path, filename, shape in buffers:
        assert filename == str(path) and shape[0] > 0 and not path.exists()


def test_cached_and_live_teachers_train_the_same(models, tmp_path):
    cached, cached_stats = unlearn(_unlearn_cfg(models, tmp_path / "cached"))
    live, live_stats = unlearn(_unlearn_cfg(models, tmp_path / "live", live_teachers=True))
    assert not (live / "teacher_cache").exists()
    assert cached_stats["epoch_losses"] == pytest.approx(live_stats["epoch_losses"], rel=1e-4)
    _assert_same_weights(cached, live, atol=1e-5)
    # Unlearning moved the student away from the original model.
    original = _weights(models["target"])
    assert any(not torch.allclose(original[k], v) for k, v in _weights(cached).items())


def test_step_gradient_independent_of_micro_batch_size(models):
    # One optimizer step of 8 examples as 1 micro-batch of 8 or as micro-batches of 3, 3 and 2:
    # their supervised-token counts differ, so a per-micro-batch mean would not match.
    cfg = _unlearn_cfg(models, "unused", retain_term="nll")
    student, tokenizer = load_model(models["target"])
    teachers = LiveTeachers({"original": load_model(models["target"])[0],
                             "strengthened": load_model(models["strong"])[0]})
    bench = load_benchmark("synthetic")
    examples = _encode(tokenizer, bench.split("forget10"), cfg, "forget10")
    retain = _paired_retain(_encode(tokenizer, bench.split("retain90"), cfg, "retain90"),
                            len(examples), seed=0)
    data = TrainData(examples, retain, tokenizer.pad_token_id)
    objective = _UnlearnObjective(cfg, teachers, None)
    step = [3, 11, 0, 7, 19, 5, 2, 14]
    results = []
    for micro in (8, 3):
        student.zero_grad(set_to_none=True)
        loss, tokens, _ = step_gradients(student, objective, data, step, micro, DistInfo())
        results.append((loss, tokens, {n: p.grad.clone() for n, p in student.named_parameters()}))
    (loss_one, tokens_one, grads_one), (loss_three, tokens_three, grads_three) = results
    assert tokens_one == tokens_three == sum(data.forget_tokens[i] for i in step)
    assert loss_one == pytest.approx(loss_three, rel=1e-6)
    for name, grad in grads_one.items():
        torch.testing.assert_close(grads_three[name], grad, rtol=1e-5, atol=1e-8,
                                   msg=lambda m: f"{name}: {m}")


def test_resume_matches_an_uninterrupted_run(models, tmp_path):
    # 3 steps per epoch; checkpoints after steps 2, 3 (epoch end) and 4; killed after step 5.
    full, _ = unlearn(_unlearn_cfg(models, tmp_path / "full", epochs=2, save_every=2))

    class Killed(Exception):
        pass

    def kill_after_step_5(step, record):
        if step == 5:
            raise Killed

    cfg = _unlearn_cfg(models, tmp_path / "resumed", epochs=2, save_every=2)
    with pytest.raises(Killed):
        unlearn(cfg, on_step=kill_after_step_5)
    out = tmp_path / "resumed"
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    with pytest.raises(FileExistsError, match="unfinished unlearn run; pass --resume"):
        unlearn(_unlearn_cfg(models, out, epochs=2, save_every=2))
    _, stats = unlearn(_unlearn_cfg(models, out, epochs=2, save_every=2, resume=True))
    assert stats["resumed_from_step"] == 4
    _assert_same_weights(full, out, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))             # step 5 was redone, not logged twice
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("overrides", [
    dict(direction="forward"),
    dict(method="ga", strengthened=None),
    dict(method="graddiff", strengthened=None),
    dict(method="npo", strengthened=None, npo_beta=0.5),
    dict(retain_term="kl"),
    dict(lora=True, lora_rank=4, lr=1e-2),
    dict(gradient_checkpointing=True, dtype="bfloat16", micro_batch_size=3),
])
def test_unlearning_variants_run(models, tmp_path, overrides):
    epoch_ends = []
    out, stats = unlearn(_unlearn_cfg(models, tmp_path / "u", **overrides),
                         on_epoch_end=lambda epoch, model, tok, s: epoch_ends.append(
                             (epoch, model.training)))
    assert epoch_ends == [(1, False), (2, False)]
    assert all(map(torch.isfinite, map(torch.tensor, stats["epoch_losses"])))
    if overrides.get("retain_term") == "kl":
        assert (out / "teacher_cache" / "retain" / "meta.json").exists()
    weights = _weights(out)
    assert not any("lora" in name for name in weights)      # adapters are merged on save
    original = _weights(models["target"])
    changed = [k for k in weights if not torch.equal(weights[k], original[k])]
    assert changed
    if overrides.get("lora"):
        assert "lm_head.weight" not in changed and "model.embed_tokens.weight" not in changed
    if overrides.get("method") == "ga":
        assert stats["final_loss"] < 0              # the negated NLL
    if overrides.get("method") == "npo":            # the original's states, from the cache
        meta = json.loads((out / "teacher_cache" / "forget" / "meta.json").read_text())
        assert meta["teachers"] == ["original"]


def test_token_nll_sum_chunks_match():
    hidden = torch.randn(37, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    whole = token_nll_sum(hidden, weight, None, targets)
    chunked = token_nll_sum(hidden, weight, None, targets, chunk=5)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    torch.testing.assert_close(whole, expected)
    torch.testing.assert_close(chunked, expected)
    grads = torch.autograd.grad(chunked, (hidden, weight))
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_corpus_unlearning(models, tmp_path):
    corpus = tmp_path / "book.txt"
    corpus.write_text("Zapoum Draishond was born in Marlow and writes mystery novels. " * 12)
    out, stats = unlearn(_unlearn_cfg(models, tmp_path / "u", data=str(corpus), forget="forget",
                                      epochs=1, max_length=32))
    assert stats["examples"] >= 4 and (out / "model.safetensors").exists()


def test_bad_input_fails_before_any_work(models, tmp_path):
    out = tmp_path / "u"
    other, _ = build_tiny_model(["entirely different text for another tokenizer"],
                                tmp_path / "other", **TINY)
    with pytest.raises(ValueError, match="must share one tokenizer"):
        unlearn(_unlearn_cfg(models, out, strengthened=str(tmp_path / "other")))
    with pytest.raises(FileNotFoundError, match="strengthened model folder .* does not exist"):
        unlearn(_unlearn_cfg(models, out, strengthened=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="forget set 'forget20'"):
        unlearn(_unlearn_cfg(models, out, forget="forget20"))
    with pytest.raises(ValueError, match="needs the strengthened model"):
        unlearn(_unlearn_cfg(models, out, strengthened=None))
    empty = tmp_path / "empty_data"
    empty.mkdir()
    (empty / "forget10_perturbed.json").write_text("[]")
    with pytest.raises(ValueError, match="forget set 'forget10' .* is empty"):
        unlearn(_unlearn_cfg(models, out, data=str(empty)))
    corpus = tmp_path / "book.txt"
    corpus.write_text("Some text to forget. " * 10)
    with pytest.raises(ValueError, match="retain-term nll needs the retain split of 'forget'"):
        unlearn(_unlearn_cfg(models, out, data=str(corpus), forget="forget", retain_term="nll"))
    capped = tmp_path / "capped"
    capped_model, capped_tokenizer = load_model(models["strong"])
    capped_model.config.final_logit_softcapping = 30.0
    capped_model.save_pretrained(capped)
    capped_tokenizer.save_pretrained(capped)
    with pytest.raises(ValueError, match="final_logit_softcapping = 30.0"):
        unlearn(_unlearn_cfg(models, out, strengthened=str(capped)))
    assert not out.exists()                       # nothing was written by any failed call
    # A finished run is never replaced without --overwrite, and stays untouched.
    before = (models["target"] / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a finished finetune run"):
        finetune(FinetuneConfig(model="tiny", out=str(models["target"]), tiny=TINY, **FAST))
    assert (models["target"] / "model.safetensors").read_bytes() == before
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no rkld run"):
        finetune(FinetuneConfig(model="tiny", out=str(stranger), tiny=TINY, **FAST))
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        finetune(FinetuneConfig(model="tiny", out=str(out), resume=True, overwrite=True))
