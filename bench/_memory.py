"""Peak extra memory of one benchmark step: the bytes it needs above what its inputs already hold.

Two measurements with one meaning, shared by every benchmark in this folder:

- CUDA, :func:`cuda_peak_extra_bytes`: the caching allocator's peak during one call of the step
  minus what was allocated just before it.
- CPU, :func:`cpu_peak_extra_bytes`: torch keeps no allocator statistics on CPU and tracemalloc
  does not see tensor storage, so the step runs in a fresh Python subprocess, which

  1. builds its inputs (through a factory named ``"file.py:function"``),
  2. runs the step once, so that one-off costs (thread pools, torch.compile) are paid and freed,
  3. reads its resident set size (RSS) and resets the kernel's RSS high-water mark
     (Linux ``/proc/self/clear_refs``),
  4. runs the step again and reports the high-water RSS minus the RSS of step 3.

  Allocator caching that survives step 2 (small blocks kept by the C library) makes this a
  slight underestimate, by far less than a megabyte-sized tensor; tensors of benchmark size are
  mapped and unmapped directly.

A step is a zero-argument callable that runs one forward+backward and drops what it produced
(e.g. sets ``x.grad = None``) before returning, so that repeated calls start from the same state.
The subprocess protocol (``python _memory.py FILE.py:FUNCTION JSON_KWARGS``): ``FUNCTION(**kwargs)``
builds the inputs and returns the step; the last line printed is ``{"extra_bytes": N}``.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def cuda_peak_extra_bytes(step) -> int:
    """Peak CUDA memory allocated during one call of ``step`` above what was allocated before."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def rss_high_water_resettable() -> bool:
    """True where the subprocess measurement works (Linux with a writable clear_refs)."""
    return _STATUS.exists() and _CLEAR_REFS.exists()


def cpu_peak_extra_bytes(factory: str, timeout_s: float = 600.0, **kwargs) -> int:
    """Peak RSS above the inputs of one step, measured in a fresh subprocess (see module doc).

    ``factory`` is ``"path/to/file.py:function"``; ``kwargs`` must be JSON-serialisable and are
    passed to that function, which builds the inputs and returns the step.
    """
    if not rss_high_water_resettable():
        raise RuntimeError("cpu_peak_extra_bytes needs Linux's /proc/self/status and "
                           "/proc/self/clear_refs to reset the RSS high-water mark; "
                           f"not available on {sys.platform}")
    command = [sys.executable, str(Path(__file__).resolve()), factory, json.dumps(kwargs)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {factory}({kwargs}) failed with exit code "
                           f"{done.returncode}:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"memory measurement of {factory}({kwargs}) printed nothing; "
                           f"stderr:\n{done.stderr[-3000:]}")
    return int(json.loads(lines[-1])["extra_bytes"])


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])           # the kernel reports "<n> kB"
    raise RuntimeError(f"{field} not found in {_STATUS}")


def _load_factory(factory: str):
    path, sep, name = factory.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise ValueError(f"factory must look like 'path/to/file.py:function'; got {factory!r}")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _measure_in_this_process(factory: str, kwargs: dict) -> int:
    step = _load_factory(factory)(**kwargs)
    step()                                        # pay one-off costs; they are freed again
    rss_before = _status_kib("VmRSS")
    _CLEAR_REFS.write_text("5")                   # "5" resets the peak RSS (VmHWM) to the current RSS
    step()
    return (_status_kib("VmHWM") - rss_before) * 1024


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python _memory.py FILE.py:FUNCTION JSON_KWARGS")
    extra = _measure_in_this_process(sys.argv[1], json.loads(sys.argv[2]))
    print(json.dumps({"extra_bytes": extra}))
