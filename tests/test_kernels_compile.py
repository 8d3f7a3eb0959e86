"""The Triton kernels compiled for real NVIDIA targets (sm_80, sm_90, sm_100), on the CPU.

The other tests run the kernels in Triton's interpreter, which checks the math but not the
machine code. Here every kernel specialisation that the triton backend launches for the cases
users hit (``machine_code.CASES``: bf16 / fp16 / fp32, with and without strengthened logits,
reverse and forward, T = 1 and T != 1, a keep mask, the V-split path, the fused-linear chunk
pass, float32 inputs computed in float32 and in float64, float64 inputs) is compiled by
Triton's own compiler and ``ptxas`` for each target, in a subprocess with the interpreter off
(``bench/machine_code.py``, a development tool outside the installed package), and its SASS is
read, on sm_80, sm_90 and sm_100 alike: no spills or local memory, 128-bit global loads in the
streaming code, no barrier or shuffle inside any loop of global loads (the statistics loop,
the partial-tile loops, the one-hot rows' loop) nor along the gradient's full-tile path, at
most 30 instructions per element for every bf16 case, and the instruction budget on sm_90.

Compilations and their analysis are cached, keyed by the kernels' source, the specialisation,
the target, Triton's version and the analysis code, so a second run compiles nothing, also from
another checkout: in ``RKLD_KERNEL_CODE_CACHE`` when set, else in the user's cache folder
(``$XDG_CACHE_HOME`` or ``~/.cache``, then ``rkld/kernel-code``), else (not writable) in pytest's
cache folder. A first run on a new machine compiles about 50 kernels (minutes on 2 cores).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from rkld_kernels import triton_backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import machine_code  # noqa: E402
STREAMING_KERNELS = ("rkl_stats_kernel", "rkl_grad_kernel")
# The budgets the kernels were rebuilt to (lane-instructions per element, sm_90, bf16 with
# strengthened logits): see the README's kernel report.
SM90_BUDGET = {"rkl_stats_kernel": 20.0, "rkl_grad_kernel": 20.0}
# Every bf16 case, every target, along the streaming code (loop body or full-tile path).
BF16_BUDGET = 30.0


def cache_folder(request) -> Path:
    folder = machine_code.default_cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".writable-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return folder
    except OSError:
        return Path(request.config.cache.mkdir("rkld-kernel-code"))


@pytest.fixture(scope="module")
def reports(request):
    cache = cache_folder(request)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache / "triton")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton's default, without its warning
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "machine_code.py"),
         "--cache", str(cache / "reports")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def rows_of(reports, kernel=None, arch=None, case=None):
    return [r for r in reports
            if (kernel is None or r["launch"]["kernel"] == kernel)
            and (arch is None or r["arch"] == arch) and (case is None or r["case"] == case)]


def test_every_launch_compiles_for_every_target(reports):
    expected = {(case.name, phase, launch.kernel.__name__, arch)
                for case in machine_code.CASES
                for phase, launch in machine_code.case_launches(case)
                for arch in machine_code.TARGETS}
    got = {(r["case"], r["phase"], r["launch"]["kernel"], r["arch"]) for r in reports}
    assert got == expected
    for r in reports:
        assert r["code"]["registers"] > 0 and r["code"]["total_instructions"] > 0, r


def test_no_spills_and_no_local_memory(reports):
    for r in reports:
        code = r["code"]
        assert code["spill_instructions"] == 0, (r["case"], r["arch"], code)
        assert code["local_bytes"] == 0 and code["stack_bytes"] == 0, (r["case"], r["arch"])
        assert code["programs_per_sm"] >= 1, (r["case"], r["arch"], code["registers"])


def input_tensors(case):
    return 3 if case.strengthened else 2


@pytest.mark.parametrize("arch", machine_code.TARGETS)
def test_full_tiles_load_128_bits(reports, arch):
    """Every input column of a full tile arrives by a 16-byte load, also for V = 50257 (rows
    off the 16-byte grid), and the gradient leaves by 16-byte stores."""
    for case in machine_code.CASES:
        for kernel in STREAMING_KERNELS:
            for r in rows_of(reports, kernel, arch, case.name):
                loads, code = r["code"]["stream_loads"], r["code"]
                per_thread = r["launch"]["columns_per_thread"]
                element = torch.finfo(getattr(torch, case.dtype)).bits // 8
                vector_loads = input_tensors(case) * per_thread * element // 16
                assert loads.get("LDG.E.128", 0) == vector_loads, (case.name, kernel, loads)
                if kernel == "rkl_stats_kernel":
                    assert set(loads) == {"LDG.E.128"}, (case.name, loads)
                else:
                    assert set(code["stream_stores"]) == {"STG.E.128"}, (case.name, code)
                    assert code["stream_stores"]["STG.E.128"] == per_thread * element // 16


@pytest.mark.parametrize("arch", machine_code.TARGETS)
def test_stats_streaming_loop_has_no_barrier_or_shuffle(reports, arch):
    """Each thread keeps its running state through the loop; the cross-thread reduction is
    outside it."""
    stats = rows_of(reports, "rkl_stats_kernel", arch)
    assert stats
    for r in stats:
        code = r["code"]
        assert code["streaming"] == "loop", r["case"]
        assert code["stream_barriers"] == 0 and code["stream_shuffles"] == 0, (r["case"], code)


@pytest.mark.parametrize("arch", machine_code.TARGETS)
def test_no_barrier_or_shuffle_in_any_loop_of_loads(reports, arch):
    """Not in the statistics loop, the masked partial-tile loops, nor the gradient's one-hot
    loop (whose sums each thread keeps for itself until the loop ends), and not along the
    gradient's full-tile path; float32 and float64 specialisations included."""
    streaming = [r for kernel in STREAMING_KERNELS for r in rows_of(reports, kernel, arch)]
    assert {r["case"] for r in streaming} == {case.name for case in machine_code.CASES}
    for r in streaming:
        code = r["code"]
        for loop in code["loops"]:
            assert loop["barriers"] == 0 and loop["shuffles"] == 0, (r["case"], arch, loop)
        assert code["stream_barriers"] == 0 and code["stream_shuffles"] == 0, (r["case"], arch)


