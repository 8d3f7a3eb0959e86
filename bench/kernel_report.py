"""Machine-code report of the triton backend's kernels, with a roofline model of their speed.

    python bench/kernel_report.py [--json] [--json-out FILE] [--targets 80,90,100|device]
                                  [--cache DIR] [--bench-only] [--measure]

No GPU is needed: every kernel launch of ``machine_code.CASES`` is compiled for each target by
Triton's compiler and ``ptxas`` (``bench/machine_code.py``) and its SASS is
read. Per kernel and target the table gives registers, programs and warps per SM (occupancy
from registers, threads and shared memory), the widths of the global loads in the streaming
code, SASS lane-instructions, MUFU operations, barriers and shuffles per element (per
thread per full tile, divided by the columns a thread handles), and the bytes each element
moves. When liger-kernel is installed, its JSD (beta = 1, the reverse KL of log-probs),
KL-div and cross-entropy kernels are compiled the same way, with the launch parameters
Liger's own host code uses, for comparison.

The model (``predict``), for every case and the benchmark shapes on H100, H200 and B200, is an upper bound
from three limits, whichever is slowest:

- memory: bytes moved / HBM bandwidth (the peak, not a measured copy);
- issue: lane-instructions / (SMs x 4 schedulers x 32 lanes x clock), 1 warp instruction per
  scheduler and cycle, with the whole row's code (partial tiles and per-program set-up too);
- MUFU: exponentials / (SMs x 16 x clock);

where the memory time follows Little's law: a program keeps one tile's loads in flight, so
``n`` programs sustain at most ``n x tile bytes / DRAM latency`` (``DRAM_LATENCY_NS``); the
grid runs in waves of the resident programs (occupancy from the SASS), and a last, partial
wave may hold too few programs to saturate HBM. ``LAUNCH_US`` is added per launch. The
predicted fraction is (bytes / HBM peak) / predicted time.
It ignores cache effects, DRAM efficiency (a device copy reaches ~90 % of the peak) and
instruction latencies, so a measured time above it says which of those matters; ``--measure``
(CUDA only) prints the measured time of each pass next to the prediction for this GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") and __name__ == "__main__":
    # The kernels must be built for compilation, not for Triton's interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import machine_code  # noqa: E402

GPUS = {
    # arch, SMs, boost clock (GHz), HBM peak (TB/s): vendor data sheets (H100 SXM5).
    "H100": dict(arch=90, sms=132, clock_ghz=1.98, hbm_tbs=3.35),
    "H200": dict(arch=90, sms=132, clock_ghz=1.98, hbm_tbs=4.8),
    "B200": dict(arch=100, sms=148, clock_ghz=1.965, hbm_tbs=8.0),
}
ISSUE_PER_SM_CYCLE = 4 * 32     # lane-instructions: 4 schedulers x 1 warp instruction
MUFU_PER_SM_CYCLE = 16
DRAM_LATENCY_NS = 800.0
LAUNCH_US = 3.0
# The benchmark shapes of bench/test_bench_fused_rkl.py (bf16, strengthened logits, reverse KL,
# no labels).
BENCH_SHAPES = ((8192, 32000), (8192, 128256), (16384, 128256))
PHASE_BYTES = {"forward": "inputs", "backward": "inputs+grad"}


def bench_cases():
    return [machine_code.Case(f"bench bf16 RKLD {rows}x{vocab}", rows, vocab, keep=False)
            for rows, vocab in BENCH_SHAPES]


def element_bytes(case, phase: str) -> int:
    size = {"float32": 4, "float64": 8}.get(case.dtype, 2)
    inputs = (3 if case.strengthened else 2) * size
    return inputs + (size if phase == "backward" else 0)


def predict(row: dict, case, gpu: dict) -> dict:
    """The model's time and fraction of HBM bandwidth for one launch (see module docstring)."""
    code, launch = row["code"], row["launch"]
    elements = case.rows * case.vocab
    clock = gpu["clock_ghz"] * 1e9
    moved = elements * element_bytes(case, row["phase"])
    hbm = gpu["hbm_tbs"] * 1e12
    t_issue = (machine_code.row_per_element(row, case.vocab) * elements
               / (gpu["sms"] * ISSUE_PER_SM_CYCLE * clock))
    t_mufu = (machine_code.per_element(row, "stream_mufu") * elements
              / (gpu["sms"] * MUFU_PER_SM_CYCLE * clock))
    # Memory with Little's law: a program keeps one tile's loads in flight, so n programs
    # sustain at most n * tile bytes / latency. The grid runs in waves of the resident
    # programs; the last, partial wave may hold too few programs to saturate HBM.
    resident = max(1, code["programs_per_sm"]) * gpu["sms"]
    per_program = (32 * launch["num_warps"] * launch["columns_per_thread"]
                   * element_bytes(case, "forward"))
    latency = DRAM_LATENCY_NS * 1e-9
    programs = launch["programs"]
    tail = programs % resident or min(programs, resident)
    bytes_per_program = moved / programs

    def rate(active):
        return min(hbm, active * per_program / latency)

    t_memory = ((programs - tail) * bytes_per_program / rate(resident)
                + tail * bytes_per_program / rate(tail))
    t_hbm = moved / hbm
    limits = dict(memory=t_memory, issue=t_issue, mufu=t_mufu)
    bound = max(limits, key=limits.get)
    seconds = limits[bound] + LAUNCH_US * 1e-6
    return dict(seconds=seconds, fraction_of_hbm=t_hbm / seconds, bound=bound,
                waves=programs / resident, bytes=moved, hbm_seconds=t_hbm,
                **{f"{k}_seconds": v for k, v in limits.items()})


