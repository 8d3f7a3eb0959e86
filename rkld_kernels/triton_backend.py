"""Triton backend of ``fused_rkl_loss``: launch configuration and the entry points that
``rkld_kernels.fused_rkl`` calls. The kernels are in ``rkld_kernels.triton_kernels``.

Forward: ``rkl_stats_kernel`` streams each row once (running maxima, sums and cross term,
rebased when a maximum grows) and keeps only per-row floats. When there are too few rows to
fill the GPU, each row is cut into V-splits on a 2-D grid and ``rkl_stats_combine_kernel``
merges the partial sums. Backward: ``rkl_grad_kernel`` on a 2-D (row x V-block) grid recomputes
p (and q) from the logits plus those statistics and writes the gradient, the only ``[rows, V]``
tensor either pass allocates.

CUDA graphs: nothing here reads a device value on the host (no ``.item()``, ``nonzero`` or
``torch.equal``); grid sizes depend only on shapes and on the device's SM count (read once per
device), and buffers come from ``torch.empty``, so both passes can be captured in a CUDA graph.
Run one eager step first so that Triton compiles the kernels outside the capture.

On CPU tensors the kernels run under Triton's interpreter (for tests), which has to be switched
on with ``TRITON_INTERPRET=1`` before triton is first imported.

Precision: accumulation is float32 whatever the input dtypes, float64 when the student is
float64. ``alpha`` and ``temperature`` reach the kernels as float32 scalars (Triton's type for
Python floats), so the float64 path is exact only for values float32 represents, such as the
defaults and 2.5.
"""
from __future__ import annotations

import functools

import torch

from .torch_backend import accumulation_dtype

try:
    import triton
    import triton.language as tl
except ImportError as _err:
    triton = None
    _TRITON_IMPORT_ERROR: ImportError | None = _err
else:
    _TRITON_IMPORT_ERROR = None
    from .triton_kernels import (
        PARTIAL_COUNT,
        STAT_COUNT,
        rkl_grad_kernel,
        rkl_stats_combine_kernel,
        rkl_stats_kernel,
    )

# Columns one program handles per loop step (stats) or in total (gradient). 4096 columns over
# 8 warps is 16 per thread: wide, vectorised loads of all three inputs with registers to spare.
MAX_BLOCK_V = 4096
# The stats grid aims for this many programs per SM before it splits rows over V.
_PROGRAMS_PER_SM = 4


def check_triton_usable(device: torch.device) -> None:
    """Raise a RuntimeError saying what to do when the Triton kernels cannot run on ``device``."""
    if triton is None:
        raise RuntimeError(
            f"fused_rkl_loss(backend='triton') needs the triton package, which could not be "
            f"imported ({_TRITON_IMPORT_ERROR}); install it with `pip install triton`, or use "
            f"backend='torch'")
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if not interpreter_enabled():
            raise RuntimeError(
                "fused_rkl_loss(backend='triton') got CPU tensors, but Triton's interpreter is "
                "off, so the kernels can only run on a CUDA device; to run them on CPU, set the "
                "environment variable TRITON_INTERPRET=1 before triton is first imported, or use "
                "backend='torch'")
        return
    raise RuntimeError(
        f"fused_rkl_loss(backend='triton') runs on CUDA devices (or on CPU under "
        f"TRITON_INTERPRET=1); got tensors on {device}; use backend='torch'")


def interpreter_enabled() -> bool:
    """Whether the kernels were built for Triton's interpreter.

    Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when
    ``rkld_kernels.triton_kernels`` was imported; asking the kernel object is the only answer
    that cannot disagree with what will actually run.
    """
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(rkl_stats_kernel, InterpretedFunction)


def launch_config(vocab: int, block_v: int | None = None) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a vocabulary of ``vocab`` columns.

    BLOCK_V is the next power of two of V capped at ``MAX_BLOCK_V`` unless given (tests force
    small blocks to exercise the loops and tails); num_warps gives each thread 8 to 16 columns.
    """
    if block_v is None:
        block_v = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    elif block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a positive power of two; got {block_v}")
    return block_v, max(1, min(8, block_v // 256))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_stats_splits(rows: int, vocab: int, block_v: int, device: torch.device) -> int:
    """How many V-splits per row the stats kernel uses: 1 when rows alone fill the GPU (and
    always off CUDA), else enough to reach ``_PROGRAMS_PER_SM`` programs per SM, at most one
    per BLOCK_V columns."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    target_programs = _PROGRAMS_PER_SM * _sm_count(index)
    if rows >= target_programs:
        return 1
    return max(1, min(triton.cdiv(vocab, block_v), triton.cdiv(target_programs, rows)))


def _check_inputs(student, original, strengthened, keep) -> None:
    for name, t in (("student", student), ("original", original), ("strengthened", strengthened)):
        if t is None:
            continue
        if t.dim() != 2 or t.shape != student.shape:
            raise ValueError(f"triton backend: {name} must be 2-D [rows, V] like the student "
                             f"{tuple(student.shape)}; got {tuple(t.shape)}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"triton backend: {name} must have unit stride along V; got "
                             f"strides {t.stride()}")
    if keep is not None and (keep.dtype != torch.bool or keep.shape != student.shape[:1]):
        raise ValueError(f"triton backend: keep must be a bool mask of shape "
                         f"({student.shape[0]},); got {keep.dtype} {tuple(keep.shape)}")


