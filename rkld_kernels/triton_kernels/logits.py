"""Device helpers shared by the stats and gradient kernels: the tile geometry of a row, loading
one tile of logits, and forming the unlearning teacher from it in registers.

Tiles. A program works on tiles of ``TILE_R x THREADS x TILE_K`` columns: thread ``t`` holds
``TILE_K`` contiguous columns (16 bytes of the input dtype, so one vector load per tensor) in
each of ``TILE_R`` repeats. Everything per column stays inside the thread; only the end of a
row (or split) reduces across threads.

Alignment. A row that starts off a 16-byte boundary (V = 50257 in bf16) would defeat vector
loads. Tiles therefore start from the row's column ``-lead``, where ``lead = (row * stride) %
VEC`` puts tile 0 on an aligned address; the first tile is then partial (masked below column
0), the middle ones are full and load without a mask, and the last one is masked at V. ``VEC``
is 1 (no shift) when the tensors do not share one alignment.

The teacher is Triton's restatement of ``rkld_kernels.reference.unlearning_teacher_logits``
(the reference stays the specification).
"""
import triton
import triton.language as tl


@triton.jit
def tile_offsets(TILE_R: tl.constexpr, THREADS: tl.constexpr, TILE_K: tl.constexpr):
    """The ``TILE_R * THREADS * TILE_K`` column offsets of a tile, as one flat range: Triton's
    layout for it gives each thread TILE_K contiguous columns in each of TILE_R repeats, which
    ``as_thread_tile`` then exposes as dims 0 and 2 of a ``[TILE_R, THREADS, TILE_K]`` view.
    (Building the offsets as a 3-D tensor instead lets some Triton versions spread dim 0 over
    lanes, and every per-thread reduction becomes a shuffle.)"""
    return tl.arange(0, TILE_R * THREADS * TILE_K)


@triton.jit
def as_thread_tile(x, TILE_R: tl.constexpr, THREADS: tl.constexpr, TILE_K: tl.constexpr):
    """A flat tile viewed as ``[TILE_R, THREADS, TILE_K]``: reductions over dims 0 and 2 stay
    inside a thread."""
    return tl.reshape(x, [TILE_R, THREADS, TILE_K])


@triton.jit
def row_geometry(row, vocab, stride, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """Where a row's tiles start and which are full.

    Returns ``(aligned_offset, lead, full_lo, full_hi, n_tiles)``: tile ``i`` covers the row's
    columns ``[i * BLOCK - lead, (i + 1) * BLOCK - lead)`` and starts at element offset
    ``aligned_offset + i * BLOCK`` of the tensor, a multiple of VEC; tiles ``full_lo`` to
    ``full_hi`` (exclusive) lie inside the row, the others (at most the first and the last of the
    ``n_tiles``) are partial.
    """
    # A tile narrower than VEC would let lead reach past tile 0, so that the "full" tiles
    # started before column 0 (in the previous row); the launcher keeps VEC <= BLOCK.
    tl.static_assert(VEC <= BLOCK, "the row alignment VEC must not exceed the tile width")
    start = row * stride
    lead = (start % VEC).to(tl.int32)
    aligned_offset = tl.multiple_of(start - lead, VEC)
    end = vocab + lead
    full_lo = tl.where(lead > 0, 1, 0)
    full_hi = end // BLOCK
    n_tiles = tl.cdiv(end, BLOCK)
    return aligned_offset, lead, full_lo, full_hi, n_tiles


@triton.jit
def load_tile(row_ptr, offsets, lead, vocab, MASKED: tl.constexpr):
    """One tile of a row in the input dtype; ``row_ptr`` points at the tile's first (aligned)
    element. A masked tile reads columns outside the row as ``-inf``."""
    if MASKED:
        inside = (offsets >= lead) & (offsets < vocab + lead)
        return tl.load(row_ptr + offsets, mask=inside, other=float("-inf"))
    else:
        return tl.load(row_ptr + offsets)


@triton.jit
def to_acc(x, ACC: tl.constexpr):
    """``x`` in the accumulation dtype. bfloat16 is the top half of a float32, so it widens by
    a shift (or, for the odd element of a packed pair, a mask): one integer instruction per
    element, where the generic conversion compiles to two for every other element."""
    if x.dtype == tl.bfloat16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True).to(ACC)
    else:
        return x.to(ACC)


@triton.jit
def teacher_logits(original, strengthened, alpha, ALPHA_ZERO: tl.constexpr):
    """``o - alpha * relu(g - o)``: three instructions per element, no per-element guard.

    The relu drops NaN (``max(NaN, 0) = 0``), which is what keeps an entry with
    ``o = g = -inf`` (vocabulary masking, ``g - o = NaN``) at ``-inf - 0 = -inf``, as the
    reference's explicit guard does; with ``o = -inf`` and ``g`` not, ``-inf - alpha * inf``
    is ``-inf`` for ``alpha > 0``. ``alpha = 0`` (``ALPHA_ZERO``, chosen on the host) would
    make that ``-inf - 0 * inf = NaN``, so it takes the teacher ``o`` itself. The relu also
    drops a NaN of ``g`` (and, at ``alpha = 0``, the NaN that ``0 * inf`` gives the reference
    for ``g = +inf``), which the stats kernel therefore tracks on its own (``nan_max``) and
    turns into a NaN row; NaN in ``o`` stays NaN here.
    """
    if ALPHA_ZERO:
        return original
    else:
        boost = tl.maximum(strengthened - original, 0.0)
        return original - alpha * boost


@triton.jit
def _max_keep_nan(a, b):
    # Some Triton versions widen 16-bit operands here; the maximum is exact in the input dtype.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL).to(a.dtype)


@triton.jit
def nan_max(x):
    """Per-thread maximum over a tile's dims 2 and 0 that is NaN when any entry is NaN; on
    16-bit inputs it takes two columns per instruction."""
    return tl.reduce(tl.reduce(x, 2, _max_keep_nan), 0, _max_keep_nan)