# ------------------------------------------------------------------------------------------
# Liger-Kernel's kernels, launched as Liger's host code launches them.
# ------------------------------------------------------------------------------------------
def liger_launches(rows: int, vocab: int):
    """``[(name, KernelLaunch, bytes per element)]``, or a reason string when absent."""
    try:
        import torch
        import triton
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel
        from liger_kernel.ops.jsd import _jsd_kernel
        from liger_kernel.ops.kl_div import (
            _kldiv_kernel_backward,
            _kldiv_kernel_forward,
            get_num_warps,
        )
    except Exception as err:   # not installed, or an incompatible version
        return f"liger-kernel is not available ({err.__class__.__name__}: {err})"
    from rkld_kernels.triton_backend import KernelLaunch
    ft, bf16, f32 = machine_code.fake_tensor, torch.bfloat16, torch.float32
    logits = ft((rows, vocab), bf16)
    np2 = triton.next_power_of_2(vocab)
    jsd_block = min(4096, np2)                 # liger's _JSD_TRITON_BLOCK_SIZE
    kl_block = min(65536 // 4, np2)
    ce_block = min(65536 // 2, np2)
    loss_2d = ft((rows, vocab), f32)
    loss_1d = ft((rows,), f32)
    return [
        ("liger _jsd_kernel (beta=1)", KernelLaunch(_jsd_kernel, (rows,), (), dict(
            X_ptr=logits, X_stride=vocab, Y_ptr=ft((rows, vocab), bf16), Y_stride=vocab,
            loss_ptr=loss_2d, loss_stride=vocab, dX_ptr=logits, dX_stride=vocab,
            label_ptr=ft((1,), f32), beta=1.0, n_non_ignore=rows, ignore_index=-100,
            n_cols=vocab, BLOCK_SIZE=jsd_block, HAS_LABEL=False), 4), 2 + 2 + 2 + 4),
        ("liger _kldiv_kernel_forward", KernelLaunch(_kldiv_kernel_forward, (rows,), (), dict(
            y_ptr=logits, y_stride=vocab, gt_ptr=ft((rows, vocab), bf16), gt_stride=vocab,
            loss_ptr=loss_1d, loss_stride=1, n_cols=vocab, eps=1e-10, BLOCK_SIZE=kl_block,
            reduction=3, log_target=True), get_num_warps(kl_block)), 4),
        ("liger _kldiv_kernel_backward", KernelLaunch(_kldiv_kernel_backward, (rows,), (), dict(
            target_ptr=ft((rows, vocab), bf16), target_stride=vocab, new_grads_ptr=logits,
            new_grads_stride=vocab, n_cols=vocab, BLOCK_SIZE=kl_block, log_target=True),
            get_num_warps(kl_block)), 4),
        ("liger cross-entropy", KernelLaunch(liger_cross_entropy_kernel, (rows,), (), dict(
            X_ptr=logits, X_stride=vocab, Y_ptr=ft((rows,), torch.int64), Y_stride=1,
            weight_ptr=None, loss_ptr=loss_1d, z_loss_ptr=None, loss_stride=1,
            token_accuracy_ptr=None, token_accuracy_stride=0, predicted_tokens_ptr=None,
            predicted_tokens_stride=0, n_cols=vocab, n_non_ignore=rows,
            sum_non_ignore_weight=float(rows), weight_sum=0.0, ignore_index=-100,
            lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
            RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False,
            HAS_WEIGHT=False, HAS_SOFTCAPPING=False, HAS_GRADIENTS=True,
            BLOCK_SIZE=ce_block), 32), 2 + 2),
    ]


def liger_rows(targets, cache_dir, rows=8192, vocab=128256):
    launches = liger_launches(rows, vocab)
    if isinstance(launches, str):
        return [], launches
    out = []
    for name, launch, nbytes in launches:
        block = launch.constexprs["BLOCK_SIZE"]
        summary = dict(kernel=name, grid=list(launch.grid), programs=rows,
                       num_warps=launch.num_warps, block=block,
                       columns_per_thread=block // (32 * launch.num_warps), vec=None)
        for arch in targets:
            try:
                code = machine_code.report(launch, arch, cache_dir).as_dict()
            except Exception as err:
                out.append(dict(case=f"liger {rows}x{vocab}", phase="-", launch=summary,
                                arch=arch, error=f"{err.__class__.__name__}: {err}"[:300]))
                continue
            out.append(dict(case=f"liger {rows}x{vocab}", phase="-", launch=summary,
                            arch=arch, code=code, bytes_per_element=nbytes))
    return out, None


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------
def _loads(code) -> str:
    return " ".join(f"{k.replace('LDG.E', 'LDG')}x{v}" for k, v in code["stream_loads"].items())


def _loops(row) -> str:
    if "input_bytes_per_column" not in row or row["launch"]["kernel"] not in (
            "rkl_stats_kernel", "rkl_grad_kernel"):
        return "-"
    return " ".join(f"{loop['per_element']:.1f} {loop['barriers']}/{loop['shuffles']}"
                    for loop in machine_code.loop_per_element(row)) or "none"


def code_table(rows) -> list[str]:
    head = (f"{'case':<40} {'phase':<8} {'kernel':<26} {'sm':>3} {'regs':>4} {'prog/SM':>7} "
            f"{'warps/SM':>8} {'cols/thr':>8} {'instr/el':>8} {'MUFU/el':>7} "
            f"{'BAR':>3} {'SHFL':>4} {'spill':>5}  loads in streaming code; loops of loads: "
            f"instr/el BAR/SHFL")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:<40} {r['phase']:<8} {r['launch']['kernel']:<26} "
                         f"{r['arch']:>3}  could not compile: {r['error']}")
            continue
        code, launch = r["code"], r["launch"]
        per_thread = launch["columns_per_thread"]
        per_el = machine_code.per_element(r) if per_thread else float("nan")
        mufu = machine_code.per_element(r, "stream_mufu") if per_thread else float("nan")
        lines.append(
            f"{r['case']:<40} {r['phase']:<8} {launch['kernel']:<26} {r['arch']:>3} "
            f"{code['registers']:>4} {code['programs_per_sm']:>7} {code['warps_per_sm']:>8} "
            f"{per_thread if per_thread else '-':>8} {per_el:>8.2f} {mufu:>7.2f} "
            f"{code['stream_barriers']:>3} {code['stream_shuffles']:>4} "
            f"{code['spill_instructions']:>5}  {_loads(code)}; {_loops(r)}")
    return lines


def prediction_rows(reports, cases):
    by_case = {c.name: c for c in cases}
    out = []
    for gpu_name, gpu in GPUS.items():
        for r in reports:
            case = by_case.get(r["case"])
            if case is None or "error" in r or r["arch"] != gpu["arch"]:
                continue
            if r["launch"]["kernel"] not in ("rkl_stats_kernel", "rkl_grad_kernel"):
                continue
            out.append(dict(gpu=gpu_name, case=case.name, phase=r["phase"],
                            kernel=r["launch"]["kernel"],
                            bytes_per_element=element_bytes(case, r["phase"]),
                            row_instructions_per_element=machine_code.row_per_element(
                                r, case.vocab),
                            **predict(r, case, gpu)))
    return out


def prediction_table(predictions) -> list[str]:
    head = (f"{'GPU':<5} {'case':<32} {'kernel':<17} {'B/el':>4} {'instr/el (row)':>14} "
            f"{'time ms':>8} {'% of HBM':>8} {'bound':>8} {'waves':>6}")
    lines = [head, "-" * len(head)]
    for p in predictions:
        lines.append(f"{p['gpu']:<5} {p['case']:<32} {p['kernel']:<17} "
                     f"{p['bytes_per_element']:>4} {p['row_instructions_per_element']:>14.2f} "
                     f"{p['seconds'] * 1e3:>8.3f} {100 * p['fraction_of_hbm']:>7.1f}% "
                     f"{p['bound']:>8} {p['waves']:>6.1f}")
    return lines


# ------------------------------------------------------------------------------------------
# Measurement (CUDA only)
# ------------------------------------------------------------------------------------------
def detect_gpu():
    import torch
    props = torch.cuda.get_device_properties(0)
    name = props.name
    for key, gpu in GPUS.items():
        if key in name:
            return key, dict(gpu, sms=props.multi_processor_count)
    arch = props.major * 10 + props.minor
    return name, dict(arch=arch, sms=props.multi_processor_count, clock_ghz=1.9,
                      hbm_tbs=float("nan"))


def copy_bandwidth() -> float:
    import torch
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _best_seconds(lambda: dst.copy_(src))


def _best_seconds(fn, repeats=10) -> float:
    import torch
    for _ in range(2):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)
    return best


