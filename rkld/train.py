"""The training stages: finetune, strengthen, unlearn. One loop, three objectives.

Public API (each returns ``(output_dir, stats)``):
    finetune(FinetuneConfig, on_epoch_end=None, on_step=None)
        next-token NLL on the answers of ``cfg.split`` (the benchmark's target / retain models)
    strengthen(StrengthenConfig, on_epoch_end=None, on_step=None)
        the same NLL on the forget set: the strengthened model m_g
    unlearn(UnlearnConfig, on_epoch_end=None, on_step=None)
        RKLD (default; teachers from the on-disk cache unless ``live_teachers``; the teacher's
        boost on raw logits as in the paper, or on log-probabilities with
        ``teacher_boost="logprobs"``, an extension), its forward-KL ablation, gradient ascent,
        GradDiff or NPO, optionally with a retain term (+RT / +KL), optionally stopped by the
        held-out rule (``stop_at_holdout``, rkld.stopping)
    TrainingDiverged                   raised when a loss or gradient norm is not finite

Callbacks: ``on_step(step, record)`` after every optimizer step (``record`` is the log line:
step, epoch, loss, lr, tokens/s, ...); ``on_epoch_end(epoch, model, tokenizer, stats)`` after
every epoch (epoch counts from 1), with the Hugging Face model in eval mode (it is put back into
train mode afterwards). Both run on every process. An epoch-end callback that a crash
interrupted runs again for that epoch when the run is resumed.

The loop, once per optimizer step:
- the step's examples (``batch_size`` of them, from a permutation seeded by seed and epoch) are
  dealt to the processes and cut into micro-batches; every process runs the same number of
  micro-batches (a process short of examples runs a copy with weight 0), as DDP and FSDP need;
- the supervised tokens of the whole step are counted over all micro-batches and processes
  first, and every micro-batch's summed loss is divided by that count, so an update does not
  depend on the number of processes or on the micro-batch size;
- gradients are synchronised on the last micro-batch only; then clipping, the learning rate of
  the schedule (linear warm-up over ``warmup_epochs``, then linear decay) and an AdamW step.
  A non-finite loss or gradient norm stops the run (``TrainingDiverged``; status "failed";
  the last good checkpoint is kept).
What differs between one process, DDP, FSDP2 and ZeRO-3 is behind :mod:`rkld.strategies`;
the output folder (checks, lock, overwrite, resume, run record, checkpoints) is
:mod:`rkld.runs`.

Outputs in ``cfg.out``: the model (``save_pretrained``, LoRA adapters merged), ``run.json``
(stage, config, versions, content fingerprints of the models and data, stats, status),
``log.jsonl`` (one line per step), ``checkpoints/`` (written atomically at every epoch end and
every ``save_every`` steps, with a ``manifest.json`` of checksums; the newest is named in
``checkpoints/latest.json``) and, for unlearning, ``teacher_cache/``. The folder is locked
(``.rkld.lock``) while a run uses it.

Safety: the output folder must be apart from every input; ``overwrite`` moves an old run
aside (``.replaced/``) and deletes it only once the new run has finished; ``resume`` refuses
any change of a setting or input that shapes the result, and a missing checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from .config import FinetuneConfig, RunConfig, StrengthenConfig, UnlearnConfig
from .data import FORGET_SPLITS, collate, encode_records, load_benchmark, retain_split_for
from .models import (
    build_tiny_model,
    check_config_logits,
    check_model_folder,
    check_same_vocabulary,
    final_hidden,
    model_fingerprint,
    remote_code_refused,
    supervised_positions,
    unwrap_model,
)
from .packing import pack_examples, use_document_attention
from .parallel import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    full_shape,
    head_runner,
    init_distributed,
)
from .runs import (
    LOG_FILE,
    RunFolder,
    TrainingDiverged,
    callbacks_done,
    check_output,
    kept_log,
    load_checkpoint,
    save_checkpoint,
)
from .storage import write_error
from .strategies import strategy_for
from .teacher_boost import extend_hidden, extended_weight
from .teacher_cache import LiveTeachers, TeacherCache, supervised_count

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
    strategy = strategy_for(info)
    strategy.check(cfg, on_epoch_end)
    strategy.check_student_options(cfg)
    _check_backend(cfg, info)
    inputs = {"the original model (--model)": cfg.model,
              "the strengthened model (--strengthened)": cfg.strengthened,
              "the data (--data)": cfg.data}
    out = check_output(cfg, "unlearn", inputs, info)
    bench = load_benchmark(cfg.data, seed=cfg.data_seed, max_authors=cfg.max_authors)
    forget_rows = _split_rows(bench, cfg.forget, "forget set")
    retain_split = None
    retain_term = cfg.effective_retain_term
    if retain_term != "none":
        retain_split = retain_split_for(cfg.forget) if cfg.forget in FORGET_SPLITS else None
        if retain_split is None or retain_split not in bench.splits:
            what = "--method graddiff" if cfg.method == "graddiff" else \
                f"--retain-term {retain_term}"
            raise ValueError(f"{what} needs the retain split of "
                             f"{cfg.forget!r}, which benchmark {bench.name!r} does not have")
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
    strategy.configure(_weights_dtype(cfg), cfg.micro_batch_size, cfg.max_grad_norm)
    examples = _encode(tokenizer, forget_rows, cfg, cfg.forget)
    stopper = None
    if cfg.stop_at_holdout:
        from .stopping import HoldoutStop
        stopper = HoldoutStop(bench, cfg.forget, tokenizer, cfg.max_length, cfg.template)
    retain_examples = None
    if retain_split is not None:
        retain_rows = _split_rows(bench, retain_split, "retain set")
        retain_examples = _paired_retain(_encode(tokenizer, retain_rows, cfg, retain_split),
                                         len(examples), cfg.seed)
    fingerprints = {cfg.forget: bench.fingerprint(cfg.forget)}
    if retain_split is not None:
        fingerprints[retain_split] = bench.fingerprint(retain_split)
    models = _model_fingerprints(cfg, info)
    if cfg.method == "rkld" and models.get("strengthened") == models["model"]:
        raise ValueError(f"--strengthened {cfg.strengthened} holds the same files as --model "
                         f"{cfg.model}: the teacher o - alpha * relu(g - o) would be the original "
                         f"model itself, so the loss and its gradient are 0 and nothing is "
                         f"unlearned; expected the model `rkld strengthen` trained from --model")

    with RunFolder(out, cfg, "unlearn", info, fingerprints, models) as run:
        teachers = retain_teachers = None
        teacher_names = {"rkld": ("original", "strengthened"),
                         "npo": ("original",)}.get(cfg.method, ())
        if retain_term == "kl" or teacher_names:
            loaders = {"original": lambda: _packed(cfg, strategy.load_teacher(cfg.model,
                                                                              cfg.dtype)),
                       "strengthened": lambda: _packed(cfg, strategy.load_teacher(
                           cfg.strengthened, cfg.dtype))}
            if cfg.live_teachers:
                needed = set(teacher_names) | ({"original"} if retain_term == "kl" else set())
                live = {name: loaders[name]() for name in sorted(needed)}
                teachers = retain_teachers = LiveTeachers(live)
            else:
                # Content fingerprints, not paths: a model replaced at the same path is new.
                key = {"original": models["model"], "strengthened": models.get("strengthened"),
                       "max_length": cfg.max_length, "template": cfg.template,
                       "dtype": cfg.dtype, "data": fingerprints}
                if teacher_names:
                    # --teacher-boost logprobs: the rows' logsumexps are cached with the states.
                    row_lse = cfg.teacher_boost == "logprobs"
                    forget_key = dict(key, row_lse=True) if row_lse else key
                    teachers = _teacher_cache(out / "teacher_cache" / "forget", examples,
                                              {n: loaders[n] for n in teacher_names},
                                              forget_key, cfg, info, tokenizer.pad_token_id,
                                              row_lse=row_lse)
                if retain_term == "kl":
                    retain_teachers = _teacher_cache(
                        out / "teacher_cache" / "retain", retain_examples,
                        {"original": loaders["original"]}, key, cfg, info,
                        tokenizer.pad_token_id)
        model = _load_student(cfg, strategy, tokenizer)
        objective = _UnlearnObjective(cfg, teachers, retain_teachers)
        stats = _train(cfg, "unlearn", model, tokenizer, examples, retain_examples, objective,
                       strategy, run, on_epoch_end, on_step, stopper=stopper)
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
    hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"],
                          batch.get("position_ids"))
    rows, targets = supervised_positions(hidden, batch["labels"])
    return rows, targets, head_runner(model)


def _nll(weight, bias, rows, targets):
    return token_nll_sum(rows, weight, bias, targets)


def _token_log_probs(rows, weight, bias, targets, chunk: int = NLL_CHUNK) -> torch.Tensor:
    """log p(target) per row of ``rows @ weight.T + bias`` (float32), ``chunk`` rows at once."""
    parts = []
    for start in range(0, rows.shape[0], chunk):
        logits = torch.nn.functional.linear(rows[start:start + chunk], weight, bias).float()
        parts.append(-torch.nn.functional.cross_entropy(logits, targets[start:start + chunk],
                                                        reduction="none"))
    return torch.cat(parts) if parts else rows.new_zeros(0, dtype=torch.float32)


def npo_loss_sum(student_logp: torch.Tensor, reference_logp: torch.Tensor,
                 answer_ids: torch.Tensor, n_answers: int, beta: float) -> torch.Tensor:
    """NPO on whole answers, summed with each answer's token count as its weight.

    ``student_logp`` / ``reference_logp`` are per supervised token, ``answer_ids`` says which
    answer each token belongs to (0 .. n_answers - 1). Per answer,
    ``L = (2 / beta) * softplus(beta * (log pi(a|q) - log pi_ref(a|q)))`` with log pi(a|q) the
    sum over its tokens (NPO's ``-(2/beta) log sigmoid(-beta log(pi / pi_ref))``); the return
    value is ``sum_answers tokens(a) * L(a)``, which the loop divides by the step's supervised
    tokens, i.e. a token-weighted mean over answers (the plain mean when lengths are equal).
    """
    delta = student_logp - reference_logp.to(student_logp.dtype)
    per_answer = torch.zeros(n_answers, dtype=delta.dtype, device=delta.device)
    per_answer = per_answer.index_add(0, answer_ids, delta)
    tokens = torch.bincount(answer_ids, minlength=n_answers).to(delta.dtype)
    loss = (2.0 / beta) * torch.nn.functional.softplus(beta * per_answer)
    return (tokens * loss).sum()


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
        self.retain_term = cfg.effective_retain_term
        self.retain = self.retain_term != "none"
        self._shifted_weight = None     # --teacher-boost logprobs: the strengthened head + shift

    def _strengthened(self, indices, batch, original_rows):
        """The strengthened head's input rows and weight. With ``teacher_boost="logprobs"``
        its logits are shifted per row by ``-(lse_g - lse_o)``, so that the kernels' relu(g - o)
        is relu(log_softmax(g) - log_softmax(o)) (:mod:`rkld.teacher_boost`)."""
        weight, _ = self.teachers.head("strengthened")
        rows = self.teachers.rows("strengthened", indices, batch)
        if self.cfg.teacher_boost == "logits":
            return rows, weight
        shift = (self.teachers.row_lse("strengthened", indices, rows)
                 - self.teachers.row_lse("original", indices, original_rows))
        if self._shifted_weight is None:
            self._shifted_weight = extended_weight(weight)
        return extend_hidden(rows, shift), self._shifted_weight

    def __call__(self, model, indices, batch, retain_indices, retain_batch):
        from rkld_kernels import fused_linear_rkl_loss
        cfg = self.cfg
        rows, targets, head = _student_rows(model, batch)
        if cfg.method in ("ga", "graddiff"):
            forget_sum = -head(_nll, rows, targets)
        elif cfg.method == "npo":
            reference_w, reference_b = self.teachers.head("original")
            reference_rows = self.teachers.rows("original", indices, batch)
            counts = (batch["labels"][:, 1:] != -100).sum(dim=1)
            answer_ids = torch.repeat_interleave(torch.arange(len(counts), device=counts.device),
                                                 counts)
            with torch.no_grad():
                reference_logp = _token_log_probs(reference_rows, reference_w, reference_b,
                                                  targets)

            def npo(weight, bias, rows, targets):
                return npo_loss_sum(_token_log_probs(rows, weight, bias, targets),
                                    reference_logp, answer_ids, len(counts), cfg.npo_beta)
            forget_sum = head(npo, rows, targets)
        else:
            original_w, original_b = self.teachers.head("original")
            strengthened_b = self.teachers.head("strengthened")[1]
            original_rows = self.teachers.rows("original", indices, batch)
            strengthened_rows, strengthened_w = self._strengthened(indices, batch, original_rows)

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
        if self.retain_term == "nll":
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
    strategy = strategy_for(info)
    strategy.check(cfg, on_epoch_end)
    strategy.check_student_options(cfg)
    out = check_output(cfg, stage, {"the model (--model)": cfg.model,
                                     "the data (--data)": cfg.data}, info)
    bench = load_benchmark(cfg.data, seed=cfg.data_seed, max_authors=cfg.max_authors)
    rows = _split_rows(bench, split, "training split" if stage == "finetune" else "forget set")
    if cfg.model == "tiny":
        texts = _benchmark_texts(bench)
        model, tokenizer = build_tiny_model(texts, seed=cfg.seed, **cfg.tiny)
        if cfg.dtype is not None:
            model.to(getattr(torch, cfg.dtype))
    else:
        tokenizer = _load_tokenizer(cfg.model)
        _precheck_model(cfg.model, "the model")
        model = None
    strategy.configure(_weights_dtype(cfg), cfg.micro_batch_size, cfg.max_grad_norm)
    examples = _encode(tokenizer, rows, cfg, split)
    models = _model_fingerprints(cfg, info)
    with RunFolder(out, cfg, stage, info, {split: bench.fingerprint(split)}, models) as run:
        model = _load_student(cfg, strategy, tokenizer, model)
        stats = _train(cfg, stage, model, tokenizer, examples, None, _NLLObjective(), strategy,
                       run, on_epoch_end, on_step)
    return out, stats


def _check_backend(cfg: UnlearnConfig, info: DistInfo) -> None:
    """Refuse ``--backend triton`` where the kernels cannot run (a CPU without Triton's
    interpreter, no triton package) before any model is loaded or teacher cached."""
    uses_fused_loss = cfg.method == "rkld" or cfg.effective_retain_term == "kl"
    if cfg.backend != "triton" or not uses_fused_loss:
        return
    from rkld_kernels.triton_backend import check_triton_usable
    try:
        check_triton_usable(info.device)
    except RuntimeError as err:
        reason = str(err).removeprefix("fused_rkl_loss(backend='triton') ").replace(
            "backend='torch'", "--backend torch")
        raise ValueError(f"--backend triton on {info.device}: {reason}") from None


def _check_strategy(cfg: RunConfig, info: DistInfo, on_epoch_end) -> None:
    """Refuse combinations a strategy does not support, before any work starts."""
    strategy_for(info).check(cfg, on_epoch_end)


def _model_fingerprints(cfg: RunConfig, info: DistInfo) -> dict:
    """Content fingerprints of the run's models (computed on the main process: hashing a large
    model takes a while)."""
    fingerprints = None
    if info.is_main:
        fingerprints = {"model": "tiny" if cfg.model == "tiny" else model_fingerprint(cfg.model)}
        if getattr(cfg, "strengthened", None):
            fingerprints["strengthened"] = model_fingerprint(cfg.strengthened)
    return broadcast_object(fingerprints, info)


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
    if cfg.pack:
        examples = pack_examples(examples, cfg.max_length)
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
    if local.exists():
        check_model_folder(local, what)
    if not local.exists() and (os.sep in str(path) or str(path).startswith(".")):
        raise FileNotFoundError(f"{what} folder {path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else path,
                                                  trust_remote_code=False)
    except ValueError as err:
        if "custom code" not in str(err):
            first = str(err).strip().splitlines()[0] if str(err).strip() else "ValueError"
            raise ValueError(f"could not load the tokenizer of {what} {path}: {first}") from None
        raise ValueError(f"{what} {path}: its tokenizer needs its own code (auto_map), and rkld "
                         f"never runs code shipped with a model") from None
    except OSError as err:
        raise OSError(f"could not load the tokenizer of {what} {path!r}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _precheck_model(path: str, what: str):
    """The model's config, checked for logit transformations before any weight is loaded."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except ValueError as err:
        if "custom code" not in str(err):
            raise
        raise remote_code_refused(f"{what} {path}") from None
    check_config_logits(config, f"{what} ({path})")
    return config


