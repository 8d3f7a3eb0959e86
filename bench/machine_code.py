"""The kernels' machine code for NVIDIA targets, compiled on any machine (no GPU needed).

A development tool, not part of the installed package: ``tests/test_kernels_compile.py`` and
``bench/kernel_report.py`` run it (``python bench/machine_code.py`` prints its JSON).

Triton's compiler runs on the CPU and its wheel ships ``ptxas``, ``cuobjdump`` and
``nvdisasm``. ``compile_launch`` compiles one ``triton_backend.KernelLaunch`` for a target
(``sm_80``, ``sm_90``, ``sm_100``...) with the argument specialisation the JIT would give real
tensors (it runs the JIT's own binder: 16-byte-aligned pointers and integers that are
multiples of 16 get divisibility attributes, integers equal to 1 become constants).
``analyse`` reads the SASS of the result: registers, spills and local memory, occupancy, and,
for the streaming part (the loop whose body holds the global loads, or for a kernel without
such a loop the path through its full-tile loads), instructions, MUFU, barriers, shuffles and
load widths per thread, and the same facts for every loop of global loads (``loops``: the
full-tile loop, the masked partial-tile loops, the one-hot rows' loop of the gradient kernel).

``fake_tensor`` stands in for a CUDA tensor (shape, strides, dtype, a 16-byte-aligned address)
so that ``triton_backend.plan_forward`` / ``plan_backward`` produce exactly the launches the
backend makes, without memory. Everything here needs the kernels built for compilation, i.e.
``TRITON_INTERPRET`` unset when ``rkld_kernels.triton_kernels`` was first imported.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import triton

# Per-SM limits of the targets (CUDA programming guide, compute capability tables).
SM_LIMITS = {
    80: dict(registers=65536, threads=2048, blocks=32, shared=163 * 1024),
    90: dict(registers=65536, threads=2048, blocks=32, shared=227 * 1024),
    100: dict(registers=65536, threads=2048, blocks=32, shared=227 * 1024),
}


class FakeTensor:
    """What the launch planner and Triton's binder read from a tensor, without memory."""

    def __init__(self, shape, dtype, strides=None, address: int = 1 << 24):
        import torch
        self.shape = torch.Size(shape)
        self.dtype = dtype
        if strides is None:
            strides, step = [], 1
            for size in reversed(self.shape):
                strides.insert(0, step)
                step *= max(1, size)
        self._strides = tuple(strides)
        self._address = address

    def dim(self):
        return len(self.shape)

    def stride(self, dim=None):
        return self._strides if dim is None else self._strides[dim]

    def element_size(self):
        return self.dtype.itemsize

    def data_ptr(self):
        return self._address

    def contiguous(self):
        return self

    def expand(self, *shape):
        return FakeTensor(shape, self.dtype, strides=(0,) * len(shape), address=self._address)


def fake_tensor(shape, dtype, strides=None) -> FakeTensor:
    return FakeTensor(shape, dtype, strides)


def fake_empty(shape, dtype) -> FakeTensor:
    """An ``empty(shape, dtype)`` for the planners."""
    return FakeTensor(shape, dtype)


def _bin_dir() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _tool(name: str, arch: int) -> str:
    if name == "ptxas" and arch >= 100 and (_bin_dir() / "ptxas-blackwell").exists():
        name = "ptxas-blackwell"
    return str(_bin_dir() / name)


