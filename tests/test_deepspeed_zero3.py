"""Unlearning under DeepSpeed ZeRO-3 with 2 CPU processes (gloo) equals one process.

One ``torchrun`` launch runs, with parameters, gradients and AdamW states partitioned over the
two processes:
  (a) unlearning with the teacher cache and a retain NLL term, with gradient checkpointing,
      the strategy picked from accelerate's environment (``--parallel auto``);
  (b) the same run killed after step 3 (its last checkpoint is step 2) and resumed;
  (c) unlearning with live teachers (ZeRO-3 inference engines) and the +KL retain term;
  (d) a model loaded under ``zero3_loading`` is partitioned as it is created;
  (e) finetuning (next-token NLL through the same head call) from the saved original model.
The test then runs (a), (c) and (e) in one process and compares the saved weights and losses.
"""
import json
import textwrap

import pytest
import torch
from conftest import torchrun
from safetensors.torch import load_file

from rkld.config import FinetuneConfig, UnlearnConfig
from rkld.parallel import (
    DistInfo,
    _check_accelerate_deepspeed_env,
    init_distributed,
    zero3_setup,
)
from rkld.train import _check_strategy, finetune, unlearn

SETTINGS = dict(forget="forget10", epochs=2, lr=2e-3, batch_size=8, micro_batch_size=2,
                max_length=48, progress=False)
RUNS = {"cache": dict(retain_term="nll", gradient_checkpointing=True, save_every=2),
        "live": dict(retain_term="kl", live_teachers=True, epochs=1)}
KILL_AFTER = 3

WORKER = textwrap.dedent('''
    import json, os, sys, torch
    torch.set_num_threads(1)
    # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce op when it starts (about
    # 40 s); the training loop never uses it (gloo does the collectives), so skip the build.
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from rkld.config import FinetuneConfig, UnlearnConfig
    from rkld.train import unlearn

    settings, runs, kill_after, root = (json.loads(sys.argv[1]), json.loads(sys.argv[2]),
                                        int(sys.argv[3]), sys.argv[4])
    finetune_settings = json.loads(sys.argv[5])
    # (a) the strategy from accelerate's environment, as `accelerate launch` with zero3.yaml sets
    os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3")
    unlearn(UnlearnConfig(**settings, **runs["cache"], out=f"{root}/cache", parallel="auto"))
    del os.environ["ACCELERATE_USE_DEEPSPEED"]

    class Killed(Exception):
        pass

    def kill(step, record):
        if step == kill_after:
            raise Killed

    try:    # (b) killed after step 3, then resumed from the step-2 checkpoint
        unlearn(UnlearnConfig(**settings, **runs["cache"], out=f"{root}/resumed",
                              parallel="zero3"), on_step=kill)
        raise SystemExit("the run was not interrupted")
    except Killed:
        pass
    unlearn(UnlearnConfig(**settings, **runs["cache"], out=f"{root}/resumed", parallel="zero3",
                          resume=True))
    # (c) live teachers and the +KL retain term
    unlearn(UnlearnConfig(**{**settings, **runs["live"]}, out=f"{root}/live", parallel="zero3"))

    # (e) finetuning (the NLL stages) from a saved model
    from rkld.config import FinetuneConfig
    from rkld.train import finetune
    finetune(FinetuneConfig(**finetune_settings, out=f"{root}/finetune", parallel="zero3"))

    # (d) models load partitioned: each process materialises only its share of the weights
    from rkld.models import load_model
    from rkld.parallel import init_distributed, zero3_loading, zero3_setup
    info = init_distributed("zero3")
    zero3_setup(info, "float32", 2, 1.0)
    with zero3_loading(info):
        model, _ = load_model(settings["model"])
    params = list(model.parameters())
    assert all(p.numel() == 0 and p.ds_numel > 0 for p in params), "not partitioned at load"
    whole = sum(p.ds_numel for p in params)
    mine = sum(p.ds_tensor.numel() for p in params)
    assert mine <= whole // 2 + len(params), (mine, whole)
    model, _ = load_model(settings["model"])      # outside the context: an ordinary model
    assert sum(p.numel() for p in model.parameters()) == whole

    # Leave the process group before exiting: at interpreter shutdown gloo's threads can abort.
    torch.distributed.destroy_process_group()
''')


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]