def _kernel_args(student, original, strengthened, keep, alpha, temperature, reverse, block_v):
    """Tensor and flag arguments shared by both kernels. Absent optional tensors are replaced
    by the student as a placeholder pointer that the kernel never reads (the flags say so)."""
    acc = tl.float64 if accumulation_dtype(student.dtype) == torch.float64 else tl.float32
    flags = dict(HAS_STRENGTHENED=strengthened is not None, HAS_KEEP=keep is not None,
                 REVERSE=bool(reverse), SCALE_BY_TEMPERATURE=float(temperature) != 1.0,
                 BLOCK_V=block_v, ACC=acc)
    strengthened = strengthened if strengthened is not None else student
    keep = keep.contiguous() if keep is not None else student
    return strengthened, keep, flags


def triton_rkl_forward(student: torch.Tensor, original: torch.Tensor,
                       strengthened: torch.Tensor | None, keep: torch.Tensor | None,
                       alpha: float, temperature: float, reverse: bool, *,
                       splits: int | None = None, block_v: int | None = None
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
    """Per-row losses and the statistics the backward needs.

    Inputs are ``[rows, V]`` with unit stride along V (any row stride, any float dtype each);
    ``keep`` is a bool ``[rows]`` mask or None. Returns ``loss_rows`` (float32, float64 for a
    float64 student; exactly 0 at masked rows; never negative) and ``(row_stats,)``, a
    ``[5, rows]`` tensor of student max and log-sum, teacher max and log-sum, and the loss.

    ``splits`` forces the number of V-splits per row (default: ``default_stats_splits``) and
    ``block_v`` the block width; both exist so tests can reach every code path on CPU.
    """
    _check_inputs(student, original, strengthened, keep)
    rows, vocab = student.shape
    acc_dtype = accumulation_dtype(student.dtype)
    loss = torch.empty(rows, dtype=acc_dtype, device=student.device)
    stats = torch.empty((STAT_COUNT, rows), dtype=acc_dtype, device=student.device)
    if rows == 0:
        return loss, (stats,)
    block_v, num_warps = launch_config(vocab, block_v)
    if splits is None:
        splits = default_stats_splits(rows, vocab, block_v, student.device)
    elif splits < 1:
        raise ValueError(f"splits must be >= 1; got {splits}")
    # Whole blocks per split, so every split starts on a block boundary; no empty splits.
    cols_per_split = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, cols_per_split)
    strengthened_arg, keep_arg, flags = _kernel_args(student, original, strengthened, keep,
                                                     alpha, temperature, reverse, block_v)
    partial = (torch.empty((PARTIAL_COUNT, rows, splits), dtype=acc_dtype, device=student.device)
               if splits > 1 else stats)   # placeholder when unused
    rkl_stats_kernel[(rows, splits)](
        student, original, strengthened_arg, keep_arg, stats, loss, partial,
        rows, vocab, cols_per_split, partial.stride(0),
        student.stride(0), original.stride(0), strengthened_arg.stride(0),
        float(alpha), float(temperature),
        FINALIZE=splits == 1, num_warps=num_warps, **flags)
    if splits > 1:
        rkl_stats_combine_kernel[(rows,)](
            partial, keep_arg, stats, loss, rows, splits, partial.stride(0),
            HAS_KEEP=flags["HAS_KEEP"], REVERSE=flags["REVERSE"],
            SPLITS_BLOCK=triton.next_power_of_2(splits), num_warps=1)
    # KL >= 0: a row whose rounded sum fell below 0 (a KL of 1e-10 at temperature 0.05 can) is
    # reported as 0, which is also nearer the exact value; clamp_min keeps NaN.
    loss.clamp_min_(0.0)
    return loss, (stats,)


def triton_rkl_backward(student: torch.Tensor, original: torch.Tensor,
                        strengthened: torch.Tensor | None, keep: torch.Tensor | None,
                        stats, grad_rows: torch.Tensor, alpha: float, temperature: float,
                        reverse: bool, *, block_v: int | None = None) -> torch.Tensor:
    """``grad[r] = grad_rows[r] * dL_r / d student[r]`` as a contiguous tensor of the student's
    dtype and shape, zero at masked rows. ``stats`` is what ``triton_rkl_forward`` returned;
    ``grad_rows`` may have any stride (autograd hands over expanded scalars)."""
    _check_inputs(student, original, strengthened, keep)
    (row_stats,) = stats
    rows, vocab = student.shape
    grad = torch.empty((rows, vocab), dtype=student.dtype, device=student.device)
    if rows == 0:
        return grad
    block_v, num_warps = launch_config(vocab, block_v)
    strengthened_arg, keep_arg, flags = _kernel_args(student, original, strengthened, keep,
                                                     alpha, temperature, reverse, block_v)
    rkl_grad_kernel[(rows, triton.cdiv(vocab, block_v))](
        grad, student, original, strengthened_arg, keep_arg, row_stats, grad_rows,
        rows, vocab,
        student.stride(0), original.stride(0), strengthened_arg.stride(0), grad_rows.stride(0),
        float(alpha), float(temperature),
        num_warps=num_warps, **flags)
    return grad
