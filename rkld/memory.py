"""``rkld memory``: an analytic estimate of the peak GPU memory of an unlearning run.

For one micro-batch of ``batch x seq_len`` tokens it adds up, per GPU, what a training step holds
at its peak, for three ways of computing the loss:

- ``naive``: the student's full logits ``[tokens, V]``, both teachers live and returning their
  logits, the teacher ``o - alpha * relu(g - o)`` and a PyTorch reverse KL (``log_softmax`` +
  ``F.kl_div``) over the full vocabulary;
- ``rkld live``: ``fused_linear_rkl_loss`` on the final hidden states, teachers live
  (``rkld unlearn --live-teachers``);
- ``rkld cache``: ``fused_linear_rkl_loss`` with the teachers' hidden states read from the
  teacher cache, so only their lm_head weights are in memory (``rkld unlearn``, the default).

Public API:
    ModelShape.from_config(config) / ModelShape.from_preset(name)   dims and parameter counts
    RunShape(batch, seq_len, lora=False, world_size=1, ...)          what the run does
    estimate(model, run) -> {scenario: Estimate}                     bytes per component
    format_tables(model, runs, markdown=False) -> str                the printed tables
    add_arguments(parser) / run_cli(args)                            the ``rkld memory`` command

Assumptions (each one a place where a real run can differ):
- Weights, activations and gradients in bf16 (``precision="bf16"``, what ``rkld unlearn --dtype
  bfloat16`` does: AdamW states in bf16 too), or bf16 weights/gradients with fp32 master weights
  and fp32 AdamW moments (``"mixed"``, 16 bytes per trained parameter), or everything in fp32
  (``"fp32"``, the CPU case the tests measure).
- Attention through SDPA / flash attention with no padding mask: no ``[S, S]`` scores are kept,
  only q, k, v, the output and a float32 log-sum-exp per head and token; grouped-query heads are
  not repeated. No dropout. Every token is supervised (the long-document case).
- What autograd saves per decoder layer (a = activation bytes, N = tokens): each norm its
  float32 input (RMSNorm upcasts; LayerNorm keeps its input in ``a``) and its output in ``a``
  (RMSNorm also the normalised value before the weight); attention q, k, v, the output, the
  output's contiguous copy fed to o_proj and the log-sum-exp; a gated MLP gate, act(gate), up
  and their product (4 N I a), a plain MLP fc1's output and the activation's output (2 N I a);
  activations written as Python formulas (``gelu_new``) save their intermediates too. LoRA adds
  ``N x rank`` per adapted linear.
- Gradient checkpointing (one checkpoint per decoder layer) keeps each layer's input and
  recomputes one layer at a time during backward.
- Backward of one layer needs, on top of what is saved, its MLP's input gradients (2 N I a),
  its hidden-size gradients (2 N H a) and the layer's weight gradients.
- The fused loss holds the student's supervised rows and their gradient ``[N, H]``, the lm_head
  weight gradient ``[V, H]`` (full fine-tuning; both gradients in its compute dtype until its
  backward: float32, float64 under its ``compute_dtype=torch.float64`` option) and one chunk's
  ``[chunk, V]`` working set, bounded by ``rkld_kernels``' per-device budget, plus the
  vocabulary pass's six temporaries over the rows it takes at once, plus a copy of
  each of the three heads in the compute dtype for the call where a head's dtype is not it
  (16-bit heads off CUDA; every head under the float64 option). The naive loss
  holds, at its peak, seven ``[N, V]`` tensors: the student logits, the teacher, both
  log-softmaxes, ``exp(log p)``, ``log p - log q`` and their product (or their gradients in
  backward).
- Live teachers: two frozen models replicated on every GPU, run one layer at a time under
  ``no_grad``; the cache: two lm_head weights plus the micro-batch's cached rows.
- Several GPUs: full fine-tuning shards weights, gradients and optimizer states with FSDP2
  (``1 / world_size`` each), plus the unsharded root module (embeddings, final norm, lm_head;
  kept from forward to backward) and two unsharded decoder layers with their gradients. LoRA
  runs use DDP (the pipeline refuses LoRA with FSDP): nothing is sharded.
- AdamW's update makes one temporary the size of the trained parameters (``foreach`` on GPU),
  or twice the largest parameter (the per-tensor loop torch uses on CPU).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

SCENARIOS = ("naive", "rkld live", "rkld cache")
PRECISIONS = ("bf16", "mixed", "fp32")
_PASS_TEMPORARIES = 6
LOSS_COMPUTES = ("default", "float64")
GIB = 1024 ** 3

# The models the planner knows by name, with their published dimensions.
PRESETS = {
    "llama2-7b": ("Llama-2-7B", "llama", dict(
        vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, intermediate_size=11008, tie_word_embeddings=False)),
    "llama3-8b": ("Llama-3-8B", "llama", dict(
        vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False)),
    "llama3-70b": ("Llama-3-70B", "llama", dict(
        vocab_size=128256, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, intermediate_size=28672, tie_word_embeddings=False)),
    "phi-1.5": ("Phi-1.5", "phi", dict(
        vocab_size=51200, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, intermediate_size=8192, partial_rotary_factor=0.5,
        hidden_act="gelu_new", tie_word_embeddings=False)),
}

# Tensors of size [N, I] that an activation written as a Python formula saves besides its
# input (native kernels such as SiLU, GELU and ReLU save only their input).
# gelu_new = 0.5 x (1 + tanh(c (x + 0.044715 x^3))): tanh's output, 0.5 x and 1 + tanh.
_EXTRA_SAVED_BY_ACTIVATION = {"gelu_new": 3, "quick_gelu": 1}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a decoder-only model."""
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    norms_per_layer: int       # norms over the hidden size in one decoder layer
    rms_norm: bool             # RMSNorm (saves a float32 copy of its input) or LayerNorm
    gated_mlp: bool            # gate/up/down (Llama) or fc1/fc2 (Phi, GPT-2)
    activation_extra: int      # see _EXTRA_SAVED_BY_ACTIVATION
    layer_params: int          # parameters of one decoder layer
    root_params: int           # embeddings, final norm, lm_head (weights tied: counted once)
    head_params: int           # lm_head weight and bias
    largest_param: int         # elements of the largest single parameter tensor
    layer_linear_dims: tuple   # (in_features + out_features) of each linear in one layer

    @property
    def params(self) -> int:
        return self.root_params + self.layers * self.layer_params

    def lora_params(self, rank: int) -> int:
        """Adapter parameters with LoRA of ``rank`` on every linear of the decoder layers."""
        return self.layers * rank * sum(self.layer_linear_dims)

    @classmethod
    def from_preset(cls, name: str) -> "ModelShape":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        from transformers import AutoConfig
        title, model_type, dims = PRESETS[name]
        return cls.from_config(AutoConfig.for_model(model_type, **dims), name=title)

    @classmethod
    def from_path(cls, path) -> "ModelShape":
        """From a Hugging Face model folder (its config.json; no weights are read)."""
        from transformers import AutoConfig
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: expected a Hugging Face model folder with a "
                                    f"config.json; found none")
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        return cls.from_config(config, name=folder.name)

    @classmethod
    def from_config(cls, config, name: str | None = None) -> "ModelShape":
        """From a transformers config of a dense (not mixture-of-experts) decoder-only model:
        parameter counts from a one-layer copy of the model built on the meta device (no
        memory), the rest from the config."""
        import torch
        from transformers import AutoModelForCausalLM

        one_layer = copy.deepcopy(config)
        one_layer.num_hidden_layers = 1
        if getattr(one_layer, "layer_types", None):
            one_layer.layer_types = one_layer.layer_types[:1]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(one_layer)
        layers = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)
                  and len(m) == 1 and sum(p.numel() for p in m.parameters()) > 0]
        if not layers:
            raise ValueError(f"{type(model).__name__}: no decoder layer list found; the planner "
                             f"knows decoder-only transformers")
        layer = layers[0][0]
        hidden = config.hidden_size
        layer_params = sum(p.numel() for p in layer.parameters())
        head = model.get_output_embeddings()
        norms = [m for m in layer.modules() if type(m).__name__.endswith("Norm")
                 and getattr(m, "weight", None) is not None and m.weight.numel() == hidden]
        mlp = getattr(layer, "mlp", None)
        mlp_linears = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)] if mlp else []
        heads = config.num_attention_heads
        return cls(
            name=name or getattr(config, "_name_or_path", "") or type(model).__name__,
            vocab=config.vocab_size, hidden=hidden, layers=config.num_hidden_layers,
            heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            intermediate=config.intermediate_size,
            norms_per_layer=len(norms) or 2,    # a norm class we cannot recognise: Llama's two
            rms_norm=any("RMS" in type(m).__name__ for m in norms),
            gated_mlp=len(mlp_linears) >= 3,
            activation_extra=_EXTRA_SAVED_BY_ACTIVATION.get(getattr(config, "hidden_act", ""), 0),
            layer_params=layer_params,
            root_params=sum(p.numel() for p in model.parameters()) - layer_params,
            head_params=sum(p.numel() for p in head.parameters()),
            largest_param=max(p.numel() for p in model.parameters()),
            layer_linear_dims=tuple(m.in_features + m.out_features for m in layer.modules()
                                    if isinstance(m, torch.nn.Linear)),
        )