def _check_same_vocab_size(path_a: str, path_b: str) -> None:
    size_a = _precheck_model(path_a, "the original model").vocab_size
    size_b = _precheck_model(path_b, "the strengthened model").vocab_size
    if size_a != size_b:
        raise ValueError(f"the original model ({path_a}) and the strengthened model ({path_b}) "
                         f"must have one vocabulary; their lm_heads have {size_a} and {size_b} "
                         f"rows")


def _load_student(cfg: RunConfig, strategy, tokenizer, model=None):
    if model is None:
        model = strategy.load_student(cfg.model, cfg.dtype)
        rows = full_shape(model.get_output_embeddings().weight)[0]
        if len(tokenizer) > rows:
            raise ValueError(f"{cfg.model}: the tokenizer has {len(tokenizer)} tokens but the "
                             f"lm_head only {rows} rows")
    model.config.use_cache = False
    _packed(cfg, model)
    if cfg.gradient_checkpointing:
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):      # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if cfg.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError("--lora needs peft: pip install 'rkld[lora]'") from None
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=0.0, target_modules="all-linear"))
    model = strategy.prepare_student(model)
    model.train()
    return model


def _packed(cfg: RunConfig, model):
    """The model, switched to per-document attention when the run packs examples."""
    if cfg.pack:
        use_document_attention(model)
    return model


