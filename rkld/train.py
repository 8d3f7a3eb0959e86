"""The training stages: finetune, strengthen, unlearn. One loop, three objectives.

Public API (each returns ``(output_dir, stats)``):
    finetune(FinetuneConfig, on_epoch_end=None, on_step=None)
        next-token NLL on the answers of ``cfg.split`` (the benchmark's target / retain models)
    strengthen(StrengthenConfig, on_epoch_end=None, on_step=None)
        the same NLL on the forget set: the strengthened model m_g
    unlearn(UnlearnConfig, on_epoch_end=None, on_step=None)
        RKLD (default; teachers from the on-disk cache unless ``live_teachers``), its forward-KL
        ablation, or gradient ascent, optionally with a retain term (+RT / +KL)

Callbacks: ``on_step(step, record)`` after every optimizer step (``record`` is the log line:
step, epoch, loss, lr, tokens/s, ...); ``on_epoch_end(epoch, model, tokenizer, stats)`` after
every epoch (epoch counts from 1), with the Hugging Face model in eval mode (it is put back into
train mode afterwards). Both run on every process.

The loop, once per optimizer step:
- the step's examples (``batch_size`` of them, from a permutation seeded by seed and epoch) are
  dealt to the processes and cut into micro-batches; every process runs the same number of
  micro-batches (a process short of examples runs a copy with weight 0), as DDP and FSDP need;
- the supervised tokens of the whole step are counted over all micro-batches and processes
  first, and every micro-batch's summed loss is divided by that count, so an update does not
  depend on the number of processes or on the micro-batch size;
- gradients are synchronised on the last micro-batch only; then clipping, the learning rate of
  the schedule (linear warm-up over ``warmup_epochs``, then linear decay) and an AdamW step.

Outputs in ``cfg.out``: the model (``save_pretrained``, LoRA adapters merged), ``run.json``
(stage, config, versions, data fingerprints, stats, status), ``log.jsonl`` (one line per step),
``checkpoints/`` (written atomically at every epoch end and every ``save_every`` steps; the
newest is named in ``checkpoints/latest.json``) and, for unlearning, ``teacher_cache/``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
import warnings
from pathlib import Path

import torch

from . import __version__
from .config import FinetuneConfig, RunConfig, StrengthenConfig, UnlearnConfig
from .data import FORGET_SPLITS, collate, encode_records, load_benchmark, retain_split_for
from .models import (
    build_tiny_model,
    check_config_logits,
    check_logits_are_linear,
    check_same_vocabulary,
    final_hidden,
    load_model,
    supervised_positions,
    unwrap_model,
)
from .parallel import (
    DistInfo,
    all_reduce_sum,
    backward,
    barrier,
    broadcast_object,
    full_shape,
    gradient_sync,
    head_runner,
    init_distributed,
    shard_frozen,
    wrap_model,
    zero3_engine,
    zero3_loading,
    zero3_setup,
)
from .teacher_cache import LiveTeachers, TeacherCache, supervised_count

RUN_RECORD = "run.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
SINGLE_PROCESS_STATE = "state.pt"
ZERO3_TAG = "zero3"      # the folder DeepSpeed's save_checkpoint writes its partitions into
NLL_CHUNK = 4096   # rows of logits alive at once in the NLL (with recomputation in backward)


# --------------------------------------------------------------------------- public stages

def finetune(cfg: FinetuneConfig, on_epoch_end=None, on_step=None):
    """Train ``cfg.model`` on the answers of ``cfg.split``; returns ``(out_dir, stats)``."""
    return _nll_stage(cfg, "finetune", cfg.split, on_epoch_end, on_step)


def strengthen(cfg: StrengthenConfig, on_epoch_end=None, on_step=None):
    """Continue training ``cfg.model`` on ``cfg.forget``; returns ``(out_dir, stats)``."""
    return _nll_stage(cfg, "strengthen", cfg.forget, on_epoch_end, on_step)


def unlearn(cfg: UnlearnConfig, on_epoch_end=None, on_step=None):
    """Unlearn ``cfg.forget`` from ``cfg.model``; returns ``(out_dir, stats)``."""
    cfg.validate()
    info = init_distributed(cfg.parallel)
    _check_strategy(cfg, info, on_epoch_end)
    bench = load_benchmark(cfg.data, seed=cfg.seed, max_authors=cfg.max_authors)
    forget_rows = _split_rows(bench, cfg.forget, "forget set")
    retain_split = None
    if cfg.retain_term != "none":
        retain_split = retain_split_for(cfg.forget) if cfg.forget in FORGET_SPLITS else None
        if retain_split is None or retain_split not in bench.splits:
            raise ValueError(f"--retain-term {cfg.retain_term} needs the retain split of "
                             f"{cfg.forget!r}, which benchmark {bench.name!r} does not have")
    out = _check_output(cfg, "unlearn", info)
    # Cheap checks before any model is loaded: tokenizers and vocabularies must agree.
    tokenizer = _load_tokenizer(cfg.model, "the original model")
    if cfg.method == "rkld":
        strengthened_tokenizer = _load_tokenizer(cfg.strengthened, "the strengthened model")
        check_same_vocabulary(tokenizer, strengthened_tokenizer,
                              f"the original model ({cfg.model})",
                              f"the strengthened model ({cfg.strengthened})")
        _check_same_vocab_size(cfg.model, cfg.strengthened)
    else:
        _precheck_model(cfg.model, "the original model")
    zero3_setup(info, _weights_dtype(cfg), cfg.micro_batch_size, cfg.max_grad_norm)
    examples = _encode(tokenizer, forget_rows, cfg, cfg.forget)
    retain_examples = None
    if retain_split is not None:
        retain_rows = _split_rows(bench, retain_split, "retain set")
        retain_examples = _paired_retain(_encode(tokenizer, retain_rows, cfg, retain_split),
                                         len(examples), cfg.seed)
    fingerprints = {cfg.forget: bench.fingerprint(cfg.forget)}
    if retain_split is not None:
        fingerprints[retain_split] = bench.fingerprint(retain_split)
    _start_run(out, cfg, "unlearn", info, fingerprints)

    teachers = retain_teachers = None
    teacher_names = ("original", "strengthened") if cfg.method == "rkld" else ()
    if cfg.retain_term == "kl" or teacher_names:
        loaders = {"original": lambda: _load_checked(cfg.model, cfg.dtype, info),
                   "strengthened": lambda: _load_checked(cfg.strengthened, cfg.dtype, info)}
        if cfg.live_teachers:
            needed = set(teacher_names) | ({"original"} if cfg.retain_term == "kl" else set())
            live = {name: shard_frozen(loaders[name](), info) for name in sorted(needed)}
            teachers = retain_teachers = LiveTeachers(live)
        else:
            key = {"original": str(cfg.model), "strengthened": str(cfg.strengthened),
                   "max_length": cfg.max_length, "template": cfg.template,
                   "dtype": cfg.dtype, "data": fingerprints}
            if teacher_names:
                teachers = _teacher_cache(out / "teacher_cache" / "forget", examples,
                                          {n: loaders[n] for n in teacher_names}, key, cfg, info,
                                          tokenizer.pad_token_id)
            if cfg.retain_term == "kl":
                retain_teachers = _teacher_cache(out / "teacher_cache" / "retain",
                                                 retain_examples, {"original": loaders["original"]},
                                                 key, cfg, info, tokenizer.pad_token_id)
    model = _load_student(cfg, info, tokenizer)
    objective = _UnlearnObjective(cfg, teachers, retain_teachers)
    stats = _train(cfg, "unlearn", model, tokenizer, examples, retain_examples, objective, info,
                   out, on_epoch_end, on_step)
    return out, stats


# --------------------------------------------------------------------------- objectives

def token_nll_sum(hidden_rows: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor,
                  chunk: int = NLL_CHUNK) -> torch.Tensor:
    """Summed next-token NLL of ``hidden_rows @ weight.T + bias`` against ``targets`` (float32).

    Beyond ``chunk`` rows, each chunk's logits are recomputed in backward instead of being
    kept, so memory holds one ``[chunk, V]`` block, not ``[rows, V]``.
    """
    def chunk_nll(rows, w, b, t):
        logits = torch.nn.functional.linear(rows, w, b).float()
        return torch.nn.functional.cross_entropy(logits, t, reduction="sum")

    if hidden_rows.shape[0] <= chunk:
        return chunk_nll(hidden_rows, weight, bias, targets)
    from torch.utils.checkpoint import checkpoint
    total = hidden_rows.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden_rows.shape[0], chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(chunk_nll, hidden_rows[part], weight, bias, targets[part],
                                   use_reentrant=False)
    return total


def _student_rows(model, batch):
    """The student's final hidden states at the supervised positions, their targets, and
    ``head(fn, *tensors)``, which calls ``fn(weight, bias, *tensors)`` with the lm_head's
    parameters whole (under FSDP2 the root's parameters are unsharded after the forward; under
    ZeRO-3 the call runs inside a module forward that gathers them)."""
    hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"])
    rows, targets = supervised_positions(hidden, batch["labels"])
    return rows, targets, head_runner(model)


def _nll(weight, bias, rows, targets):
    return token_nll_sum(rows, weight, bias, targets)


class _NLLObjective:
    """Next-token NLL of the answers (finetune and strengthen)."""
    retain = False

    def __call__(self, model, indices, batch, retain_indices, retain_batch):
        rows, targets, head = _student_rows(model, batch)
        return head(_nll, rows, targets), None


class _UnlearnObjective:
    """RKLD (reverse or forward KL to the unlearning teacher) or gradient ascent, on the forget
    batch; plus the retain term on the paired retain batch."""

    def __init__(self, cfg: UnlearnConfig, teachers, retain_teachers):
        self.cfg = cfg
        self.teachers = teachers
        self.retain_teachers = retain_teachers
        self.retain = cfg.retain_term != "none"

    def __call__(self, model, indices, batch, retain_indices, retain_batch):
        from rkld_kernels import fused_linear_rkl_loss
        cfg = self.cfg
        rows, targets, head = _student_rows(model, batch)
        if cfg.method == "ga":
            forget_sum = -head(_nll, rows, targets)
        else:
            original_w, original_b = self.teachers.head("original")
            strengthened_w, strengthened_b = self.teachers.head("strengthened")
            original_rows = self.teachers.rows("original", indices, batch)
            strengthened_rows = self.teachers.rows("strengthened", indices, batch)

            def rkld(weight, bias, rows):
                return fused_linear_rkl_loss(
                    rows, weight, original_rows, original_w, strengthened_rows, strengthened_w,
                    student_bias=bias, original_bias=original_b,
                    strengthened_bias=strengthened_b, alpha=cfg.alpha,
                    temperature=cfg.temperature, direction=cfg.direction, reduction="sum",
                    chunk_size=cfg.chunk_size, backend=cfg.backend)
            forget_sum = head(rkld, rows)
        if not self.retain:
            return forget_sum, None
        retain_rows, retain_targets, head = _student_rows(model, retain_batch)
        if cfg.retain_term == "nll":
            retain_sum = head(_nll, retain_rows, retain_targets)
        else:   # forward KL to the original model: plain distillation, no strengthened teacher
            original_w, original_b = self.retain_teachers.head("original")
            teacher_rows = self.retain_teachers.rows("original", retain_indices, retain_batch)

            def distil(weight, bias, rows):
                return fused_linear_rkl_loss(
                    rows, weight, teacher_rows, original_w, student_bias=bias,
                    original_bias=original_b, temperature=cfg.temperature, direction="forward",
                    reduction="sum", chunk_size=cfg.chunk_size, backend=cfg.backend)
            retain_sum = head(distil, retain_rows)
        return forget_sum, retain_sum


# --------------------------------------------------------------------------- setup helpers

def _nll_stage(cfg: RunConfig, stage: str, split: str, on_epoch_end, on_step):
    cfg.validate()
    info = init_distributed(cfg.parallel)
    _check_strategy(cfg, info, on_epoch_end)
    bench = load_benchmark(cfg.data, seed=cfg.seed, max_authors=cfg.max_authors)
    rows = _split_rows(bench, split, "training split" if stage == "finetune" else "forget set")
    out = _check_output(cfg, stage, info)
    if cfg.model == "tiny":
        texts = _benchmark_texts(bench)
        model, tokenizer = build_tiny_model(texts, seed=cfg.seed, **cfg.tiny)
        if cfg.dtype is not None:
            model.to(getattr(torch, cfg.dtype))
    else:
        tokenizer = _load_tokenizer(cfg.model)
        _precheck_model(cfg.model, "the model")
        model = None
    zero3_setup(info, _weights_dtype(cfg), cfg.micro_batch_size, cfg.max_grad_norm)
    examples = _encode(tokenizer, rows, cfg, split)
    _start_run(out, cfg, stage, info, {split: bench.fingerprint(split)})
    model = _load_student(cfg, info, tokenizer, model)
    stats = _train(cfg, stage, model, tokenizer, examples, None, _NLLObjective(), info, out,
                   on_epoch_end, on_step)
    return out, stats


def _check_strategy(cfg: RunConfig, info: DistInfo, on_epoch_end) -> None:
    """Refuse combinations a strategy does not support, before any work starts."""
    if info.strategy == "zero3":
        if cfg.lora:
            raise ValueError("--lora under DeepSpeed ZeRO-3 is not supported; LoRA's trainable "
                             "state is small, so use DDP (or a single process) for LoRA runs")
        if on_epoch_end is not None:
            raise ValueError("per-epoch callbacks (--eval-every-epoch) are not supported under "
                             "DeepSpeed ZeRO-3, where no process holds the whole model; use "
                             "FSDP2, or evaluate the saved model with rkld eval")


def _weights_dtype(cfg: RunConfig) -> str:
    """The dtype the student trains in: --dtype, else the saved one (float32 for tiny)."""
    if cfg.dtype is not None or cfg.model == "tiny":
        return cfg.dtype or "float32"
    config = _precheck_model(cfg.model, "the model")
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype or "float32").removeprefix("torch.")


def _split_rows(bench, split: str, what: str) -> list:
    try:
        rows = bench.split(split)
    except KeyError as err:
        raise ValueError(f"{what} {split!r}: {err.args[0]}") from None
    if not rows:
        raise ValueError(f"{what} {split!r} of benchmark {bench.name!r} is empty")
    return rows


def _benchmark_texts(bench) -> list:
    """All text of a benchmark, for training the tiny model's tokenizer. Every split takes part,
    so target and retain models built from the same benchmark share one tokenizer."""
    texts = []
    for name in bench.splits:
        for row in bench.split(name):
            for key in ("text", "question", "answer", "paraphrased_question", "paraphrased_answer"):
                if isinstance(row.get(key), str):
                    texts.append(row[key])
            texts.extend(a for a in row.get("perturbed_answer", []) if isinstance(a, str))
    return texts


def _encode(tokenizer, rows, cfg: RunConfig, split: str) -> list:
    examples = encode_records(tokenizer, rows, cfg.max_length, cfg.template)
    if not any(supervised_count(e) for e in examples):
        raise ValueError(f"split {split!r}: no example has a supervised token left after "
                         f"truncation to max_length={cfg.max_length}")
    return examples


def _paired_retain(retain_examples: list, count: int, seed: int) -> list:
    """``count`` retain examples drawn once (seeded): forget example i trains with retain
    example i, so the retain batches follow the forget batches' shuffling."""
    generator = torch.Generator().manual_seed(seed + 7919)
    order = torch.randperm(len(retain_examples), generator=generator).tolist()
    return [retain_examples[order[i % len(order)]] for i in range(count)]