@dataclass(frozen=True)
class RunShape:
    """One micro-batch of a training step and how the model is trained."""
    batch: int
    seq_len: int
    lora: bool = False
    lora_rank: int = 8
    world_size: int = 1
    precision: str = "bf16"
    device: str = "cuda"          # "cuda" or "cpu": loss chunk budget, AdamW implementation
    # The fused loss's compute_dtype option: "default" (float32 inside for 16/32-bit heads) or
    # "float64" (compute_dtype=torch.float64: float64 buffers, gradients and head copies).
    loss_compute: str = "default"

    def __post_init__(self):
        for name in ("batch", "seq_len", "lora_rank", "world_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; "
                             f"got {self.precision!r}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu'; got {self.device!r}")
        if self.loss_compute not in LOSS_COMPUTES:
            raise ValueError(f"loss_compute must be one of {', '.join(LOSS_COMPUTES)}; got "
                             f"{self.loss_compute!r}")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def sharded(self) -> bool:
        """FSDP shards only full fine-tuning; LoRA runs replicate the model (DDP)."""
        return self.world_size > 1 and not self.lora

    @property
    def strategy(self) -> str:
        if self.world_size == 1:
            return "1 GPU"
        return f"FSDP2 x {self.world_size}" if self.sharded else f"DDP x {self.world_size}"


