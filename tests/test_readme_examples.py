"""The README's usage examples (examples/*.py) run, and do what they claim."""
import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


pytestmark = pytest.mark.usefixtures("one_thread")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_loop_unlearns_the_forget_set():
    result = _load("custom_loop").main(steps=20)
    losses = result["losses"]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0]                     # the student approaches the teacher
    assert result["nll_after"] > result["nll_before"] + 0.5  # and forgets: forget-set NLL rises


def test_hf_trainer_compute_loss_subclass_trains():
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    losses = _load("hf_trainer").main(steps=6)["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
