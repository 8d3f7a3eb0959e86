"""Configuration of the pipeline's stages as dataclasses (one per stage; the CLI fills them).

Defaults follow the paper and TOFU's protocol (docs/design.md#method): AdamW, weight decay 0.01,
one warm-up epoch then linear decay, effective batch 32 (reached by gradient accumulation),
learning rate 1e-5, strengthening for 10 epochs, alpha 8. Tiny CPU models want a far larger
learning rate (around 1e-3).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# rkld: distillation from o - alpha * relu(g - o); ga: gradient ascent; graddiff: gradient
# ascent on the forget set plus NLL on the retain set (ga with the +RT retain term); npo:
# negative preference optimisation against the original model (its log-probabilities come from
# the same teacher cache as RKLD's teachers).
METHODS = ("rkld", "ga", "graddiff", "npo")
DIRECTIONS = ("reverse", "forward")
RETAIN_TERMS = ("none", "nll", "kl")
PARALLEL = ("auto", "none", "ddp", "fsdp", "zero3")
# How the teacher measures what strengthening raised: "logits" is the paper's relu(g - o);
# "logprobs", relu(log_softmax(g) - log_softmax(o)), is an extension (rkld.teacher_boost).
TEACHER_BOOSTS = ("logits", "logprobs")

# Settings that change how a run is carried out but not what it computes (up to the order of
# floating-point sums): a resumed run may change them; any other change is refused.
RESUMABLE_SETTINGS = ("progress", "resume", "overwrite", "save_every", "parallel",
                      "micro_batch_size", "gradient_checkpointing")


def check_boost(boost: str) -> str:
    if boost not in TEACHER_BOOSTS:
        raise ValueError(f"teacher_boost must be one of {', '.join(TEACHER_BOOSTS)} (logits: the "
                         f"paper's relu(g - o); logprobs: relu(log_softmax(g) - log_softmax(o)), "
                         f"an extension); got {boost!r}")
    return boost


def _check_finite(names_values: dict) -> None:
    for name, value in names_values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number; got {value!r}")


@dataclass
class RunConfig:
    """What every training stage shares.

    ``batch_size`` is the effective batch (examples per optimizer step over all processes);
    ``micro_batch_size`` is what one process runs at once. ``seed`` sets the initialisation of a
    tiny model and the order of the examples; ``data_seed`` which synthetic benchmark is
    generated (it means nothing for other data). ``save_every`` writes a checkpoint
    every that many optimizer steps (0: only at epoch ends, which always happens).
    ``pack`` fills each sequence of ``max_length`` tokens with whole examples that do not
    attend to each other (``rkld.packing``).
    ``model="tiny"`` builds a small Llama (``tiny`` overrides its configuration, see
    ``rkld.models.TINY_DEFAULTS``) with a tokenizer trained on the benchmark's text.
    """
    model: str
    out: str
    data: str = "synthetic"
    seed: int = 0
    data_seed: int = 0
    max_authors: int | None = None
    max_length: int = 512
    template: str = "auto"
    epochs: int = 5
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    max_grad_norm: float = 1.0
    batch_size: int = 32
    micro_batch_size: int = 8
    dtype: str | None = None
    gradient_checkpointing: bool = False
    pack: bool = False
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    save_every: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    parallel: str = "auto"
    tiny: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming the first setting that is out of range."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size,
                    "micro_batch_size": self.micro_batch_size, "max_length": self.max_length,
                    "lora_rank": self.lora_rank}
        for name, value in positive.items():
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        _check_finite({"lr": self.lr, "weight_decay": self.weight_decay,
                       "warmup_epochs": self.warmup_epochs, "max_grad_norm": self.max_grad_norm,
                       "lora_alpha": self.lora_alpha})
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2; got {self.max_length}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr!r}")
        for name in ("weight_decay", "warmup_epochs", "max_grad_norm", "save_every"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}; "
                             f"got {self.parallel!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run "
                             "in the output folder, overwrite deletes it")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16; got {self.dtype!r}")
        if self.model == "tiny":
            from .models import check_tiny_settings
            check_tiny_settings(self.tiny)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneConfig(RunConfig):
    """Next-token NLL on the answers of ``split`` (the benchmark's target / retain models)."""
    split: str = "full"


@dataclass
class StrengthenConfig(RunConfig):
    """Continued NLL training on the forget set: the strengthened model m_g."""
    forget: str = "forget10"
    epochs: int = 10


@dataclass
class UnlearnConfig(RunConfig):
    """Unlearning of ``forget`` starting from ``model`` (the original m_o).

    ``method="rkld"`` distils from the teacher ``o - alpha * relu(g - o)`` built from ``model``
    and ``strengthened`` (reverse KL, or forward KL with ``direction="forward"``);
    ``method="ga"`` is gradient ascent on the forget answers, ``"graddiff"`` the same plus NLL on
    the retain split, ``"npo"`` negative preference optimisation (per answer,
    ``(2 / npo_beta) * softplus(npo_beta * (log pi(a|q) - log pi_original(a|q)))``, averaged
    with the answers' token counts as weights). ``retain_term`` adds, with weight
    1, NLL on the retain split ("+RT") or forward KL to the original model on it ("+KL").
    Teachers come from an on-disk cache of their final hidden states unless ``live_teachers``.
    ``teacher_boost="logprobs"`` (an extension of the paper, see :mod:`rkld.teacher_boost`)
    measures the boost as ``relu(log_softmax(g) - log_softmax(o))`` instead of the paper's
    ``relu(g - o)`` (``"logits"``, the default).

    ``stop_at_holdout`` ends training at the first check (every ``stop_check_every`` optimizer
    steps, and at every epoch end) where the student's mean answer probability on the forget
    questions has fallen to its probability on the held-out authors (``holdoutNN``), which no
    model was trained on: a stopping rule that never looks at the retain model.
    """
    strengthened: str | None = None
    forget: str = "forget10"
    method: str = "rkld"
    alpha: float = 8.0
    temperature: float = 1.0
    direction: str = "reverse"
    retain_term: str = "none"
    live_teachers: bool = False
    chunk_size: int | None = None
    backend: str = "auto"
    teacher_boost: str = "logits"
    npo_beta: float = 0.1
    stop_at_holdout: bool = False
    stop_check_every: int = 0

    @property
    def effective_retain_term(self) -> str:
        """The retain term the objective uses: graddiff's is NLL."""
        if self.method == "graddiff" and self.retain_term == "none":
            return "nll"
        return self.retain_term

    def validate(self) -> None:
        super().validate()
        check_boost(self.teacher_boost)
        if self.method == "graddiff" and self.retain_term not in ("none", "nll"):
            raise ValueError(f"method 'graddiff' is gradient ascent with the NLL retain term; "
                             f"got retain_term {self.retain_term!r} (use none or nll)")
        _check_finite({"npo_beta": self.npo_beta})
        if not self.npo_beta > 0:
            raise ValueError(f"npo_beta must be > 0; got {self.npo_beta!r}")
        if isinstance(self.stop_check_every, bool) or not isinstance(self.stop_check_every, int) \
                or self.stop_check_every < 0:
            raise ValueError(f"stop_check_every must be an integer >= 0 (0: at epoch ends "
                             f"only); got {self.stop_check_every!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}; "
                             f"got {self.direction!r}")
        if self.retain_term not in RETAIN_TERMS:
            raise ValueError(f"retain_term must be one of {', '.join(RETAIN_TERMS)}; "
                             f"got {self.retain_term!r}")
        if self.method == "rkld" and not self.strengthened:
            raise ValueError("method 'rkld' needs the strengthened model (--strengthened PATH)")
        if self.model == "tiny":
            raise ValueError("unlearning starts from a trained model (the output of "
                             "'rkld finetune'); 'tiny' builds an untrained one")
        _check_finite({"alpha": self.alpha, "temperature": self.temperature})
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool)
                                            or not isinstance(self.chunk_size, int)
                                            or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None (from a memory "
                             f"budget); got {self.chunk_size!r}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0; got {self.alpha!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature!r}")