@dataclass
class Estimate:
    """Bytes per component for one scenario, and the peaks with and without checkpointing."""
    components: dict
    peak: int
    peak_checkpointed: int


def _bytes_per_element(precision: str) -> dict:
    """Bytes per element: weights, gradients, optimizer state per trained parameter (moments
    plus master weights), the optimizer's temporary, activations."""
    if precision == "fp32":
        return {"weight": 4, "grad": 4, "optim": 8, "optim_tmp": 4, "act": 4}
    if precision == "mixed":
        return {"weight": 2, "grad": 2, "optim": 12, "optim_tmp": 4, "act": 2}
    return {"weight": 2, "grad": 2, "optim": 4, "optim_tmp": 2, "act": 2}


def layer_activation_bytes(model: ModelShape, tokens: int, act: int, lora_rank: int = 0) -> int:
    """Bytes autograd saves for one decoder layer's backward (see the module docstring)."""
    n, h, i = tokens, model.hidden, model.intermediate
    q_dim, kv_dim = model.heads * model.head_dim, model.kv_heads * model.head_dim
    norm_input = 4 * n * h if model.rms_norm else act * n * h
    norm_inner = act * n * h if model.rms_norm else 0
    norms = model.norms_per_layer * (norm_input + norm_inner + act * n * h)
    # q after RoPE, k, v, the attention output (kept by SDPA) and its copy fed to o_proj.
    attention = act * n * (3 * q_dim + 2 * kv_dim) + 4 * n * model.heads
    mlp_tensors = (4 if model.gated_mlp else 2) + model.activation_extra
    mlp = act * n * i * mlp_tensors
    lora = act * n * lora_rank * len(model.layer_linear_dims)
    return norms + attention + mlp + lora