def compile_launch(launch, arch: int):
    """Compile ``launch`` (a ``KernelLaunch``) for ``sm_<arch>``; returns Triton's
    CompiledKernel (``.asm`` holds ``ptx`` and ``cubin``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("the kernels were built for Triton's interpreter: compile them in a "
                           "process where TRITON_INTERPRET is unset before triton is imported")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    options = dict(num_warps=launch.num_warps)
    bound, specialization, jit_options = binder(*launch.args, **launch.constexprs, **options)
    _, signature, constexprs, attrs = kernel._pack_args(backend, dict(launch.constexprs,
                                                                      **options),
                                                        bound, specialization, jit_options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options)


@dataclass
class Instruction:
    address: int
    predicate: str
    opcode: str       # with modifiers, e.g. LDG.E.128
    operands: str
    label: str | None = None     # branch target


@dataclass
class CodeReport:
    """Static facts of one compiled kernel (see ``analyse``). ``stream_*`` count one thread's
    instructions in one iteration of the full-tile loop (``streaming == "loop"``) or along
    the path of one full tile (``"path"``, kernels without a loop); ``partial_*`` the same for
    a masked (first or last) tile."""
    kernel: str
    arch: int
    num_warps: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    spill_instructions: int
    programs_per_sm: int
    warps_per_sm: int
    total_instructions: int
    streaming: str                       # "loop" or "path" (see analyse)
    stream_instructions: int             # per thread, one loop iteration / one full tile
    stream_mufu: int
    stream_barriers: int
    stream_shuffles: int
    stream_loads: dict = field(default_factory=dict)    # opcode -> count
    stream_stores: dict = field(default_factory=dict)
    outside_instructions: int = 0        # instructions of the kernel not in the loop body
    partial_instructions: int = 0        # the masked-tile loop body / masked-tile path
    partial_loop: bool = False           # whether partial_* is a loop body (one repeat)
    partial_loads: dict = field(default_factory=dict)
    # Every loop whose body holds global loads, innermost first: instructions, barriers,
    # shuffles, global-load bytes per thread and iteration, and its loads.
    loops: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_PREDICATE_OPERAND = re.compile(r"\s*!?U?P[0-6]\s*,")


def parse_sass(text: str) -> tuple[list[Instruction], dict[str, int]]:
    """Instructions of ``nvdisasm -c`` output and the address of each label."""
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _LINE.search(line)
        if not match:
            continue
        address = int(match.group(1), 16)
        for name in pending:
            labels[name] = address
        pending = []
        target = _TARGET.search(match.group(4))
        instructions.append(Instruction(address, (match.group(2) or "").strip(), match.group(3),
                                        match.group(4).strip(),
                                        target.group(1) if target else None))
    return instructions, labels


def _is_global_load(ins: Instruction) -> bool:
    return ins.opcode.startswith("LDG")


def _blocks(instructions, labels):
    """Basic blocks as index ranges and their successor blocks."""
    starts = {0}
    address_index = {ins.address: i for i, ins in enumerate(instructions)}
    for i, ins in enumerate(instructions):
        if ins.label is not None or ins.opcode.startswith(("EXIT", "RET", "BRA")):
            starts.add(i + 1)
        if ins.label is not None and ins.label in labels:
            starts.add(address_index[labels[ins.label]])
    starts = sorted(s for s in starts if s < len(instructions))
    bounds = list(zip(starts, starts[1:] + [len(instructions)]))
    block_of = {s: b for b, (s, _) in enumerate(bounds)}
    successors = []
    for b, (s, e) in enumerate(bounds):
        last = instructions[e - 1]
        succ = []
        if last.label is not None and last.label in labels:
            succ.append(block_of[address_index[labels[last.label]]])
        # A branch is conditional through its @predicate or a predicate operand (BRA.U UP0).
        conditional = bool(last.predicate) or bool(_PREDICATE_OPERAND.match(last.operands))
        unconditional = last.opcode.startswith(("BRA", "EXIT", "RET")) and not conditional
        if not unconditional and b + 1 < len(bounds):
            succ.append(b + 1)
        successors.append(succ)
    return bounds, successors


def _shortest_path_through(instructions, labels, wanted, most: bool = False):
    """Instruction indices on the cheapest path entry -> a block with ``wanted`` -> exit
    (with ``most``, a block with the most ``wanted`` instructions)."""
    import heapq
    bounds, successors = _blocks(instructions, labels)
    weight = [e - s for s, e in bounds]

    def dijkstra(sources):
        dist = {b: weight[b] for b in sources}
        prev = {}
        heap = [(d, b) for b, d in dist.items()]
        heapq.heapify(heap)
        while heap:
            d, b = heapq.heappop(heap)
            if d > dist[b]:
                continue
            for n in successors[b]:
                nd = d + weight[n]
                if nd < dist.get(n, float("inf")):
                    dist[n], prev[n] = nd, b
                    heapq.heappush(heap, (nd, n))
        return dist, prev

    counts = {b: sum(map(wanted, instructions[s:e])) for b, (s, e) in enumerate(bounds)}
    targets = [b for b, n in counts.items() if n]
    if not targets:
        return []
    if most:
        targets = [b for b in targets if counts[b] == max(counts.values())]
    dist, prev = dijkstra([0])
    target = min((b for b in targets if b in dist), key=lambda b: dist[b])
    path = [target]
    while path[-1] in prev:
        path.append(prev[path[-1]])
    exits = [b for b, (s, e) in enumerate(bounds)
             if instructions[e - 1].opcode.startswith("EXIT") and not instructions[e - 1].predicate]
    dist2, prev2 = dijkstra([target])
    end = min((b for b in exits if b in dist2), key=lambda b: dist2[b], default=target)
    tail = [end]
    while tail[-1] != target:
        tail.append(prev2[tail[-1]])
    blocks = set(path) | set(tail)
    return [i for b in sorted(blocks) for i in range(*bounds[b])]


def _load_width(ins: Instruction) -> int:
    found = re.search(r"\.(64|128)\b", ins.opcode)
    if found:
        return int(found.group(1))
    return 32


def _load_bytes(ins: Instruction) -> int:
    """Bytes one thread's global load reads (8- and 16-bit loads included)."""
    small = re.search(r"\.[US](8|16)\b", ins.opcode)
    return int(small.group(1)) // 8 if small else _load_width(ins) // 8


