"""Shared test setup.

Triton's interpreter must be switched on before triton is first imported, and only when no GPU
is present: then the Triton kernels run on CPU tensors (slowly), so keep their shapes small.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores on CI: keep intra-op threads bounded so parallel tests do not oversubscribe.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