def estimate(model: ModelShape, run: RunShape) -> dict:
    """Per-GPU peak memory of one training step in each scenario, as ``{scenario: Estimate}``."""
    import torch

    from rkld_kernels.fused_linear import _BUFFERS_PER_ROW, _CPU_PASS_BYTES, default_chunk_size

    b = _bytes_per_element(run.precision)
    n, h, v, act = run.tokens, model.hidden, model.vocab, b["act"]
    shard = run.world_size if run.sharded else 1
    lora_rank = run.lora_rank if run.lora else 0
    trained = model.lora_params(run.lora_rank) if run.lora else model.params
    largest_trained = (run.lora_rank * max(model.layer_linear_dims) if run.lora
                       else model.largest_param)

    weights = (model.params * b["weight"] + (trained * b["weight"] if run.lora else 0)) // shard
    grads = trained * b["grad"] // shard
    optim = trained * b["optim"] // shard
    fsdp_unsharded = 0
    if run.sharded:
        fsdp_unsharded = (model.root_params * b["weight"]
                          + 2 * model.layer_params * (b["weight"] + b["grad"]))
    optim_tmp = b["optim_tmp"] * (trained // shard if run.device == "cuda" else 2 * largest_trained)
    layer_grads = 0 if run.lora else model.layer_params * b["grad"]

    per_layer = layer_activation_bytes(model, n, act, lora_rank)
    final_norm = (4 * n * h + act * n * h if model.rms_norm else act * n * h) + act * n * h
    saved = model.layers * per_layer + final_norm
    saved_checkpointed = model.layers * act * n * h + final_norm
    layer_backward = 2 * act * n * model.intermediate + 2 * act * n * h + layer_grads

    teacher_models = 2 * model.params * b["weight"]
    teacher_heads = 2 * model.head_params * b["weight"]
    # One teacher layer under no_grad: the MLP's three [N, I] tensors and a few [N, H] ones.
    teacher_forward = 3 * act * n * model.intermediate + (2 * act + 8) * n * h
    lm_head_grad = 0 if run.lora else model.head_params * b["grad"]

    # The fused loss computes in float32 (float64 under its compute_dtype=torch.float64 option):
    # that is the width of its chunk buffers, of dL/drows and dW (kept until its backward
    # rounds them to the parameters' dtype) and of the head copies it makes for the call
    # (every head whose dtype is not the compute dtype, except 16-bit heads on CUDA, whose
    # GEMMs write float32).
    head_dtype = torch.float32 if run.precision == "fp32" else torch.bfloat16
    float64 = run.loss_compute == "float64"
    compute = 8 if float64 else 4
    chunk = min(n, default_chunk_size(v, run.device, head_dtype,
                                      torch.float64 if float64 else None))
    fused_persistent = (act * n * h + compute * n * h
                        + (0 if run.lora else compute * model.head_params))
    head_copies = (3 * compute * model.head_params
                   if float64 or (run.precision != "fp32" and run.device != "cuda") else 0)
    # The vocabulary pass's own temporaries (teacher, d, two log-softmaxes, two probability
    # rows), over the rows it takes at once: a few rows on CPU, the whole chunk on CUDA.
    pass_rows = (min(chunk, max(1, _CPU_PASS_BYTES // (compute * v))) if run.device == "cpu"
                 else chunk)
    fused_chunk = (_BUFFERS_PER_ROW * compute * chunk * v + _PASS_TEMPORARIES * compute
                   * pass_rows * v + head_copies)
    naive_loss = max(7 * act * n * v, act * n * v + lm_head_grad + act * n * h)

    scenarios = {
        "naive": dict(teachers=teacher_models, teacher_run=teacher_forward,
                      loss=naive_loss, loss_after=0),
        "rkld live": dict(teachers=teacher_models,
                          teacher_run=teacher_forward + 2 * act * n * h,
                          loss=2 * act * n * h + fused_chunk, loss_after=fused_persistent),
        "rkld cache": dict(teachers=teacher_heads, teacher_run=2 * act * n * h,
                           loss=2 * act * n * h + fused_chunk, loss_after=fused_persistent),
    }
    out = {}
    for scenario, s in scenarios.items():
        persistent = weights + optim + fsdp_unsharded + s["teachers"]
        # After the step's gradients exist: the optimizer update (activations are gone).
        update = grads + optim_tmp + (model.root_params * b["grad"] if run.sharded else 0)

        def forward_backward(saved_bytes, recompute):
            before_backward = max(s["teacher_run"], s["loss"] + s["loss_after"])
            in_backward = s["loss_after"] + recompute + layer_backward
            return saved_bytes + max(before_backward, in_backward)

        peak = persistent + max(forward_backward(saved, 0), update)
        peak_checkpointed = persistent + max(
            forward_backward(saved_checkpointed, per_layer), update)
        loss_row = s["loss"] + s["loss_after"]
        out[scenario] = Estimate(
            components={
                "student weights": weights,
                "gradients": grads,
                "optimizer states": optim,
                "FSDP unsharded layers and root": fsdp_unsharded,
                "teachers (models or cached heads)": s["teachers"],
                "activations, no checkpointing": saved,
                "activations, checkpointing": saved_checkpointed + per_layer,
                "loss buffers": loss_row,
            },
            peak=peak, peak_checkpointed=peak_checkpointed)
    return out


def _gib(value: int) -> str:
    gib = value / GIB
    return "-" if value == 0 else (f"{gib:.2f}" if gib < 10 else f"{gib:.1f}")


def run_title(model: ModelShape, run: RunShape) -> str:
    tuning = f"LoRA rank {run.lora_rank}" if run.lora else "full fine-tuning"
    return (f"{model.name} ({model.params / 1e9:.2f} B parameters), {run.batch} x {run.seq_len} "
            f"tokens, {tuning}, {run.strategy}, {run.precision}")


def format_table(model: ModelShape, run: RunShape, markdown: bool = False) -> str:
    """One table: components by scenario, in GiB per GPU."""
    estimates = estimate(model, run)
    header = ["GiB per GPU", *SCENARIOS]
    names = list(next(iter(estimates.values())).components)
    rows = [[name, *(_gib(estimates[s].components[name]) for s in SCENARIOS)] for name in names]
    rows.append(["peak, no checkpointing", *(_gib(estimates[s].peak) for s in SCENARIOS)])
    rows.append(["peak, checkpointing", *(_gib(estimates[s].peak_checkpointed) for s in SCENARIOS)])
    title = run_title(model, run)
    if markdown:
        lines = [f"#### {title}", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * len(SCENARIOS)) + "|"]
        lines += ["| " + " | ".join(f"**{c}**" if r[0].startswith("peak") else c for c in r) + " |"
                  for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[k])) for r in [header, *rows]) for k in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if k == 0 else c.rjust(w)  # noqa: E731
                              for k, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([title, fmt(header), "  ".join("-" * w for w in widths),
                      *(fmt(r) for r in rows)])