def measure(reports, cases) -> list[dict]:
    """Time the forward and backward of each case on this GPU next to the model's prediction
    for it (HBM peak from the data sheet when the GPU is known, else the measured copy)."""
    import torch

    from rkld_kernels.triton_backend import triton_rkl_backward, triton_rkl_forward
    gpu_name, gpu = detect_gpu()
    copy = copy_bandwidth()
    if not math.isfinite(gpu["hbm_tbs"]):
        gpu["hbm_tbs"] = copy / 1e12
    out = []
    for case in cases:
        dtype = getattr(torch, case.dtype)
        gen = torch.Generator("cuda").manual_seed(0)
        s, o = (torch.randn(case.rows, case.vocab, device="cuda", dtype=dtype, generator=gen)
                for _ in range(2))
        g = o + 0.1 * torch.randn_like(o) if case.strengthened else None
        keep = torch.rand(case.rows, device="cuda", generator=gen) < 0.9 if case.keep else None
        hyper = (8.0, case.temperature, case.reverse)
        loss, stats = triton_rkl_forward(s, o, g, keep, *hyper)
        ones = torch.ones(case.rows, device="cuda", dtype=loss.dtype)
        args = (s, o, g, keep)
        timed = {"forward": _best_seconds(lambda: triton_rkl_forward(*args, *hyper)),
                 "backward": _best_seconds(lambda: triton_rkl_backward(*args, stats, ones,
                                                                       *hyper))}
        for phase, seconds in timed.items():
            rows = [r for r in reports if r["case"] == case.name and r["phase"] == phase
                    and r["arch"] == gpu["arch"] and "error" not in r]
            predicted = sum(predict(r, case, gpu)["seconds"] for r in rows) if rows else None
            moved = case.rows * case.vocab * element_bytes(case, phase)
            out.append(dict(gpu=gpu_name, case=case.name, phase=phase, seconds=seconds,
                            predicted_seconds=predicted, copy_bandwidth=copy,
                            fraction_of_copy=moved / seconds / copy))
    return out


