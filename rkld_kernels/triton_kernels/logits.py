"""Device helper shared by the stats and gradient kernels: load one block of a row's logits and
form the tempered student and teacher logits from it in registers.

The teacher is Triton's restatement of ``rkld_kernels.reference.unlearning_teacher_logits``
(the reference stays the specification).
"""
import triton
import triton.language as tl


@triton.jit
def load_tempered_logits(student_row_ptr, original_row_ptr, strengthened_row_ptr, cols, active,
                         alpha, temperature, HAS_STRENGTHENED: tl.constexpr,
                         SCALE_BY_TEMPERATURE: tl.constexpr, ACC: tl.constexpr):
    """Student logits and teacher logits ``o - alpha * relu(g - o)`` (or ``o`` without ``g``),
    both divided by the temperature, in the accumulation dtype.

    Inactive lanes (past the end of the row, or in a masked row) read as ``-inf`` in both, so
    they carry zero probability and are never read from memory.
    """
    s = tl.load(student_row_ptr + cols, mask=active, other=float("-inf")).to(ACC)
    z = tl.load(original_row_ptr + cols, mask=active, other=float("-inf")).to(ACC)
    if HAS_STRENGTHENED:
        g = tl.load(strengthened_row_ptr + cols, mask=active, other=float("-inf")).to(ACC)
        # relu written as where(diff < 0, 0, diff) keeps a NaN difference NaN (maximum may drop
        # NaN on the GPU). Where o is -inf, diff is +inf or NaN: the teacher stays -inf there.
        diff = g - z
        boost = tl.where(diff < 0, 0.0, diff)
        z = tl.where(z == float("-inf"), z, z - alpha * boost)
    if SCALE_BY_TEMPERATURE:
        s = s / temperature
        z = z / temperature
    return s, z
