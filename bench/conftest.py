"""Shared benchmark setup: a results table printed at the end of the run.

Benchmarks time with pytest-benchmark (so ``--benchmark-json`` works as usual) and add a row
for each case to the session's table through the ``bench_table`` fixture::

    def test_something(benchmark, bench_table):
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
        bench_table.record("my op 4096x32000 fp32", "ours", bench_table.seconds_of(benchmark),
                           peak_bytes=..., benchmark=benchmark, **{"GB/s": 812.0})

``record(group, name, seconds, peak_bytes=None, *, baseline=False, benchmark=None, **extra)``
- rows with the same ``group`` form one table; each table compares its rows with the row
  recorded with ``baseline=True`` (speed-up = baseline time / time; memory = peak / baseline peak);
- ``peak_bytes`` is the peak extra memory of one step (see ``_memory.py``);
- ``extra`` become more columns, named by their keys;
- with ``benchmark`` given, ``peak_bytes`` and ``extra`` are also stored in the benchmark's
  ``extra_info`` and so land in ``--benchmark-json``.

``note(group, text)`` adds a line under a table (a skipped case, a measured reference such as
the device copy bandwidth, whether a target was met).
"""
from __future__ import annotations

import os

import pytest
import torch

MIB = 1024 * 1024


class BenchTable:
    """Rows and notes collected during the run; see the module docstring for the API."""

    def __init__(self):
        self.groups: dict[str, list[dict]] = {}
        self.notes: dict[str, list[str]] = {}

    def record(self, group: str, name: str, seconds: float | None, peak_bytes: int | None = None,
               *, baseline: bool = False, benchmark=None, **extra) -> None:
        self.groups.setdefault(group, []).append(
            {"name": name, "seconds": seconds, "peak_bytes": peak_bytes, "baseline": baseline,
             "extra": extra})
        if benchmark is not None:
            if peak_bytes is not None:
                benchmark.extra_info["peak_extra_bytes"] = peak_bytes
            benchmark.extra_info.update(extra)

    def note(self, group: str, text: str) -> None:
        notes = self.notes.setdefault(group, [])
        if text not in notes:            # several cases may report the same fact
            notes.append(text)

    def rows(self, group: str) -> list[dict]:
        return self.groups.get(group, [])

    def row(self, group: str, name: str) -> dict | None:
        return next((r for r in self.rows(group) if r["name"] == name), None)

    @staticmethod
    def seconds_of(benchmark) -> float | None:
        """Best round time of a finished pytest-benchmark run (None under --benchmark-disable).

        The best round, not the mean: on a shared machine the other rounds measure the
        neighbours too, and every row of a table is judged by the same statistic.
        """
        return benchmark.stats.stats.min if benchmark.stats is not None else None

    def render(self) -> list[str]:
        lines = []
        for group in sorted(set(self.groups) | set(self.notes)):
            lines.append("")
            lines.append(group)
            rows = self.rows(group)
            if rows:
                lines.extend(_format_table(rows))
            lines.extend(f"  note: {text}" for text in self.notes.get(group, []))
        return lines


def _format_table(rows: list[dict]) -> list[str]:
    base = next((r for r in rows if r["baseline"]), None)
    extra_keys = list(dict.fromkeys(k for r in rows for k in r["extra"]))
    header = ["case", "time ms", "speed-up", "peak extra MiB", "memory vs base", *extra_keys]
    body = []
    for r in rows:
        speedup = _ratio(base and base["seconds"], r["seconds"])
        memory = _ratio(r["peak_bytes"], base and base["peak_bytes"])
        body.append([r["name"] + (" (base)" if r is base else ""),
                     _fmt(r["seconds"] * 1e3 if r["seconds"] is not None else None),
                     f"{speedup:.2f}x" if speedup is not None else "-",
                     _fmt(r["peak_bytes"] / MIB if r["peak_bytes"] is not None else None),
                     f"{memory:.2f}x" if memory is not None else "-",
                     *(_fmt(r["extra"].get(k)) for k in extra_keys)])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *body)]
    out = ["  " + "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                            for i, (h, w) in enumerate(zip(header, widths)))]
    out.append("  " + "  ".join("-" * w for w in widths))
    for cells in body:
        out.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                    for i, (c, w) in enumerate(zip(cells, widths))))
    return out


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


_TABLE = BenchTable()


@pytest.fixture(scope="session")
def bench_table() -> BenchTable:
    return _TABLE


@pytest.fixture(scope="session")
def cuda_copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + write of a 2 GiB tensor), measured once per run."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    src = torch.empty(2 * 1024 ** 3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(10):
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2 * 1024 ** 3 / best


def pytest_terminal_summary(terminalreporter):
    lines = _TABLE.render()
    if lines:
        terminalreporter.write_sep("=", "benchmark summary (best round; peak memory above inputs)")
        # CPU timings depend on both: other processes on the cores stall torch's threads.
        load = f", 1-minute load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
        terminalreporter.write_line(f"torch threads {torch.get_num_threads()} on "
                                    f"{os.cpu_count()} CPUs{load}")
        for line in lines:
            terminalreporter.write_line(line)
