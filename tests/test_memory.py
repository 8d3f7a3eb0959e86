"""The memory planner: parameter counts, options, and its estimates against measured peaks.

The measured peaks come from real training steps of tiny models on CPU, each case in a fresh
subprocess (this file run as a script): it records its resident set size (RSS), builds the
models and the optimizer states (as they are after a first step), resets the kernel's RSS
high-water mark, runs one step and reports the high-water mark minus the first RSS.
Allocations of 64 KiB and more are mapped and unmapped directly by the C library in
that process (MALLOC_MMAP_THRESHOLD_), so the RSS follows live tensor bytes closely.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rkld.memory import PRESETS, ModelShape, RunShape, estimate, format_table, run_cli

MIB = 1024 ** 2
_STATUS = Path("/proc/self/status")


# --------------------------------------------------------------------------- analytic checks

def test_llama2_7b_parameter_count_is_the_published_one():
    model = ModelShape.from_preset("llama2-7b")
    assert model.params == 6_738_415_616
    assert (model.vocab, model.hidden, model.layers, model.intermediate) == (32000, 4096, 32, 11008)
    assert model.rms_norm and model.gated_mlp and model.norms_per_layer == 2
    # LoRA on q, k, v, o, gate, up, down: 4 x (4096 + 4096) + 3 x (4096 + 11008) per rank.
    assert model.lora_params(8) == 32 * 8 * (4 * 8192 + 3 * 15104)


def test_phi_preset_has_layernorm_plain_mlp_and_lm_head_bias():
    model = ModelShape.from_preset("phi-1.5")
    assert model.params == 1_418_270_720
    assert not model.rms_norm and not model.gated_mlp and model.norms_per_layer == 1
    assert model.activation_extra == 3                      # gelu_new is a Python formula
    assert model.head_params == 51200 * 2048 + 51200


def test_preset_list_and_model_folder(tmp_path):
    assert set(PRESETS) == {"llama2-7b", "llama3-8b", "llama3-70b", "phi-1.5"}
    from transformers import LlamaConfig
    LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128).save_pretrained(tmp_path)
    model = ModelShape.from_path(tmp_path)
    assert (model.layers, model.kv_heads, model.head_dim) == (3, 2, 16)
    from transformers import LlamaForCausalLM
    real = LlamaForCausalLM(LlamaConfig.from_pretrained(tmp_path))
    assert model.params == sum(p.numel() for p in real.parameters())


def test_bad_input_is_refused_with_a_useful_message(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'llama9'.*llama2-7b"):
        ModelShape.from_preset("llama9")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelShape.from_path(tmp_path)
    with pytest.raises(ValueError, match="seq_len must be a positive integer; got 0"):
        RunShape(batch=1, seq_len=0)
    with pytest.raises(ValueError, match="precision must be one of bf16, mixed, fp32; got 'fp8'"):
        RunShape(batch=1, seq_len=8, precision="fp8")


def test_the_project_needs_less_than_naive_and_sharding_and_lora_help():
    model = ModelShape.from_preset("llama2-7b")
    long_run = estimate(model, RunShape(batch=1, seq_len=32768))
    assert long_run["rkld cache"].peak < long_run["rkld live"].peak < long_run["naive"].peak
    # With checkpointing, full fine-tuning peaks in the optimizer update, where the loss plays
    # no part: only the teachers' two models make a difference there.
    assert (long_run["rkld cache"].peak_checkpointed < long_run["rkld live"].peak_checkpointed
            == long_run["naive"].peak_checkpointed)
    # The naive loss keeps seven [tokens, V] bf16 tensors.
    assert long_run["naive"].components["loss buffers"] == 7 * 2 * 32768 * 32000
    single = estimate(model, RunShape(batch=1, seq_len=4096))["rkld cache"]
    fsdp = estimate(model, RunShape(batch=1, seq_len=4096, world_size=8))["rkld cache"]
    lora = estimate(model, RunShape(batch=1, seq_len=4096, lora=True))["rkld cache"]
    assert fsdp.components["optimizer states"] * 8 == single.components["optimizer states"]
    assert fsdp.peak_checkpointed < single.peak_checkpointed
    assert lora.peak_checkpointed < single.peak_checkpointed


def test_command_prints_a_table(capsys):
    import argparse

    from rkld.memory import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run_cli(parser.parse_args(["--preset", "llama2-7b", "--seq-len", "4096", "--lora",
                                      "--world-size", "8", "--format", "markdown"])) == 0
    out = capsys.readouterr().out
    assert "Llama-2-7B (6.74 B parameters), 1 x 4096 tokens, LoRA rank 8, DDP x 8" in out
    assert "| **peak, checkpointing** |" in out
    text = format_table(ModelShape.from_preset("llama2-7b"), RunShape(batch=1, seq_len=4096))
    assert text.splitlines()[1].split() == ["GiB", "per", "GPU", "naive", "rkld", "live", "rkld",
                                            "cache"]


# --------------------------------------------------------------------------- measured peaks

# Tiny Llamas sized so that different parts dominate: the vocabulary (loss buffers, heads) or
# the decoder layers (activations, with and without checkpointing).
TINY = {
    "vocab-heavy": dict(vocab_size=32000, hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=344),
    "layer-heavy": dict(vocab_size=2048, hidden_size=256, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=688),
}
CASES = [  # (config, scenario, lora, gradient checkpointing, batch, seq_len)
    ("vocab-heavy", "naive", False, False, 1, 512),
    ("vocab-heavy", "rkld cache", False, False, 1, 512),
    ("vocab-heavy", "rkld live", True, False, 1, 512),
    ("layer-heavy", "rkld cache", False, False, 1, 512),
    ("layer-heavy", "rkld cache", False, True, 1, 512),
    ("layer-heavy", "naive", True, True, 1, 512),
]


def _estimate_for(case) -> int:
    name, scenario, lora, checkpointing, batch, seq_len = case
    from transformers import LlamaConfig
    model = ModelShape.from_config(LlamaConfig(**TINY[name]), name=name)
    run = RunShape(batch=batch, seq_len=seq_len, lora=lora, precision="fp32", device="cpu")
    result = estimate(model, run)[scenario]
    return result.peak_checkpointed if checkpointing else result.peak


@pytest.fixture(scope="module")
def measured_peaks():
    if not (_STATUS.exists() and Path("/proc/self/clear_refs").exists()):
        pytest.skip("measuring peak RSS needs Linux's /proc/self/status and clear_refs")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    done = subprocess.run([sys.executable, __file__, json.dumps(CASES)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"{c[0]}-{c[1].replace(' ', '_')}-{'lora' if c[2] else 'full'}"
                              f"{'-checkpointing' if c[3] else ''}" for c in CASES])
def test_estimate_is_within_20_percent_of_the_measured_peak(measured_peaks, index):
    measured = measured_peaks[index]
    predicted = _estimate_for(CASES[index])
    assert abs(predicted - measured) <= 0.2 * measured, (
        f"{CASES[index]}: estimated {predicted / MIB:.0f} MiB, measured {measured / MIB:.0f} MiB")


# --------------------------------------------------------------------------- the measuring process

def _rss_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from {_STATUS}")


def _training_step(case):
    """Build the case's models and return a function running one optimizer step."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from rkld.models import final_hidden, output_head
    from rkld_kernels import fused_linear_rkl_loss, unlearning_teacher_logits

    name, scenario, lora, checkpointing, batch, seq_len = case
    config = LlamaConfig(**TINY[name], tie_word_embeddings=False, attn_implementation="sdpa",
                         use_cache=False)
    student = LlamaForCausalLM(config)
    if checkpointing:
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, get_peft_model
        student = get_peft_model(student, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules="all-linear"))
    student.train()
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len))
    mask = torch.ones_like(tokens)
    n = tokens.numel()
    if scenario == "rkld cache":
        hidden = config.hidden_size
        cached = [torch.randn(n, hidden) for _ in range(2)]
        heads = [torch.randn(config.vocab_size, hidden) for _ in range(2)]
    else:
        teachers = [LlamaForCausalLM(config).eval().requires_grad_(False) for _ in range(2)]
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)

    def loss_value():
        if scenario == "naive":
            logits = student(input_ids=tokens).logits
            with torch.no_grad():
                teacher = unlearning_teacher_logits(teachers[0](input_ids=tokens).logits,
                                                    teachers[1](input_ids=tokens).logits, 8.0)
            return F.kl_div(F.log_softmax(teacher, dim=-1), F.log_softmax(logits, dim=-1),
                            log_target=True, reduction="sum") / n
        rows = final_hidden(student, tokens, mask).reshape(n, -1)
        weight, _ = output_head(student)
        if scenario == "rkld cache":
            teacher_rows, teacher_heads = cached, heads
        else:
            with torch.no_grad():
                teacher_rows = [final_hidden(t, tokens, mask).reshape(n, -1) for t in teachers]
            teacher_heads = [output_head(t)[0] for t in teachers]
        return fused_linear_rkl_loss(rows, weight, teacher_rows[0], teacher_heads[0],
                                     teacher_rows[1], teacher_heads[1], reduction="sum") / n

    def step():
        loss_value().backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Create the AdamW states with a zero-gradient update, as a first real step would.
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step


def _release_freed_memory() -> None:
    """Free unreachable objects and hand the C library's free heap pages back to the kernel, so
    that the next case's RSS baseline holds no memory it could reuse."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)


def _measure(case) -> int:
    _release_freed_memory()
    rss_before = _rss_kib("VmRSS")
    step = _training_step(case)
    Path("/proc/self/clear_refs").write_text("5")   # the high-water mark restarts from here
    step()
    peak = _rss_kib("VmHWM")
    del step
    return (peak - rss_before) * 1024


if __name__ == "__main__":
    import torch

    torch.manual_seed(0)
    cases = [tuple(c) for c in json.loads(sys.argv[1])]
    # Pay one-off costs (lazy imports, kernels, thread pools) before anything is measured:
    # one small step through each code path (naive with LoRA and checkpointing; fused loss).
    for scenario, lora, checkpointing in (("naive", True, True), ("rkld live", False, False)):
        _training_step(("layer-heavy", scenario, lora, checkpointing, 1, 16))()
    print(json.dumps([_measure(case) for case in cases]))