def format_tables(model: ModelShape, runs, markdown: bool = False) -> str:
    return "\n\n".join(format_table(model, run, markdown) for run in runs)


# --------------------------------------------------------------------------- command line

def add_arguments(parser) -> None:
    """The options of ``rkld memory``. Lists (several --seq-len, --world-size, --tuning) print
    one table per combination."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face model folder (its config.json is read)")
    source.add_argument("--preset", choices=list(PRESETS), help="a known model")
    parser.add_argument("--seq-len", type=int, nargs="+", required=True,
                        help="tokens per sequence (several values: one table each)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per micro-batch per GPU")
    parser.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    parser.add_argument("--tuning", nargs="+", choices=["full", "lora"], default=None,
                        help="one table per choice (overrides --lora)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--world-size", type=int, nargs="+", default=[1],
                        help="GPUs (full fine-tuning is sharded with FSDP2; LoRA uses DDP)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16",
                        help="bf16: bf16 weights, gradients and AdamW states (rkld --dtype "
                             "bfloat16); mixed: plus fp32 master weights and moments; fp32")
    parser.add_argument("--loss-compute", choices=LOSS_COMPUTES, default="default",
                        help="the fused loss's arithmetic: default (float32 inside) or float64 "
                             "(its compute_dtype=torch.float64 option: float64 buffers and "
                             "head copies)")
    parser.add_argument("--format", choices=["text", "markdown", "json"], default="text")


def run_cli(args) -> int:
    """``rkld memory``: print the tables (or JSON) for the parsed arguments."""
    model = ModelShape.from_preset(args.preset) if args.preset else ModelShape.from_path(args.model)
    tunings = args.tuning or (["lora"] if args.lora else ["full"])
    runs = [RunShape(batch=args.batch, seq_len=seq_len, lora=tuning == "lora",
                     lora_rank=args.lora_rank, world_size=world_size, precision=args.precision,
                     loss_compute=args.loss_compute)
            for seq_len in args.seq_len for world_size in args.world_size for tuning in tunings]
    if args.format == "json":
        print(json.dumps([{"run": dataclasses.asdict(run), "title": run_title(model, run),
                           "estimates": {s: dataclasses.asdict(e)
                                         for s, e in estimate(model, run).items()}}
                          for run in runs], indent=1))
    else:
        print(format_tables(model, runs, markdown=args.format == "markdown"))
    return 0


if __name__ == "__main__":
    import argparse
    import sys

    cli = argparse.ArgumentParser(prog="python -m rkld.memory", description=__doc__.split("\n")[0])
    add_arguments(cli)
    sys.exit(run_cli(cli.parse_args()))