def _load_loops(instructions, labels):
    """Index lists of the loops (backward branches) whose body holds a global load, smallest
    first."""
    index_of = {ins.address: i for i, ins in enumerate(instructions)}
    loops = []
    for i, ins in enumerate(instructions):
        if ins.label is None or ins.label not in labels:
            continue
        start = index_of[labels[ins.label]]
        if start <= i and any(_is_global_load(x) for x in instructions[start:i + 1]):
            loops.append(list(range(start, i + 1)))
    return sorted(loops, key=len)


def _loop_facts(instructions, loop) -> dict:
    body = [instructions[i] for i in loop]
    return dict(instructions=len(body), barriers=_count(body, ("BAR", "SYNCS")),
                shuffles=_count(body, "SHFL"),
                load_bytes=sum(_load_bytes(x) for x in body if _is_global_load(x)),
                loads=_histogram(body, "LDG"))


def _streaming_region(instructions, labels):
    """Where a kernel streams its tiles, as ``(kind, full, partial)`` instruction indices.

    ``full`` is one full tile: the body of the (smallest) backward-branch loop that holds the
    kernel's widest global loads (``kind = "loop"``), or, when no loop does, the cheapest
    entry-to-exit path through its widest unpredicated loads (``"path"``). ``partial`` is one
    iteration of the masked (partial-tile) code: the body of another loop of global loads,
    else the cheapest path through predicated loads, else []."""
    loads = [ins for ins in instructions if _is_global_load(ins)]
    widest = max((_load_width(ins) for ins in loads), default=32)
    widest_free = max((_load_width(ins) for ins in loads if not ins.predicate), default=32)

    def wide_load(ins):
        return _is_global_load(ins) and _load_width(ins) == widest

    def full_tile_load(ins):
        return _is_global_load(ins) and not ins.predicate and _load_width(ins) == widest_free

    def masked_load(ins):
        return _is_global_load(ins) and bool(ins.predicate)

    loops = _load_loops(instructions, labels)

    def holding(test):
        return [loop for loop in loops if any(test(instructions[j]) for j in loop)]

    def smallest_other(full):
        rest = [loop for loop in loops if loop is not full]
        return min(rest, key=len) if rest else []

    def free_wide(x):
        return full_tile_load(x) and _load_width(x) == widest

    in_loops = {j for loop in loops for j in loop}
    outside = sum(free_wide(ins) for j, ins in enumerate(instructions) if j not in in_loops)
    free_loops = holding(free_wide)
    most_in_a_loop = max((sum(free_wide(instructions[j]) for j in loop) for loop in free_loops),
                         default=0)
    # 1. A loop of unpredicated widest loads holding more of them than the code outside
    #    loops: the full-tile loop (the stats kernel).
    if free_loops and most_in_a_loop >= outside:
        full = min(free_loops, key=len)
        return "loop", full, smallest_other(full)
    # 2. Unpredicated widest loads outside loops: one tile per program (the gradient kernel,
    #    whose loops go one repeat at a time through partial tiles and one-hot rows); its
    #    partial tile is the smallest loop of predicated loads.
    if outside:
        masked_loops = holding(masked_load)
        partial = (min(masked_loops or loops, key=len) if loops
                   else _shortest_path_through(instructions, labels, masked_load))
        outside_ids = {id(ins) for j, ins in enumerate(instructions) if j not in in_loops}
        # The block with the most of them: the compiler may peel a one-repeat loop's first
        # iteration (the one-hot rows'), whose few loads lie outside loops too.
        path = _shortest_path_through(instructions, labels,
                                      lambda x: free_wide(x) and id(x) in outside_ids, most=True)
        return "path", path, partial
    # 3. Masked loads everywhere (Liger's kernels): the smallest loop of the widest loads.
    wide_loops = holding(wide_load)
    if wide_loops:
        full = min(wide_loops, key=len)
        return "loop", full, smallest_other(full)
    full = _shortest_path_through(instructions, labels, full_tile_load)
    if not full:
        full = _shortest_path_through(instructions, labels, _is_global_load)
    return "path", full, _shortest_path_through(instructions, labels, masked_load)


