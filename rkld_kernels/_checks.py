"""Input validation shared by the public entry points. Every error names what was expected and
what was received, so a user can act on it without reading the source."""
from __future__ import annotations

import math
import numbers

import torch

DIRECTIONS = ("reverse", "forward")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch", "reference")
_LOG2E = 1.4426950408889634


def check_choice(fn: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_options(fn: str, *, alpha, temperature, direction, reduction, backend) -> None:
    check_choice(fn, "direction", direction, DIRECTIONS)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    check_choice(fn, "backend", backend, BACKENDS)
    check_hyper(fn, alpha=alpha, temperature=temperature)


def check_hyper(fn: str, *, alpha, temperature) -> None:
    """``alpha``: a finite real number >= 0; ``temperature``: a finite real number > 0 whose
    inverse is finite too (the kernels scale logits by ``log2(e) / T``)."""
    for name, value in (("alpha", alpha), ("temperature", temperature)):
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{fn}: alpha and temperature must be Python numbers, got "
                            f"alpha={type(alpha).__name__}, temperature="
                            f"{type(temperature).__name__}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{fn}: {name} must be a real number (int or float); got "
                            f"{type(value).__name__} {value!r}")
    if not temperature > 0:   # also rejects NaN
        raise ValueError(f"{fn}: temperature must be > 0; got {temperature!r}")
    if not math.isfinite(temperature) or not math.isfinite(_LOG2E / temperature):
        raise ValueError(f"{fn}: temperature must be a finite number > 0 whose inverse is "
                         f"finite (the logits are divided by it); got {temperature!r}")
    if not alpha >= 0 or not math.isfinite(alpha):
        raise ValueError(f"{fn}: alpha must be >= 0 and finite (it scales how far risen logits "
                         f"are pushed down); got {alpha!r}")


def check_ignore_index(fn: str, ignore_index) -> None:
    """``ignore_index`` is the label value of masked positions: an int (``labels=None`` is how
    every position is kept)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int (the label value of positions to "
                        f"leave out, usually -100; pass labels=None to keep every position); "
                        f"got {type(ignore_index).__name__} {ignore_index!r}")


def check_module_options(fn: str, **options) -> None:
    """Constructor-time checks of the loss modules' options that need no tensor: the ones
    passed (``ignore_index``, ``vocab_size``, ``chunk_size``, ``accum_dtype``,
    ``drop_masked``)."""
    if "ignore_index" in options:
        check_ignore_index(fn, options["ignore_index"])
    if options.get("vocab_size") is not None:
        check_vocab_size(fn, options["vocab_size"], {})
    chunk_size = options.get("chunk_size")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"{fn}: chunk_size must be None (chosen from a memory budget) or an "
                         f"int >= 1 (tokens per chunk); got {chunk_size!r}")
    accum_dtype = options.get("accum_dtype")
    if accum_dtype is not None and (not isinstance(accum_dtype, torch.dtype)
                                    or not accum_dtype.is_floating_point):
        raise TypeError(f"{fn}: accum_dtype must be None or a floating torch.dtype such as "
                        f"torch.float32; got {accum_dtype!r}")
    if "drop_masked" in options and not isinstance(options["drop_masked"], bool):
        raise TypeError(f"{fn}: drop_masked must be True or False; got "
                        f"{type(options['drop_masked']).__name__} {options['drop_masked']!r}")


def check_operator_args(fn: str, *, rows: int, keep, alpha, temperature, reduction,
                        backend: str, backends=("torch", "triton")) -> None:
    """The raw operator's own arguments (the public functions resolve and check them first;
    a caller of ``torch.ops.rkld.*`` directly gets the same lines): ``keep`` a bool mask of
    one entry per row or None, a known reduction, a resolved backend, and alpha / T."""
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    check_choice(fn, "backend", backend, backends)
    check_hyper(fn, alpha=alpha, temperature=temperature)
    if keep is not None and (keep.dtype != torch.bool or tuple(keep.shape) != (rows,)):
        raise ValueError(f"{fn}: keep must be None or a bool mask of shape ({rows},), one entry "
                         f"per row of the logits; got {keep.dtype} {tuple(keep.shape)}")


def check_float_tensor(fn: str, name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(tensor).__name__}")
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must have a floating dtype (float32, bfloat16, float16 or "
                        f"float64); got {tensor.dtype}")


def check_frozen(fn: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{fn}: {name} requires grad, but teachers never receive gradients; "
                         f"compute it under torch.no_grad() or pass {name}.detach()")


def check_same_device(fn: str, named: dict) -> None:
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{fn}: all tensors must be on one device; got {listing}")


_UNSIGNED = tuple(getattr(torch, name) for name in ("uint8", "uint16", "uint32", "uint64")
                  if hasattr(torch, name))


def check_labels(fn: str, labels, expected_shape: tuple, ref_name: str,
                 ignore_index: int | None = None) -> None:
    """Labels (None, or signed integer token ids of ``expected_shape``) and, with labels, the
    ``ignore_index`` they are compared with (an int that their dtype can hold; None is
    refused, as nothing would be compared with it)."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: labels must be a torch.Tensor or None; got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{fn}: labels must be an integer tensor (token ids, ignore_index where "
                        f"masked); got {labels.dtype}")
    if labels.dtype in _UNSIGNED:
        # An unsigned dtype cannot hold a negative ignore_index: -100 would wrap (to 156 in
        # uint8) and the comparison would mask real tokens or none at all, silently.
        raise TypeError(f"{fn}: labels must have a signed integer dtype (int64, int32, int16 or "
                        f"int8), which can hold a negative ignore_index; got {labels.dtype}")
    check_ignore_index(fn, ignore_index)
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(f"{fn}: ignore_index must be an integer that labels' dtype "
                         f"{labels.dtype} can hold ({info.min}..{info.max}); got "
                         f"{ignore_index!r}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"{fn}: labels must have the leading shape of {ref_name}, "
                         f"{tuple(expected_shape)}; got {tuple(labels.shape)}")


def check_vocab_size(fn: str, vocab_size, named_sizes: dict) -> None:
    """``vocab_size`` (the first N vocabulary entries of every model are used) must be an int
    between 1 and the smallest vocabulary given."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"{fn}: vocab_size must be None or an int >= 1 (the number of leading "
                         f"vocabulary entries to use); got {vocab_size!r}")
    for name, size in named_sizes.items():
        if size < vocab_size:
            raise ValueError(f"{fn}: vocab_size={vocab_size} is larger than the vocabulary of "
                             f"{name} ({size})")


PADDING_HINT = ("; if the vocabularies differ only by padding (e.g. 152064 vs 151936), pass "
                "vocab_size=N to use the first N entries of each")