def _teacher_cache(folder: Path, examples, loaders: dict, key: dict, cfg, info, pad_token_id,
                   row_lse: bool = False):
    cache = TeacherCache.open(folder, key, info.device) if cfg.resume else None
    if cache is None:
        cache = TeacherCache.build(folder, examples, loaders, key, cfg.micro_batch_size,
                                   pad_token_id, info, progress=cfg.progress, row_lse=row_lse)
    return cache


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
    strategy = strategy_for(info)
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
        with strategy.gradient_sync(model, enabled=j == len(micro_batches) - 1):
            forget_sum, retain_sum = objective(model, indices, batch, indices, retain_batch)
            loss = forget_sum / max(n_forget, 1)
            if retain_sum is not None:
                loss = loss + retain_sum / max(n_retain, 1)
            # DDP, FSDP and ZeRO-3 average gradients over processes; the factor makes that a sum.
            strategy.backward(model, loss * (weight * info.world_size))
        local_loss += weight * loss.item()
    return all_reduce_sum([local_loss], info)[0], n_forget, n_input


def _train(cfg: RunConfig, stage: str, model, tokenizer, examples, retain_examples, objective,
           strategy, run: RunFolder, on_epoch_end, on_step, stopper=None) -> dict:
    info, out = strategy.info, run.out
    pad = tokenizer.pad_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if len(full_shape(p)) >= 2]
    no_decay = [p for p in trainable if len(full_shape(p)) < 2]
    optimizer = strategy.make_optimizer([{"params": decay, "weight_decay": cfg.weight_decay},
                                         {"params": no_decay, "weight_decay": 0.0}], cfg.lr)
    model, optimizer = strategy.attach(model, optimizer)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    data = TrainData(examples, retain_examples, pad)

    step = load_checkpoint(out, run.pointer, strategy, model, optimizer) if cfg.resume else 0
    log_path = out / LOG_FILE
    kept = []
    if info.is_main:
        kept = kept_log(log_path, step)
        log_path.write_text("".join(line + "\n" for line in kept))
    progress = None
    if cfg.progress and info.is_main:
        from tqdm.auto import tqdm
        progress = tqdm(total=total_steps, initial=step, desc=stage, unit="step")

    stats = {"stage": stage, "steps": total_steps, "epochs": cfg.epochs,
             "examples": len(examples), "resumed_from_step": step, "world_size": info.world_size}
    train_seconds, train_tokens, last_loss = 0.0, 0, float("nan")
    epoch_losses = []

    def epoch_end(epoch: int, epoch_loss: float) -> None:
        if on_epoch_end is None:
            return
        hf_model = strategy.unwrap(model)
        hf_model.eval()
        # Evaluations pad on the left and generate: plain attention, not the packed runs' own.
        base = unwrap_model(hf_model)
        attention = base.config._attn_implementation
        if cfg.pack:
            base.set_attn_implementation("sdpa")
        try:
            on_epoch_end(epoch, hf_model, tokenizer, dict(stats, epoch_loss=epoch_loss))
        finally:
            if cfg.pack:
                base.set_attn_implementation(attention)
            hf_model.train()
        callbacks_done(out, info)

    pending = run.pointer if cfg.resume else None
    if pending and pending.get("callbacks_pending") and on_epoch_end is not None:
        # Killed during the epoch-end callbacks (an evaluation): redo them for that epoch.
        losses = [json.loads(line)["loss"] for line in kept
                  if json.loads(line)["epoch"] == pending["epoch_end"]]
        losses = broadcast_object(losses, info)
        epoch_end(pending["epoch_end"], sum(losses) / max(len(losses), 1))

    stop_every = getattr(cfg, "stop_check_every", 0)
    stopped = False

    def should_stop() -> bool:
        return stopper.check(strategy.unwrap(model), step)

    if stopper is not None:
        # The threshold: the held-out authors' answer probability under the model unlearning
        # starts from (a resumed run measures the original model it recorded, not the student).
        if step == 0:
            stopper.start(strategy.unwrap(model))
        else:
            from .models import load_model
            stopper.start(load_model(cfg.model)[0])

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
            if not math.isfinite(step_loss):
                raise TrainingDiverged(
                    f"step {step + 1}: the loss is {step_loss} (non-finite weights, inputs or "
                    f"learning rate); the run stopped and its last good checkpoint is kept")
            lr = cfg.lr * _lr_factor(step, warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = strategy.step(model, optimizer, trainable, cfg.max_grad_norm)
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise TrainingDiverged(
                    f"step {step + 1}: the gradient norm is {grad_norm}; the run stopped before "
                    f"this update was saved and its last good checkpoint is kept")
            step += 1
            elapsed = time.perf_counter() - started
            train_seconds += elapsed
            train_tokens += int(n_input)
            last_loss = step_loss
            epoch_loss_sum += step_loss
            epoch_steps += 1
            record = {"step": step, "epoch": epoch + 1, "loss": step_loss, "lr": lr,
                      "grad_norm": grad_norm,
                      "supervised_tokens": int(n_forget), "input_tokens": int(n_input),
                      "seconds": elapsed, "tokens_per_s": n_input / elapsed}
            if info.is_main:
                try:
                    with log_path.open("a") as log:
                        log.write(json.dumps(record) + "\n")
                except OSError as err:
                    raise write_error(log_path, err) from err
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{n_input / elapsed:.0f}")
            if on_step is not None:
                on_step(step, record)
            if cfg.save_every and step % cfg.save_every == 0 and step % steps_per_epoch:
                save_checkpoint(out, strategy, model, optimizer, step)
            if stopper is not None and stop_every and step % stop_every == 0 \
                    and step % steps_per_epoch and should_stop():
                stopped = True      # the rest of this epoch is skipped; it ends here
                break
        save_checkpoint(out, strategy, model, optimizer, step, epoch_end=epoch + 1,
                         callbacks_pending=on_epoch_end is not None)
        epoch_losses.append(epoch_loss_sum / max(epoch_steps, 1))
        epoch_end(epoch + 1, epoch_losses[-1])
        if stopper is not None and not stopped:
            stopped = should_stop()
        if stopped:
            break
    if progress is not None:
        progress.close()
    stats.update(final_loss=last_loss, epoch_losses=epoch_losses, train_seconds=train_seconds,
                 tokens_per_s=train_tokens / train_seconds if train_seconds else float("nan"))
    if stopper is not None:
        stats.update(stopped_at_step=step if stopped else None, stop_threshold=stopper.threshold,
                     stop_checks=stopper.checks)
    try:
        strategy.save_final(model, tokenizer, out)
    except Exception as err:
        # A full disk surfaces as OSError, as safetensors' own error or as torch's
        # RuntimeError: one line naming the folder (the run records status "failed").
        if isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError":
            raise write_error(out, err) from err
        raise
    barrier(info)
    run.finish(stats)
    stats = broadcast_object(stats, info)
    return stats