def _disassemble(cubin: bytes, arch: int) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([_tool("nvdisasm", arch), "-c", path], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump", arch), "-res-usage", path],
                               capture_output=True, text=True, check=True).stdout
    return sass, usage


def _count(instructions, prefix) -> int:
    return sum(ins.opcode.startswith(prefix) for ins in instructions)


def _histogram(instructions, prefix) -> dict:
    out = {}
    for ins in instructions:
        if ins.opcode.startswith(prefix):
            out[ins.opcode] = out.get(ins.opcode, 0) + 1
    return dict(sorted(out.items()))


def analyse(compiled, arch: int) -> CodeReport:
    """Read the cubin of ``compiled`` (from ``compile_launch``) into a ``CodeReport``."""
    sass, usage = _disassemble(compiled.asm["cubin"], arch)
    name = compiled.metadata.name
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    if not found:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line for {name}:\n{usage}")
    registers, stack, shared, local = map(int, found.groups())
    shared = max(shared, compiled.metadata.shared)
    instructions, labels = parse_sass(sass)
    kind, region, partial = _streaming_region(instructions, labels)
    body = [instructions[i] for i in region]
    num_warps = compiled.metadata.num_warps
    threads = 32 * num_warps
    limits = SM_LIMITS.get(arch, SM_LIMITS[90])
    # Registers are allocated per warp in units of 256 (8 per thread).
    regs_per_warp = ((max(registers, 1) * 32 + 255) // 256) * 256
    by_registers = limits["registers"] // (regs_per_warp * num_warps)
    by_shared = limits["shared"] // shared if shared else limits["blocks"]
    programs = max(0, min(by_registers, limits["threads"] // threads, limits["blocks"],
                          by_shared))
    return CodeReport(
        kernel=name, arch=arch, num_warps=num_warps, registers=registers, stack_bytes=stack,
        local_bytes=local, shared_bytes=shared,
        spill_instructions=_count(instructions, ("STL", "LDL")),
        programs_per_sm=programs, warps_per_sm=programs * num_warps,
        total_instructions=len(instructions), streaming=kind,
        stream_instructions=len(body), stream_mufu=_count(body, "MUFU"),
        stream_barriers=_count(body, ("BAR", "SYNCS")), stream_shuffles=_count(body, "SHFL"),
        stream_loads=_histogram(body, "LDG"), stream_stores=_histogram(body, "STG"),
        outside_instructions=len(instructions) - len(body),
        partial_instructions=len(partial),
        partial_loop=bool(partial) and instructions[partial[-1]].label is not None
        and instructions[partial[-1]].opcode.startswith("BRA")
        and labels.get(instructions[partial[-1]].label, 1 << 62) <= instructions[partial[-1]].address,
        partial_loads=_histogram([instructions[i] for i in partial], "LDG"),
        loops=[_loop_facts(instructions, loop) for loop in _load_loops(instructions, labels)])


def _cache_key(launch, arch: int) -> str:
    """What decides the compiled code: the kernel's source (with its callees), the arguments'
    specialisation, the options, the target and Triton's version."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    _, specialization, _ = binder(*launch.args, **launch.constexprs,
                                  num_warps=launch.num_warps)
    analysis = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()   # this reader's code
    text = repr((kernel.cache_key, [tuple(map(str, s)) for s in specialization],
                 launch.num_warps, arch, triton.__version__, analysis))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def default_cache_folder() -> Path:
    """Where compiled-code reports persist across runs and checkouts: ``RKLD_KERNEL_CODE_CACHE``
    when set, else ``rkld/kernel-code`` in the user's cache folder (``$XDG_CACHE_HOME`` or
    ``~/.cache``). Holds ``reports/`` (this module's JSON) and ``triton/`` (Triton's cache)."""
    configured = os.environ.get("RKLD_KERNEL_CODE_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rkld" / "kernel-code"


def report(launch, arch: int, cache_dir: str | os.PathLike | None = None) -> CodeReport:
    """``analyse(compile_launch(launch, arch), arch)``, kept as JSON in ``cache_dir`` (when
    given) under a key of everything that decides the code, so a second run compiles
    nothing. Triton's own kernel cache (``TRITON_CACHE_DIR``) caches the compilation too."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{_cache_key(launch, arch)}.json"
        if path.exists():
            return CodeReport(**json.loads(path.read_text()))
    result = analyse(compile_launch(launch, arch), arch)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result.as_dict()))
        tmp.replace(path)
    return result