def _load_tokenizer(path: str, what: str = "model"):
    from transformers import AutoTokenizer
    local = Path(path).expanduser()
    if local.exists() and not (local / "config.json").exists():
        raise FileNotFoundError(f"{what} {local}: expected a model folder with config.json")
    if not local.exists() and (os.sep in str(path) or str(path).startswith(".")):
        raise FileNotFoundError(f"{what} folder {path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else path)
    except OSError as err:
        raise OSError(f"could not load the tokenizer of {what} {path!r}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _precheck_model(path: str, what: str):
    """The model's config, checked for logit transformations before any weight is loaded."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path)
    check_config_logits(config, f"{what} ({path})")
    return config


def _check_same_vocab_size(path_a: str, path_b: str) -> None:
    size_a = _precheck_model(path_a, "the original model").vocab_size
    size_b = _precheck_model(path_b, "the strengthened model").vocab_size
    if size_a != size_b:
        raise ValueError(f"the original model ({path_a}) and the strengthened model ({path_b}) "
                         f"must have one vocabulary; their lm_heads have {size_a} and {size_b} "
                         f"rows")


def _load_checked(path: str, dtype, info: DistInfo):
    """A frozen teacher, checked to have linear logits; under ZeRO-3 loaded partitioned and
    returned as a DeepSpeed inference engine."""
    with zero3_loading(info):
        model, _ = load_model(path, dtype=dtype)
    if info.strategy == "zero3":
        model = shard_frozen(model, info)
        check_logits_are_linear(model)     # a forward through the engine: after wrapping
        return model
    check_logits_are_linear(model)
    return model.to(info.device)


def _load_student(cfg: RunConfig, info: DistInfo, tokenizer, model=None):
    if model is None:
        with zero3_loading(info):
            model, _ = load_model(cfg.model, dtype=cfg.dtype)
        rows = full_shape(model.get_output_embeddings().weight)[0]
        if len(tokenizer) > rows:
            raise ValueError(f"{cfg.model}: the tokenizer has {len(tokenizer)} tokens but the "
                             f"lm_head only {rows} rows")
    if info.strategy != "zero3":    # under ZeRO-3 once the engine exists (a forward is needed)
        check_logits_are_linear(model)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):      # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if cfg.lora:
        if info.strategy == "fsdp":
            raise ValueError("--lora with FSDP is not supported; LoRA's trainable state is small, "
                             "so use DDP (or a single process) for LoRA runs")
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError("--lora needs peft: pip install 'rkld[lora]'") from None
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=0.0, target_modules="all-linear"))
    if info.strategy != "zero3":      # the engine places (and partitions) the model itself
        model.to(info.device)
    model.train()
    return wrap_model(model, info)


# --------------------------------------------------------------------------- output folder

def _check_output(cfg: RunConfig, stage: str, info: DistInfo) -> Path:
    """Refuse output folders that would lose or mix results; change nothing on disk.

    Only the main process looks at the folder, and every process raises what it found: the
    processes of one launch reach this point at different times, and a process that looked
    after the main one had written ``run.json`` (in ``_start_run``) would see its own launch's
    run as an unfinished one and refuse it."""
    out = Path(cfg.out).expanduser()
    error = None
    if info.is_main:
        try:
            _refuse_output(out, cfg, stage)
        except (FileExistsError, ValueError) as exc:
            error = exc
    error = broadcast_object(error, info)
    if error is not None:
        raise error
    return out


def _refuse_output(out: Path, cfg: RunConfig, stage: str) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; expected a folder")
    record = out / RUN_RECORD
    if out.exists() and any(out.iterdir()):
        if not record.exists():
            raise FileExistsError(f"--out {out} is not empty and holds no rkld run ({RUN_RECORD});"
                                  f" choose a new or empty folder")
        previous = json.loads(record.read_text())
        if previous.get("status") == "finished" and not cfg.overwrite:
            raise FileExistsError(f"--out {out} already holds a finished {previous.get('stage')} "
                                  f"run; pass --overwrite to replace it")
        if previous.get("status") != "finished" and not (cfg.resume or cfg.overwrite):
            raise FileExistsError(f"--out {out} holds an unfinished {previous.get('stage')} run; "
                                  f"pass --resume to continue it or --overwrite to restart")
        if cfg.resume and previous.get("stage") != stage:
            raise ValueError(f"--resume: {out} holds a {previous.get('stage')} run, not {stage}")


def _versions() -> dict:
    import tokenizers
    import transformers
    versions = {"rkld": __version__, "python": platform.python_version(),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__}
    try:
        import peft
        versions["peft"] = peft.__version__
    except ImportError:
        pass
    return versions


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def _start_run(out: Path, cfg: RunConfig, stage: str, info: DistInfo, fingerprints: dict):
    """Clear the folder if asked (only now that every check has passed), write run.json."""
    if info.is_main:
        if cfg.overwrite and (out / RUN_RECORD).exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        record = out / RUN_RECORD
        previous = json.loads(record.read_text()) if record.exists() else {}
        _write_json(record, {"stage": stage, "status": "running", "config": cfg.to_dict(),
                             "versions": _versions(), "data": fingerprints,
                             "world_size": info.world_size, "strategy": info.strategy,
                             "started": previous.get("started", _now())})
    barrier(info)


def _teacher_cache(folder: Path, examples, loaders: dict, key: dict, cfg, info, pad_token_id):
    cache = TeacherCache.open(folder, key, info.device) if cfg.resume else None
    if cache is None:
        cache = TeacherCache.build(folder, examples, loaders, key, cfg.micro_batch_size,
                                   pad_token_id, info, progress=cfg.progress)
    return cache


# --------------------------------------------------------------------------- checkpoints

def _save_checkpoint(out: Path, model, optimizer, step: int, info: DistInfo) -> None:
    """Write checkpoints/step-N atomically: into a temporary folder, renamed when complete;
    ``latest.json`` is replaced last, so a crash at any point leaves the previous one usable."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    root = out / CHECKPOINTS
    tmp = root / f".tmp-step-{step}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    if info.strategy == "zero3":     # each process writes its partitions of weights and states
        model.save_checkpoint(str(tmp), tag=ZERO3_TAG, save_latest=False)
    else:
        model_state, optim_state = get_state_dict(
            model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        if info.distributed:
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        else:   # one file: much faster than the distributed format's coordination
            torch.save({"model": model_state, "optim": optim_state}, tmp / SINGLE_PROCESS_STATE)
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if info.device.type == "cuda" else None},
               tmp / f"rng.rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        final = root / f"step-{step}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_json(root / "latest.json", {"step": step, "dir": final.name,
                                           "strategy": info.strategy,
                                           "world_size": info.world_size})
        for old in root.glob("step-*"):
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
    barrier(info)


def _load_checkpoint(out: Path, model, optimizer, info: DistInfo) -> int:
    """Restore the newest checkpoint; return its step (0 when there is none)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )
    latest = out / CHECKPOINTS / "latest.json"
    if not latest.exists():
        return 0
    pointer = json.loads(latest.read_text())
    folder = out / CHECKPOINTS / pointer["dir"]
    zero3 = (folder / ZERO3_TAG).is_dir()
    if zero3 != (info.strategy == "zero3"):
        raise ValueError(f"{folder} was written " + ("under" if zero3 else "without")
                         + " DeepSpeed ZeRO-3; resume it " + ("under ZeRO-3" if zero3 else
                                                             "with DDP, FSDP2 or one process"))
    if zero3:
        if pointer.get("world_size") != info.world_size:
            raise ValueError(f"{folder} holds ZeRO-3 partitions of {pointer.get('world_size')} "
                             f"processes; resume it with that many (this run has "
                             f"{info.world_size})")
        loaded, _ = model.load_checkpoint(str(folder), tag=ZERO3_TAG)
        if loaded is None:
            raise FileNotFoundError(f"{folder / ZERO3_TAG}: DeepSpeed found no checkpoint there")
        _load_rng(folder, info)
        return int(pointer["step"])
    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state}
    single = folder / SINGLE_PROCESS_STATE
    if single.exists():
        if info.distributed:
            raise ValueError(f"{folder} was written by a single process; resume it with one "
                             f"process (checkpoints of multi-process runs reshard freely)")
        state = torch.load(single, weights_only=True)
    elif not info.distributed:
        with warnings.catch_warnings():
            # A single process reads a multi-process checkpoint without a process group.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(folder))
    else:
        dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=options)
    _load_rng(folder, info)
    return int(pointer["step"])


def _load_rng(folder: Path, info: DistInfo) -> None:
    rng_file = folder / f"rng.rank{info.rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and info.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])


def _save_final(out: Path, model, tokenizer, info: DistInfo) -> None:
    """Save the trained model (LoRA adapters merged) with its tokenizer, for the next stage."""
    if info.strategy == "zero3":
        state = _zero3_full_state(unwrap_model(model), info)
        if info.is_main:
            unwrap_model(model).save_pretrained(out, state_dict=state)
    elif info.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
        if info.is_main:
            unwrap_model(model).save_pretrained(out, state_dict=state)
    elif info.is_main:
        hf_model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) \
            else model
        if hasattr(hf_model, "merge_and_unload"):
            hf_model = hf_model.merge_and_unload()
        hf_model.save_pretrained(out)
    if info.is_main:
        tokenizer.save_pretrained(out)
    barrier(info)


def _zero3_full_state(hf_model, info: DistInfo) -> dict | None:
    """The whole state dict on the main process (None elsewhere), gathered one ZeRO-3
    parameter at a time so that no process holds more than one extra parameter on the
    accelerator."""
    import deepspeed
    state = {}
    for name, param in hf_model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            if info.is_main:
                state[name] = param.detach().cpu().clone()
    if not info.is_main:
        return None
    for name, value in hf_model.state_dict(keep_vars=True).items():     # persistent buffers
        if not isinstance(value, torch.nn.Parameter):
            state[name] = value.detach().cpu().clone()
    return state


# --------------------------------------------------------------------------- the loop

def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to the full rate over ``warmup`` steps, then linear decay towards 0."""
    if step < warmup:
        return (step + 1) / warmup
    return (total - step) / max(1, total - warmup)


def _epoch_order(n: int, seed: int, epoch: int) -> list:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _micro_batches(step_indices: list, micro: int, info: DistInfo) -> list:
    """This process's share of a step, as micro-batches; every process gets the same count
    (an empty list marks a padding micro-batch)."""
    mine = step_indices[info.rank::info.world_size]
    per_process = math.ceil(len(step_indices) / info.world_size)
    count = math.ceil(per_process / micro)
    return [mine[i * micro:(i + 1) * micro] for i in range(count)]


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class TrainData:
    """The examples of a run with their token counts (and the paired retain examples)."""

    def __init__(self, examples: list, retain_examples: list | None, pad_token_id: int):
        self.examples = examples
        self.retain_examples = retain_examples
        self.pad_token_id = pad_token_id
        self.forget_tokens = [supervised_count(e) for e in examples]
        self.retain_tokens = [supervised_count(e) for e in retain_examples or []]
        self.input_tokens = [len(e["input_ids"]) for e in examples]

    def batch(self, indices: list, device, retain: bool = False) -> dict:
        source = self.retain_examples if retain else self.examples
        return _to_device(collate([source[i] for i in indices], self.pad_token_id), device)


def step_gradients(model, objective, data: TrainData, step_indices: list,
                   micro_batch_size: int, info: DistInfo):
    """Forward and backward passes of one optimizer step; gradients accumulate in ``.grad``.

    ``step_indices`` are the step's examples over all processes. The supervised tokens of all
    of them are counted first (one all-reduce) and every micro-batch's summed loss is divided
    by that count, so the gradient is the same for any micro-batch size and process count.
    Returns ``(loss, supervised_tokens, input_tokens)`` of the whole step.
    """
    micro_batches = _micro_batches(step_indices, micro_batch_size, info)
    mine = [i for mb in micro_batches for i in mb]
    n_forget, n_retain, n_input = all_reduce_sum(
        [sum(data.forget_tokens[i] for i in mine),
         sum(data.retain_tokens[i] for i in mine) if data.retain_examples else 0,
         sum(data.input_tokens[i] for i in mine)], info)
    local_loss = 0.0
    for j, indices in enumerate(micro_batches):
        # A process short of examples runs a copy of one with weight 0, so that every process
        # takes part in the same collective operations.
        weight = 1.0 if indices else 0.0
        indices = indices or step_indices[:1]
        batch = data.batch(indices, info.device)
        retain_batch = data.batch(indices, info.device, retain=True) \
            if data.retain_examples is not None else None
        with gradient_sync(model, info, enabled=j == len(micro_batches) - 1):
            forget_sum, retain_sum = objective(model, indices, batch, indices, retain_batch)
            loss = forget_sum / max(n_forget, 1)
            if retain_sum is not None:
                loss = loss + retain_sum / max(n_retain, 1)
            # DDP, FSDP and ZeRO-3 average gradients over processes; the factor makes that a sum.
            backward(model, loss * (weight * info.world_size), info)
        local_loss += weight * loss.item()
    return all_reduce_sum([local_loss], info)[0], n_forget, n_input


def _train(cfg: RunConfig, stage: str, model, tokenizer, examples, retain_examples, objective,
           info: DistInfo, out: Path, on_epoch_end, on_step) -> dict:
    pad = tokenizer.pad_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if len(full_shape(p)) >= 2]
    no_decay = [p for p in trainable if len(full_shape(p)) < 2]
    # The fused AdamW is several times faster than the per-tensor loop (also on CPU); FSDP2's
    # sharded DTensor parameters and ZeRO-3's flat partitions take the default implementation.
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                  fused=info.strategy not in ("fsdp", "zero3") or None)
    if info.strategy == "zero3":
        model, optimizer = zero3_engine(model, optimizer, info)
        check_logits_are_linear(model)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    data = TrainData(examples, retain_examples, pad)

    step = _load_checkpoint(out, model, optimizer, info) if cfg.resume else 0
    log_path = out / LOG_FILE
    if info.is_main:
        kept = []
        if step and log_path.exists():
            kept = [line for line in log_path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= step]
        log_path.write_text("".join(line + "\n" for line in kept))
    progress = None
    if cfg.progress and info.is_main:
        from tqdm.auto import tqdm
        progress = tqdm(total=total_steps, initial=step, desc=stage, unit="step")

    stats = {"stage": stage, "steps": total_steps, "epochs": cfg.epochs,
             "examples": len(examples), "resumed_from_step": step, "world_size": info.world_size}
    train_seconds, train_tokens, last_loss = 0.0, 0, float("nan")
    epoch_losses = []
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        order = _epoch_order(len(examples), cfg.seed, epoch)
        epoch_loss_sum, epoch_steps = 0.0, 0
        for step_in_epoch in range(step % steps_per_epoch if epoch == step // steps_per_epoch
                                   else 0, steps_per_epoch):
            started = time.perf_counter()
            first = step_in_epoch * cfg.batch_size
            step_indices = order[first:first + cfg.batch_size]
            step_loss, n_forget, n_input = step_gradients(model, objective, data, step_indices,
                                                          cfg.micro_batch_size, info)
            lr = cfg.lr * _lr_factor(step, warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if info.strategy == "zero3":    # clips (gradient_clipping), steps and zeroes
                model.step()
            else:
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - started
            train_seconds += elapsed
            train_tokens += int(n_input)
            last_loss = step_loss
            epoch_loss_sum += step_loss
            epoch_steps += 1
            record = {"step": step, "epoch": epoch + 1, "loss": step_loss, "lr": lr,
                      "supervised_tokens": int(n_forget), "input_tokens": int(n_input),
                      "seconds": elapsed, "tokens_per_s": n_input / elapsed}
            if info.is_main:
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{n_input / elapsed:.0f}")
            if on_step is not None:
                on_step(step, record)
            if cfg.save_every and step % cfg.save_every == 0 and step % steps_per_epoch:
                _save_checkpoint(out, model, optimizer, step, info)
        _save_checkpoint(out, model, optimizer, step, info)
        epoch_losses.append(epoch_loss_sum / max(epoch_steps, 1))
        if on_epoch_end is not None:
            hf_model = unwrap_model(model)
            hf_model.eval()
            try:
                on_epoch_end(epoch + 1, hf_model, tokenizer,
                             dict(stats, epoch_loss=epoch_losses[-1]))
            finally:
                hf_model.train()
    if progress is not None:
        progress.close()
    stats.update(final_loss=last_loss, epoch_losses=epoch_losses, train_seconds=train_seconds,
                 tokens_per_s=train_tokens / train_seconds if train_seconds else float("nan"))
    _save_final(out, model, tokenizer, info)
    if info.is_main:
        record = json.loads((out / RUN_RECORD).read_text())
        record.update(status="finished", stats=stats,
                      finished=_now())
        _write_json(out / RUN_RECORD, record)
    stats = broadcast_object(stats, info)
    return stats