@pytest.mark.parametrize("arch", machine_code.TARGETS)
def test_bf16_instruction_budget_on_every_target(reports, arch):
    """Every bf16 case: at most 30 SASS instructions per element along the streaming code
    (the statistics loop's body, the gradient's full-tile path, set-up included)."""
    cases = [case for case in machine_code.CASES if case.dtype == "bfloat16"]
    assert cases
    for case in cases:
        for kernel in STREAMING_KERNELS:
            (r,) = rows_of(reports, kernel, arch, case.name)
            assert machine_code.per_element(r) <= BF16_BUDGET, (case.name, kernel, arch,
                                                                 machine_code.per_element(r))


def test_sm90_instruction_budget(reports):
    """bf16 with strengthened logits, sm_90: at most 20 SASS instructions per element in the
    statistics loop and along the gradient's full-tile path; and a row of V = 50257 (not a
    multiple of 16) costs at most 1.5x a row of V = 50304."""
    for kernel, budget in SM90_BUDGET.items():
        (main,) = rows_of(reports, kernel, 90, "bf16 RKLD 8192x128256")
        assert machine_code.per_element(main) <= budget, (kernel, main["code"])
        (aligned,) = rows_of(reports, kernel, 90, "bf16 RKLD 8192x50304")
        (unaligned,) = rows_of(reports, kernel, 90, "bf16 RKLD 8192x50257 (unaligned rows)")
        ratio = (machine_code.row_per_element(unaligned, 50257)
                 / machine_code.row_per_element(aligned, 50304))
        assert ratio <= 1.5, (kernel, ratio)


def test_v_split_fills_the_gpu():
    """16 rows x 32000 on 132 SMs: at least 4 programs per SM in both passes."""
    launches = machine_code.case_launches(
        machine_code.Case("split", 16, 32000), sm_count=machine_code.H100_SMS)
    for phase, launch in launches:
        if launch.kernel.__name__ in STREAMING_KERNELS:
            programs = launch.grid[0] * launch.grid[1]
            assert programs >= 4 * machine_code.H100_SMS, (phase, launch.grid)


def test_rows_alone_fill_the_gpu_without_split():
    launches = machine_code.case_launches(machine_code.Case("rows", 8192, 128256))
    (stats,) = [launch for _, launch in launches if launch.kernel.__name__ == "rkl_stats_kernel"]
    assert stats.grid == (8192, 1) and stats.constexprs["FINALIZE"]


def test_alignment_shift_only_when_all_tensors_share_it():
    """VEC (the tiles' alignment shift) needs one element size, 16-byte-aligned starts and row
    strides equal modulo VEC; otherwise the kernels run unshifted (VEC = 1)."""
    bf16 = torch.bfloat16
    same = [machine_code.fake_tensor((4, 50257), bf16) for _ in range(3)]
    assert triton_backend.row_alignment(same, [t.stride(0) for t in same]) == 8
    padded = machine_code.fake_tensor((4, 50257), bf16, strides=(50264, 1))
    mixed_strides = same[:2] + [padded]
    assert triton_backend.row_alignment(mixed_strides, [t.stride(0) for t in mixed_strides]) == 1
    mixed_dtypes = same[:2] + [machine_code.fake_tensor((4, 50257), torch.float32)]
    assert triton_backend.row_alignment(mixed_dtypes, [t.stride(0) for t in mixed_dtypes]) == 1
    offset = machine_code.FakeTensor((4, 50257), bf16, address=(1 << 24) + 2)
    assert triton_backend.row_alignment(same[:2] + [offset], [50257] * 3) == 1