# ------------------------------------------------------------------------------------------
# The launches users hit, compiled by tests/test_kernels_compile.py and bench/kernel_report.py.
# ------------------------------------------------------------------------------------------
TARGETS = (80, 90, 100)
H100_SMS = 132


@dataclass(frozen=True)
class Case:
    """One call of the triton backend: logits of ``rows x vocab`` in ``dtype`` (a torch dtype
    name), forward then backward, as ``fused_rkl_loss`` (or, with ``fused_linear``, the
    fused-linear loss's chunk pass: no keep mask, an expanded upstream gradient) makes it.
    ``compute`` names the kernels' dtype when it is not the backend's default for ``dtype``
    (float64 arithmetic for float32 inputs); ``precise`` the PRECISE choice when it is not the
    default (False: the float32 chunk logits of bfloat16 heads)."""
    name: str
    rows: int
    vocab: int
    dtype: str = "bfloat16"
    strengthened: bool = True
    reverse: bool = True
    temperature: float = 1.0
    keep: bool = True
    fused_linear: bool = False
    compute: str | None = None
    precise: bool | None = None


CASES = (
    Case("bf16 RKLD 8192x128256", 8192, 128256),
    Case("bf16 RKLD 8192x50304", 8192, 50304, keep=False),
    Case("bf16 RKLD 8192x50257 (unaligned rows)", 8192, 50257, keep=False),
    Case("fp16 forward KL 4096x32000 T=2", 4096, 32000, "float16", reverse=False,
         temperature=2.0),
    Case("fp32 distillation 4096x32000 T=2", 4096, 32000, "float32", strengthened=False,
         temperature=2.0),
    Case("bf16 RKLD V-split 16x32000", 16, 32000),
    Case("fused-linear fp32 chunk 418x128256", 418, 128256, "float32", fused_linear=True,
         precise=False),
    Case("fp32 RKLD 4096x32000 float32 compute", 4096, 32000, "float32", compute="float32"),
    Case("fp32 RKLD 4096x32000 float64 compute", 4096, 32000, "float32", compute="float64"),
    Case("fp64 RKLD 4096x32000", 4096, 32000, "float64"),
)