def measure_table(measured) -> list[str]:
    head = (f"{'GPU':<6} {'case':<32} {'phase':<8} {'measured ms':>11} {'predicted ms':>12} "
            f"{'measured/predicted':>18} {'% of copy':>9}")
    lines = [head, "-" * len(head)]
    for m in measured:
        predicted = m["predicted_seconds"]
        ratio = f"{m['seconds'] / predicted:>18.2f}" if predicted else f"{'-':>18}"
        lines.append(f"{m['gpu']:<6} {m['case']:<32} {m['phase']:<8} {m['seconds'] * 1e3:>11.3f} "
                     f"{(predicted or float('nan')) * 1e3:>12.3f} {ratio} "
                     f"{100 * m['fraction_of_copy']:>8.1f}%")
    if measured:
        lines.append(f"device copy bandwidth: {measured[0]['copy_bandwidth'] / 1e9:.0f} GB/s")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file")
    parser.add_argument("--targets", default=",".join(map(str, machine_code.TARGETS)),
                        help="compute capabilities to compile for (default: 80,90,100; "
                             "'device': the CUDA device's)")
    parser.add_argument("--cache", default=str(machine_code.default_cache_folder() / "reports"),
                        help="folder of cached results (shared with the compile tests)")
    parser.add_argument("--bench-only", action="store_true",
                        help="only the benchmark shapes (and Liger), not every case")
    parser.add_argument("--measure", action="store_true",
                        help="CUDA: time each pass and print it beside the prediction")
    args = parser.parse_args(argv)
    if args.targets == "device":
        import torch
        major, minor = torch.cuda.get_device_capability(0)
        targets = (10 * major + minor,)
    else:
        targets = tuple(int(t) for t in args.targets.split(","))
    cases = list(bench_cases()) + ([] if args.bench_only else list(machine_code.CASES))
    reports = machine_code.all_reports(cases, targets, cache_dir=args.cache)
    liger, liger_missing = liger_rows(targets, args.cache)
    predictions = prediction_rows(reports, cases)
    measured = measure(reports, bench_cases()) if args.measure else []
    document = json.dumps(dict(kernels=reports, liger=liger, liger_missing=liger_missing,
                               predictions=predictions, measured=measured,
                               model=dict(gpus=GPUS, dram_latency_ns=DRAM_LATENCY_NS,
                                          launch_us=LAUNCH_US)))
    if args.json_out:
        Path(args.json_out).write_text(document)
    if args.json:
        print(document)
        return 0
    print("Compiled kernels (SASS; per element = per thread and full tile / columns per thread)")
    print("\n".join(code_table(reports)))
    print()
    if liger:
        print("Liger-Kernel, compiled the same way (8192 x 128256, bf16)")
        print("\n".join(code_table(liger)))
    else:
        print(f"Liger-Kernel: {liger_missing}; its rows are left out")
    print()
    print("Roofline model (upper bound; see the module docstring)")
    print("\n".join(prediction_table(predictions)))
    if measured:
        print()
        print("\n".join(measure_table(measured)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