def _assert_same_weights(folder, reference, what):
    weights = load_file(str(folder / "model.safetensors"))
    expected = load_file(str(reference / "model.safetensors"))
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-5,
                                   msg=lambda m: f"{what}: weight {name}: {m}")


def test_zero3_two_processes_match_one(pair, tmp_path):
    settings = dict(SETTINGS, model=str(pair / "original"),
                    strengthened=str(pair / "strengthened"))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    finetune_settings = dict(model=str(pair / "original"), split="forget10", epochs=1, lr=2e-3,
                             batch_size=8, micro_batch_size=2, max_length=48, progress=False)
    torchrun(script, json.dumps(settings), json.dumps(RUNS), KILL_AFTER, tmp_path,
             json.dumps(finetune_settings))

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, run in RUNS.items():
            unlearn(UnlearnConfig(**{**settings, **run}, out=str(tmp_path / f"single_{name}")))
        finetune(FinetuneConfig(**finetune_settings, out=str(tmp_path / "single_finetune")))
    finally:
        torch.set_num_threads(previous)

    original = load_file(str(pair / "original" / "model.safetensors"))
    single = load_file(str(tmp_path / "single_cache" / "model.safetensors"))
    moved = max((single[k] - original[k]).abs().max().item() for k in original)
    assert moved > 1e-3, "the runs must change the weights for the comparison to mean anything"

    for name in (*RUNS, "finetune"):
        folder = tmp_path / name
        record = json.loads((folder / "run.json").read_text())
        assert record["status"] == "finished"
        assert record["strategy"] == "zero3" and record["world_size"] == 2
        _assert_same_weights(folder, tmp_path / f"single_{name}", f"zero3 {name}")
        assert _losses(folder) == pytest.approx(_losses(tmp_path / f"single_{name}"), rel=1e-5)
    assert (tmp_path / "cache" / "checkpoints" / "step-6" / "zero3").is_dir()

    # The resumed run: continued from step 2 (step 3 was lost), and equal to the whole run.
    resumed = tmp_path / "resumed"
    stats = json.loads((resumed / "run.json").read_text())["stats"]
    assert stats["resumed_from_step"] == 2
    steps = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    _assert_same_weights(resumed, tmp_path / "cache", "resumed zero3 run")
    assert _losses(resumed) == pytest.approx(_losses(tmp_path / "cache"), rel=1e-6)


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "stage 2"),
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "offloading is not supported"),
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "nvme"}, "offloading is not supported"),
    ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, "remove deepspeed_config_file"),
])
def test_unsupported_accelerate_deepspeed_settings_are_refused(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        _check_accelerate_deepspeed_env()


@pytest.mark.parametrize("change, message", [
    (dict(lora=True), "--lora under DeepSpeed ZeRO-3"),
    (dict(), "--eval-every-epoch"),
])
def test_zero3_refuses_lora_and_epoch_callbacks(change, message):
    cfg = UnlearnConfig(model="m", strengthened="s", out="o", **change)
    callback = None if change else (lambda *args: None)
    with pytest.raises(ValueError, match=message):
        _check_strategy(cfg, DistInfo(world_size=2, strategy="zero3"), callback)
    _check_strategy(cfg, DistInfo(world_size=2, strategy="fsdp"), callback)   # no error


def test_zero3_config_follows_the_options():
    info = DistInfo(world_size=2, strategy="zero3")
    zero3_setup(info, "bfloat16", micro_batch_size=4, max_grad_norm=0.5)
    assert info.ds_config["zero_optimization"]["stage"] == 3
    assert info.ds_config["bf16"] == {"enabled": True}          # fp32 master weights
    assert info.ds_config["train_micro_batch_size_per_gpu"] == 4
    assert info.ds_config["gradient_clipping"] == 0.5
    assert info.ds_config["gradient_accumulation_steps"] == 1    # the loop accumulates
    zero3_setup(info, "torch.float32", 1, 1.0)
    assert info.ds_config["bf16"] == {"enabled": False}
    with pytest.raises(ValueError, match="float16 is not supported under DeepSpeed ZeRO-3"):
        zero3_setup(info, "float16", 1, 1.0)
    other = DistInfo(world_size=2, strategy="fsdp")
    zero3_setup(other, "float16", 1, 1.0)                     # other strategies: nothing
    assert other.ds_config == {}


def test_zero3_needs_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="--parallel zero3 needs several processes"):
        init_distributed("zero3")