def case_launches(case: Case, sm_count: int = H100_SMS):
    """``[(phase, KernelLaunch)]`` of one forward and backward of ``case`` on a GPU with
    ``sm_count`` SMs (the V-split depends on it), planned by the backend itself."""
    import torch

    from rkld_kernels import triton_backend as backend
    dtype = getattr(torch, case.dtype)
    shape = (case.rows, case.vocab)
    student, original = fake_tensor(shape, dtype), fake_tensor(shape, dtype)
    strengthened = fake_tensor(shape, dtype) if case.strengthened else None
    keep = fake_tensor((case.rows,), torch.bool) if case.keep else None
    hyper = (8.0 if case.strengthened else 0.0, case.temperature, case.reverse)
    # The fused-linear loss's chunk logits are in the compute dtype of its heads (float32 for
    # float16/bfloat16 heads), and it says so.
    compute = dtype if case.fused_linear else None
    if case.compute is not None:
        compute = getattr(torch, case.compute)
    loss, stats, forward = backend.plan_forward(student, original, strengthened, keep, *hyper,
                                                sm_count=sm_count, empty=fake_empty,
                                                compute=compute, precise=case.precise)
    if case.fused_linear:
        grad_rows = fake_tensor((), loss.dtype).expand(case.rows)
    else:
        grad_rows = fake_tensor((case.rows,), loss.dtype)
    _, backward = backend.plan_backward(student, original, strengthened, keep, stats,
                                        grad_rows, *hyper, sm_count=sm_count,
                                        empty=fake_empty, compute=compute,
                                        precise=case.precise)
    return [("forward", launch) for launch in forward] + [("backward", launch)
                                                          for launch in backward]


def launch_summary(launch) -> dict:
    """The launch's shape in plain numbers (grid, warps, columns per tile and per thread)."""
    c = launch.constexprs
    block = c.get("TILE_R", 1) * c.get("THREADS", 1) * c.get("TILE_K", 1)
    threads = 32 * launch.num_warps
    return dict(kernel=launch.kernel.__name__, grid=list(launch.grid), tile_r=c.get("TILE_R"),
                programs=int(__import__("math").prod(launch.grid)), num_warps=launch.num_warps,
                block=block if "TILE_R" in c else None,
                columns_per_thread=block // threads if "TILE_R" in c else None,
                vec=c.get("VEC"))


def input_bytes_per_column(case: Case) -> int:
    """Bytes of logits one column of ``case`` loads (two or three inputs)."""
    import torch
    return (3 if case.strengthened else 2) * getattr(torch, case.dtype).itemsize


