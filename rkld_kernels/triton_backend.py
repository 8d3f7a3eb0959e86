"""Triton backend of ``fused_rkl_loss``: launch configuration and the entry points that
``rkld_kernels.fused_rkl`` calls. The kernels are in ``rkld_kernels.triton_kernels``.

Forward: ``rkl_stats_kernel`` streams each row once in tiles, each thread keeping its own
running maxima, sums and cross term (rebased when a maximum grows) and reducing across threads
once per row, and keeps only per-row floats. When there are too few rows to fill the GPU, each
row is cut into V-splits on a 2-D grid (with smaller tiles) and ``rkl_stats_combine_kernel``
merges the partial sums. Backward: ``rkl_grad_kernel`` on a 2-D (row x tile) grid recomputes
p (and q) from the logits plus those statistics and writes the gradient, the only ``[rows, V]``
tensor either pass allocates. Rows whose start is not 16-byte aligned (V = 50257 in bf16) are
read from the aligned address before them, so full tiles still load 16 bytes at a time.

``plan_forward`` / ``plan_backward`` decide the launches (grid, tile shape, warps) without
running them; the entry points run what they return, and the compile checks compile exactly
that for GPU targets (``bench/machine_code.py``, ``bench/kernel_report.py``).

CUDA graphs: nothing here reads a device value on the host (no ``.item()``, ``nonzero`` or
``torch.equal``); grid sizes depend only on shapes and on the device's SM count (read once per
device), the alignment choice only on shapes, strides and data pointers, and buffers come from
``torch.empty``, so both passes can be captured in a CUDA graph. Run one eager step first so
that Triton compiles the kernels outside the capture.

On CPU tensors the kernels run under Triton's interpreter (for tests), which has to be switched
on with ``TRITON_INTERPRET=1`` before triton is first imported.

Precision: the kernels compute in the compute dtype the losses pass (their ``compute_dtype``
option; by default ``torch_backend.compute_dtype(dtype)``): float32 for float16/bfloat16/float32
students, float64 for float64 ones or when the option asks for it, a specialisation selected by
the ``ACC`` constexpr (the float32 code is the same whether or not the float64 one exists;
float64 runs at full rate on H100/H200-class GPUs but much slower on GPUs with reduced float64
throughput). ``alpha``,
``T`` (``1 / T`` for the gradient) and ``log2(e) / T`` reach the kernels twice, as float32
scalars (Triton's type for Python floats) for the float32 code and as float64 ones for the
float64 code, each computed in double
precision on the host and rounded once. float32 logits computed in float32 (float32 students,
and the fused-linear loss's chunk logits of float32 heads) run a ``PRECISE`` variant of the float32
code (``precise_float32``; ``triton_kernels.rkl_stats`` says what it changes) whose gradient is
within 2x the naive float32 formula's error. Rows of a nearly one-hot student get their top
token's gradient from the other entries (``triton_kernels.rkl_grad``; one more small launch,
``rkl_grad_top_kernel``, per backward).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .torch_backend import accumulation_dtype, compute_dtype

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
        rkl_grad_top_kernel,
        rkl_stats_combine_kernel,
        rkl_stats_kernel,
    )

# Launch rule (bench/kernel_report.py shows the compiled code behind it). A tile gives each
# thread 16 bytes of every input per repeat (one vector load: 8 bf16 or 4 float32 columns) and
# _TILE_REPEATS repeats; programs of _NUM_WARPS warps stream rows through such tiles. 2 warps
# x 8 repeats (4096 bf16 columns a tile) keep 64 columns per thread and tensor in flight, which
# spreads the per-tile rebasing and loop overhead thinly (under 20 SASS instructions per column
# on sm_90) at about 170 registers, 6 programs per SM, and ~150 KB of loads in flight per SM.
MAX_BLOCK_V = 4096
_NUM_WARPS = 2
_TILE_REPEATS = 8
_TILE_BYTES_PER_THREAD = 16
# The stats grid aims for this many programs per SM before it splits rows over V; split rows
# use smaller tiles (down to _MIN_SPLIT_BLOCK columns) so that short rows still fill the GPU.
_PROGRAMS_PER_SM = 4
_MIN_SPLIT_BLOCK = 256
# The gradient kernel's threads hold at least this many repeats (see launch_config).
_GRAD_MIN_REPEATS = 2
_LOG2E = 1.4426950408889634


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


@dataclass(frozen=True)
class TileShape:
    """One program's tile: ``tile_r`` repeats of ``threads`` threads holding ``tile_k``
    contiguous columns each (``block`` columns in all), launched with ``num_warps`` warps."""
    block: int
    tile_r: int
    threads: int
    tile_k: int
    num_warps: int

    def constexprs(self) -> dict:
        return dict(TILE_R=self.tile_r, THREADS=self.threads, TILE_K=self.tile_k)


def launch_config(vocab: int, block_v: int | None = None, element_size: int = 2,
                  repeats: int = _TILE_REPEATS, min_repeats: int = 1) -> TileShape:
    """The tile shape for a vocabulary of ``vocab`` columns of ``element_size``-byte logits.

    The block is the next power of two of V capped at ``MAX_BLOCK_V`` and at ``_TILE_REPEATS``
    vector loads per thread, and never narrower than one 16-byte vector (8 bf16 or 4 float32
    columns: the row alignment's unit, see ``tile_alignment``), unless ``block_v`` is given
    (tests force small blocks to exercise the loops and tails). Each thread holds 16 bytes of
    each input per repeat; threads (at most ``_NUM_WARPS`` warps) and then repeats (at most
    ``repeats``) fill the block. ``min_repeats``: fewer warps (down to one) until each thread
    holds that many repeats, for the gradient kernel, whose programs run one tile each: its
    per-program set-up (about 130 instructions a thread) would otherwise cost more than the
    tile's columns in the V-split's small blocks.
    """
    if block_v is None:
        per_thread = max(1, _TILE_BYTES_PER_THREAD // element_size)
        block_v = min(MAX_BLOCK_V, max(per_thread, triton.next_power_of_2(vocab)),
                      repeats * 32 * _NUM_WARPS * per_thread)
    elif block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a positive power of two; got {block_v}")
    tile_k = max(1, min(_TILE_BYTES_PER_THREAD // element_size, block_v // 32))
    threads = max(1, min(32 * _NUM_WARPS, block_v // tile_k))
    while threads > 32 and block_v // (threads * tile_k) < min_repeats:
        threads //= 2
    return TileShape(block=block_v, tile_r=block_v // (threads * tile_k), threads=threads,
                     tile_k=tile_k, num_warps=max(1, threads // 32))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (read once per device), None off CUDA."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def split_block(rows: int, vocab: int, block: int, sm_count: int | None) -> int:
    """The block of both kernels: ``block`` when rows alone reach ``_PROGRAMS_PER_SM`` programs
    per SM (and always off CUDA), else the largest power of two, at least ``_MIN_SPLIT_BLOCK``,
    that cuts every row into enough blocks to get there."""
    if sm_count is None:
        return block
    target = _PROGRAMS_PER_SM * sm_count
    if rows >= target:
        return block
    per_row = triton.cdiv(target, rows)
    while block > _MIN_SPLIT_BLOCK and triton.cdiv(vocab, block) < per_row:
        block //= 2
    return block


def default_stats_splits(rows: int, vocab: int, block_v: int, sm_count: int | None) -> int:
    """How many V-splits per row the stats kernel uses: 1 when rows alone fill the GPU (and
    always off CUDA), else enough for ``_PROGRAMS_PER_SM`` programs per SM: whole blocks of
    ``block_v`` columns per split, as many splits as that allows up to the target."""
    if sm_count is None:
        return 1
    target_programs = _PROGRAMS_PER_SM * sm_count
    if rows >= target_programs:
        return 1
    blocks = triton.cdiv(vocab, block_v)
    per_split = max(1, blocks // triton.cdiv(target_programs, rows))
    return triton.cdiv(blocks, per_split)


def _check_inputs(student, original, strengthened, keep) -> None:
    for name, t in (("student", student), ("original", original), ("strengthened", strengthened)):
        if t is None:
            continue
        if t.dim() != 2 or tuple(t.shape) != tuple(student.shape):
            raise ValueError(f"triton backend: {name} must be 2-D [rows, V] like the student "
                             f"{tuple(student.shape)}; got {tuple(t.shape)}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"triton backend: {name} must have unit stride along V; got "
                             f"strides {t.stride()}")
    if keep is not None and (keep.dtype != torch.bool
                             or tuple(keep.shape) != tuple(student.shape[:1])):
        raise ValueError(f"triton backend: keep must be a bool mask of shape "
                         f"({student.shape[0]},); got {keep.dtype} {tuple(keep.shape)}")


def row_alignment(tensors, row_strides) -> int:
    """``VEC``, the number of columns in 16 bytes, when every tensor has that element size, a
    16-byte-aligned start, and a row stride equal to the others modulo VEC (then every row has
    the same offset from a 16-byte boundary in all of them, and the kernels shift their tiles
    onto it); else 1 (no shift; loads vectorise only as far as the JIT can prove alignment)."""
    sizes = {t.element_size() for t in tensors}
    if len(sizes) != 1:
        return 1
    vec = max(1, 16 // sizes.pop())
    if any(t.data_ptr() % 16 for t in tensors) or len({s % vec for s in row_strides}) != 1:
        return 1
    return vec


def tile_alignment(tile: TileShape, tensors, row_strides) -> int:
    """``VEC`` of the kernels: ``row_alignment``, but never more than the tile's width. A row
    starts ``lead = (row * stride) % VEC`` columns after its aligned address and tile 0 absorbs
    that lead; a tile narrower than VEC (a forced small ``block_v``) could not, and the "full"
    tiles after it would start in the previous row. Alignment to a smaller power of two still
    holds where VEC's does."""
    return min(row_alignment(tensors, row_strides), tile.block)


@dataclass
class KernelLaunch:
    """One kernel launch: ``kernel[grid](*args, num_warps=num_warps, **constexprs)``. The
    compile checks (``tests/test_kernels_compile.py``, ``bench/kernel_report.py``) compile
    exactly these arguments for GPU targets without launching anything."""
    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int

    def __call__(self):
        self.kernel[self.grid](*self.args, num_warps=self.num_warps, **self.constexprs)


def _repeats(element_size: int, acc_dtype: torch.dtype) -> int:
    """Tile repeats: ``_TILE_REPEATS``, but a quarter of them for float32 inputs computed in
    float64, whose 32 columns per thread of float64 work (software exp2 and log2 included)
    would spill registers."""
    if acc_dtype == torch.float64 and element_size < 8:
        return max(1, _TILE_REPEATS // 4)
    return _TILE_REPEATS


def _tile_for(inputs, acc_dtype, rows: int, vocab: int, block_v, sm_count,
              min_repeats: int = 1):
    """The launch configuration of both passes: tile width from the widest input's element
    size and the compute dtype's repeats, split over the vocabulary (``block_v`` None) so that
    a few rows still fill the GPU. Both passes get the same block (so the same tiles of a
    row); ``min_repeats`` only changes how many threads share it (see ``launch_config``)."""
    element_size = max(t.element_size() for t in inputs)
    repeats = _repeats(element_size, acc_dtype)
    if block_v is None:
        block_v = split_block(rows, vocab,
                              launch_config(vocab, None, element_size, repeats).block, sm_count)
    return launch_config(vocab, block_v, element_size, repeats, min_repeats)


def precise_float32(student_dtype: torch.dtype, acc_dtype: torch.dtype) -> bool:
    """Whether the kernels run their ``PRECISE`` float32 code (``triton_kernels.rkl_stats``):
    float32 logits computed in float32. Its gradient is within 2x the naive float32 formula's
    error, where the plain float32 code (exp2 of rounded log2-domain arguments, the 16-bit
    inputs' code, whose machine code it keeps) is 2-3x it. float16/bfloat16 students and the
    float64 specialisation take the plain code."""
    return student_dtype == torch.float32 and acc_dtype == torch.float32


def _common_args(student, original, strengthened, keep, reverse, compute=None, precise=None):
    """Flags and placeholders shared by both kernels. Absent optional tensors are replaced by
    the student as a placeholder pointer that the kernel never reads (the flags say so).
    ``compute``: the kernels' dtype (default: ``compute_dtype`` of the student's on triton).
    ``precise``: whether float32 logits computed in float32 take the ``PRECISE`` code (default:
    ``precise_float32``); the fused-linear loss passes False for the float32 chunk logits of
    float16/bfloat16 heads, whose contract the plain float32 code meets."""
    acc_dtype = compute or compute_dtype(student.dtype)
    acc = tl.float64 if acc_dtype == torch.float64 else tl.float32
    flags = dict(HAS_STRENGTHENED=strengthened is not None, HAS_KEEP=keep is not None,
                 REVERSE=bool(reverse), ACC=acc,
                 PRECISE=(precise_float32(student.dtype, acc_dtype) if precise is None
                          else bool(precise) and acc_dtype == torch.float32))
    inputs = [t for t in (student, original, strengthened) if t is not None]
    strengthened = strengthened if strengthened is not None else student
    keep = keep if keep is not None else student
    return strengthened, keep, flags, inputs, acc_dtype


def _scalars(alpha: float, temperature: float) -> tuple[float, float, float]:
    """The kernels' host scalars ``alpha, T, log2(e) / T`` in double precision; each is passed
    twice, as a float32 argument for the float32 code and a float64 one for the float64 code."""
    alpha, temperature = float(alpha), float(temperature)
    return alpha, temperature, _LOG2E / temperature


def _alpha_zero(strengthened, alpha: float) -> bool:
    """Whether the teacher is the original logits themselves (strengthened logits at
    ``alpha = 0``): the kernels then skip ``o - 0 * relu(g - o)``, which is NaN where
    ``o = -inf`` (see ``triton_kernels.logits.teacher_logits``)."""
    return strengthened is not None and alpha == 0.0


def plan_forward(student, original, strengthened, keep, alpha: float, temperature: float,
                 reverse: bool, *, splits: int | None = None, block_v: int | None = None,
                 sm_count: int | None = None, empty=None, compute=None, precise=None):
    """Outputs and launches of the forward pass, without running anything.

    ``empty(shape, dtype)`` allocates the outputs (default: ``torch.empty`` on the student's
    device); ``sm_count`` (None off CUDA) decides the V-split; ``compute`` the kernels' dtype
    (default: ``compute_dtype`` of the student's). Returns ``(loss, row_stats, launches)``:
    the loss in ``accumulation_dtype`` of the student's dtype, the statistics in the compute
    dtype.
    """
    if empty is None:
        def empty(shape, dtype):
            return torch.empty(shape, dtype=dtype, device=student.device)
    rows, vocab = student.shape
    strengthened_arg, keep_arg, flags, inputs, acc_dtype = _common_args(
        student, original, strengthened, keep, reverse, compute, precise)
    loss = empty((rows,), accumulation_dtype(student.dtype))
    stats = empty((STAT_COUNT, rows), acc_dtype)
    if rows == 0:
        return loss, stats, []
    tile = _tile_for(inputs, acc_dtype, rows, vocab, block_v, sm_count)
    vec = tile_alignment(tile, inputs, [t.stride(0) for t in inputs])
    # Tiles of the longest row (a row shifted by its alignment may need one more).
    n_tiles = triton.cdiv(vocab + vec - 1, tile.block)
    if splits is None:
        splits = default_stats_splits(rows, vocab, tile.block, sm_count)
    elif splits < 1:
        raise ValueError(f"splits must be >= 1; got {splits}")
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)   # no empty splits
    partial = empty((PARTIAL_COUNT, rows, splits), acc_dtype) if splits > 1 else stats
    alpha, temperature, scale = _scalars(alpha, temperature)
    launches = [KernelLaunch(
        rkl_stats_kernel, (rows, splits),
        (student, original, strengthened_arg, keep_arg, stats, loss, partial,
         rows, vocab, tiles_per_split, partial.stride(0),
         student.stride(0), original.stride(0), strengthened_arg.stride(0),
         alpha, temperature, scale, alpha, scale),
        dict(FINALIZE=splits == 1, VEC=vec, FLOOR=-torch.finfo(acc_dtype).max,
             ALPHA_ZERO=_alpha_zero(strengthened, alpha), **tile.constexprs(), **flags),
        tile.num_warps)]
    if splits > 1:
        launches.append(KernelLaunch(
            rkl_stats_combine_kernel, (rows,),
            (partial, keep_arg, stats, loss, rows, splits, partial.stride(0), scale, scale),
            dict(HAS_KEEP=flags["HAS_KEEP"], REVERSE=flags["REVERSE"],
                 SPLITS_BLOCK=triton.next_power_of_2(splits), ACC=flags["ACC"],
                 PRECISE=flags["PRECISE"]), 1))
    return loss, stats, launches


def plan_backward(student, original, strengthened, keep, row_stats, grad_rows, alpha: float,
                  temperature: float, reverse: bool, *, block_v: int | None = None,
                  sm_count: int | None = None, empty=None, compute=None, precise=None):
    """The gradient tensor and the launches that fill it, without running anything (see
    ``plan_forward``; with few rows the tiles shrink as the stats kernel's splits do): the
    gradient kernel, then ``rkl_grad_top_kernel`` (the one-hot rows' top entries).
    Returns ``(grad, launches)``."""
    if empty is None:
        def empty(shape, dtype):
            return torch.empty(shape, dtype=dtype, device=student.device)
    rows, vocab = student.shape
    grad = empty((rows, vocab), student.dtype)
    if rows == 0:
        return grad, []
    strengthened_arg, keep_arg, flags, inputs, acc_dtype = _common_args(
        student, original, strengthened, keep, reverse, compute, precise)
    tile = _tile_for(inputs, acc_dtype, rows, vocab, block_v, sm_count,
                     min_repeats=_GRAD_MIN_REPEATS)
    # The gradient is contiguous: its row stride is V.
    vec = tile_alignment(tile, inputs + [grad], [t.stride(0) for t in inputs] + [vocab])
    tiles = triton.cdiv(vocab + vec - 1, tile.block)
    # Per row and tile, written (every slot of the row) and read only in one-hot rows (see
    # triton_kernels.rkl_grad).
    tile_sums = empty((rows, tiles), acc_dtype)
    top_index = empty((rows, tiles), torch.int32)
    top_grad = empty((rows, tiles), acc_dtype)
    alpha, temperature, scale = _scalars(alpha, temperature)
    launch = KernelLaunch(
        rkl_grad_kernel, (rows, tiles),
        (grad, student, original, strengthened_arg, keep_arg, row_stats, grad_rows,
         rows, vocab,
         student.stride(0), original.stride(0), strengthened_arg.stride(0), grad_rows.stride(0),
         alpha, 1.0 / temperature, scale, alpha, 1.0 / temperature, scale, tile_sums, top_index,
         top_grad),
        dict(VEC=vec, ALPHA_ZERO=_alpha_zero(strengthened, alpha), **tile.constexprs(), **flags),
        tile.num_warps)
    top = KernelLaunch(
        rkl_grad_top_kernel, (rows,),
        (grad, keep_arg, row_stats, tile_sums, top_index, top_grad, rows, vocab, tiles),
        dict(HAS_KEEP=flags["HAS_KEEP"], VEC=vec, BLOCK=tile.block,
             SUMS_BLOCK=min(1024, triton.next_power_of_2(tiles))), 1)
    return grad, [launch, top]


def triton_rkl_forward(student: torch.Tensor, original: torch.Tensor,
                       strengthened: torch.Tensor | None, keep: torch.Tensor | None,
                       alpha: float, temperature: float, reverse: bool, *,
                       splits: int | None = None, block_v: int | None = None,
                       compute: torch.dtype | None = None, precise: bool | None = None
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
    """Per-row losses and the statistics the backward needs.

    Inputs are ``[rows, V]`` with unit stride along V (any row stride, any float dtype each);
    ``keep`` is a bool ``[rows]`` mask or None. Returns ``loss_rows`` (float32, float64 for a
    float64 student; exactly 0 at masked rows; never negative) and ``(row_stats,)``, a
    ``[5, rows]`` tensor of student reference and log2-sum, teacher reference and log2-sum, and
    the cross term ``a / l_w`` (in log2 units, see ``triton_kernels.rkl_stats``).

    ``splits`` forces the number of V-splits per row (default: ``default_stats_splits``) and
    ``block_v`` the block width; both exist so tests can reach every code path on CPU.
    ``compute`` is the kernels' dtype (default ``compute_dtype`` of the student's; the
    fused-linear loss passes float32 for the float32 logits of float16/bfloat16 heads); the
    statistics are in it. ``precise``: see ``_common_args`` (the backward must get the same).
    """
    _check_inputs(student, original, strengthened, keep)
    keep = keep.contiguous() if keep is not None else None
    loss, stats, launches = plan_forward(student, original, strengthened, keep, alpha,
                                         temperature, reverse, splits=splits, block_v=block_v,
                                         sm_count=device_sm_count(student.device),
                                         compute=compute, precise=precise)
    for launch in launches:
        launch()
    # KL >= 0: a row whose rounded sum fell below 0 (a KL of 1e-10 at temperature 0.05 can) is
    # reported as 0, which is also nearer the exact value; clamp_min keeps NaN.
    loss.clamp_min_(0.0)
    return loss, (stats,)


def triton_rkl_backward(student: torch.Tensor, original: torch.Tensor,
                        strengthened: torch.Tensor | None, keep: torch.Tensor | None,
                        stats, grad_rows: torch.Tensor, alpha: float, temperature: float,
                        reverse: bool, *, block_v: int | None = None,
                        compute: torch.dtype | None = None,
                        precise: bool | None = None) -> torch.Tensor:
    """``grad[r] = grad_rows[r] * dL_r / d student[r]`` as a contiguous tensor of the student's
    dtype and shape, zero at masked rows. ``stats`` is what ``triton_rkl_forward`` returned;
    ``grad_rows`` may have any stride (autograd hands over expanded scalars)."""
    _check_inputs(student, original, strengthened, keep)
    keep = keep.contiguous() if keep is not None else None
    (row_stats,) = stats
    grad, launches = plan_backward(student, original, strengthened, keep, row_stats, grad_rows,
                                   alpha, temperature, reverse, block_v=block_v,
                                   sm_count=device_sm_count(student.device), compute=compute,
                                   precise=precise)
    for launch in launches:
        launch()
    return grad
