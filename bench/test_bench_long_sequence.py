"""``pytest bench/`` entry for long_sequence.py: one unlearning step at 4k / 16k / 64k tokens,
naive against rkld, peak memory beside the planner's estimate, tokens/s.

``RKLD_BENCH_LENGTHS`` (comma-separated token counts, default 4096,16384,65536) and
``RKLD_BENCH_BUDGET_GIB`` (default 6: cases the planner predicts above it are not run) change
what runs (the default set takes tens of minutes on a 2-core CPU, most of it at 64k). Rows go
to the session's benchmark table; the planner must be within 20 % of every measured peak.
"""
import os

import pytest
from long_sequence import GIB, LENGTHS, format_report, run

MIB = 1024 * 1024


def _lengths():
    text = os.environ.get("RKLD_BENCH_LENGTHS")
    return tuple(int(x) for x in text.split(",")) if text else LENGTHS


@pytest.fixture(scope="module")
def results():
    # From 64k tokens on, the measured step is also the timed one (a second would double the
    # case's time); the printed table says which step was timed.
    return run(_lengths(), int(float(os.environ.get("RKLD_BENCH_BUDGET_GIB", "6")) * GIB),
               threads=min(2, os.cpu_count() or 1), log=lambda line: None,
               time_first_from=65536)


def test_long_sequence_unlearning_step(results, bench_table):
    print("\n" + format_report(results))
    for row in results["rows"]:
        group = f"long sequence: one unlearning step, {row['seq_len']} tokens, tiny Llama V=32000"
        if not row["fits"]:
            bench_table.note(group, f"{row['path']}: does not fit the "
                                    f"{results['budget_bytes'] / GIB:.0f} GiB budget (planner: "
                                    f"{row['predicted_bytes'] / MIB:.0f} MiB); not run")
            continue
        extra = {}
        if row["predicted_bytes"] is not None:
            extra["planner MiB"] = row["predicted_bytes"] / MIB
        if row["tokens_per_s"] is not None:
            extra["tokens/s"] = row["tokens_per_s"]
        bench_table.record(group, row["path"], row["seconds"], row["peak_bytes"],
                           baseline=row["path"] == "naive", **extra)
    for key, value in results["targets"].items():
        bench_table.note("long sequence: targets", f"{key}: {value}")
    for row in results["rows"]:
        if row["fits"] and row["predicted_bytes"] is not None:
            assert abs(row["predicted_bytes"] - row["peak_bytes"]) <= 0.2 * row["peak_bytes"], (
                f"{row['path']} at {row['seq_len']} tokens: planner "
                f"{row['predicted_bytes'] / MIB:.0f} MiB, measured {row['peak_bytes'] / MIB:.0f} MiB")
