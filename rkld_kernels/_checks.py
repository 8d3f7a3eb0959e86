"""Input validation shared by the public entry points. Every error names what was expected and
what was received, so a user can act on it without reading the source."""
from __future__ import annotations

import torch

DIRECTIONS = ("reverse", "forward")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch", "reference")


def check_choice(fn: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_options(fn: str, *, alpha, temperature, direction, reduction, backend) -> None:
    check_choice(fn, "direction", direction, DIRECTIONS)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    check_choice(fn, "backend", backend, BACKENDS)
    if isinstance(temperature, torch.Tensor) or isinstance(alpha, torch.Tensor):
        raise TypeError(f"{fn}: alpha and temperature must be Python numbers, got "
                        f"alpha={type(alpha).__name__}, temperature={type(temperature).__name__}")
    if not temperature > 0:   # also rejects NaN
        raise ValueError(f"{fn}: temperature must be > 0; got {temperature!r}")
    if not alpha >= 0:
        raise ValueError(f"{fn}: alpha must be >= 0 (it scales how far risen logits are pushed "
                         f"down); got {alpha!r}")


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
    if ignore_index is not None:
        info = torch.iinfo(labels.dtype)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) \
                or not info.min <= ignore_index <= info.max:
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