def loop_per_element(row: dict) -> list[dict]:
    """Each loop of global loads of a streaming kernel with its instructions per element
    (per thread and iteration / the columns its loads bring in), barriers and shuffles."""
    out = []
    for loop in row["code"].get("loops", []):
        columns = loop["load_bytes"] / row["input_bytes_per_column"]
        out.append(dict(loop, per_element=loop["instructions"] / columns if columns >= 1
                        else float("nan")))
    return out


def per_element(row: dict, key: str = "stream_instructions") -> float:
    """A ``code`` count of one full tile (``stream_*``) per column: lane-instructions per
    element, i.e. per-thread count x threads / columns of the tile."""
    return row["code"][key] / row["launch"]["columns_per_thread"]


def row_per_element(row: dict, vocab: int) -> float:
    """Lane-instructions per element of a whole row of ``vocab`` columns (contiguous rows),
    averaged over the row alignments that occur: full tiles at the streaming count, the
    partial first and last tiles at the masked-tile count, and (stats kernel) the rest of the
    kernel (set-up, the final reduction, both partial-tile paths) once per program."""
    code, launch = row["code"], row["launch"]
    block, vec = launch["block"], launch["vec"] or 1
    threads = 32 * launch["num_warps"]
    splits = launch["grid"][1] if len(launch["grid"]) > 1 else 1
    total = 0.0
    for lead in sorted({(r * vocab) % vec for r in range(vec)}):
        end = vocab + lead
        n_full = end // block - (1 if lead else 0)
        n_partial = (1 if lead else 0) + (1 if end % block else 0)
        if lead and end <= block:
            n_full, n_partial = 0, 1
        partial = code["partial_instructions"] * (launch["tile_r"] if code["partial_loop"] else 1)
        cost = n_full * code["stream_instructions"] + n_partial * partial
        if code["streaming"] == "loop":
            fixed = (code["total_instructions"] - code["stream_instructions"]
                     - code["partial_instructions"])
        else:
            fixed = 0
        cost += splits * fixed
        total += cost * threads / vocab
    return total / len({(r * vocab) % vec for r in range(vec)})


def _report_job(job):
    case, phase_index, arch, cache_dir = job
    _, launch = case_launches(case)[phase_index]
    return job, report(launch, arch, cache_dir).as_dict()


def all_reports(cases=CASES, targets=TARGETS, cache_dir=None, workers: int | None = None):
    """``[{case, phase, launch, arch, code}]`` for every case, launch and target; distinct
    compilations run in ``workers`` processes (default: the CPU count)."""
    from concurrent.futures import ProcessPoolExecutor
    jobs, rows, keys = [], [], []
    for case in cases:
        for p, (phase, launch) in enumerate(case_launches(case)):
            for arch in targets:
                jobs.append((case, p, arch, str(cache_dir) if cache_dir else None))
                rows.append(dict(case=case.name, phase=phase, launch=launch_summary(launch),
                                 arch=arch, input_bytes_per_column=input_bytes_per_column(case)))
                keys.append(_cache_key(launch, arch))
    # One compilation per distinct key; the other rows share its result.
    first = {}
    for key, job in zip(keys, jobs):
        first.setdefault(key, job)
    workers = workers or min(len(first), os.cpu_count() or 1)
    if workers > 1:
        import multiprocessing

        import torch
        # Forked workers must not inherit an initialised CUDA context.
        method = "spawn" if torch.cuda.is_initialized() else None
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            done = dict(pool.map(_report_job, first.values()))
    else:
        done = dict(map(_report_job, first.values()))
    for key, row in zip(keys, rows):
        row["code"] = done[first[key]]
    return rows


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description="Compile the triton backend's kernels for "
                                     "NVIDIA targets and print their machine-code facts (JSON).")
    parser.add_argument("--cache", default=None, help="folder for cached results")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    args = parser.parse_args(argv)
    targets = tuple(int(t) for t in args.targets.split(","))
    print(json.dumps(all_reports(targets=targets, cache_dir=args.cache)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
