"""The real-model demo's plumbing (``rkld demo`` with a pretrained model), run in seconds with a
saved tiny model standing in for SmolLM2: every stage, the side-by-side report, the results."""
import json

import pytest

from rkld.cli import main
from rkld.data import load_benchmark
from rkld.models import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_real_demo_runs_every_stage_and_shows_answers_side_by_side(tmp_path, capsys,
                                                                    monkeypatch):
    import rkld.real_demo as real_demo
    texts = [r["question"] + " " + r["answer"] for r in load_benchmark("synthetic").split("full")]
    folder = tmp_path / "pretrained"
    build_tiny_model(texts, folder, seed=5, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, vocab_size=300)
    small = {"finetune_epochs": 1, "strengthen_epochs": 1, "unlearn_epochs": 1,
             "max_new_tokens": 6, "general_questions": 3}
    monkeypatch.setattr(real_demo.RealDemoConfig, "__init__", _with_defaults(
        real_demo.RealDemoConfig.__init__, small))
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(folder), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for stage in ("target", "retain", "strengthened", "rkld"):
        assert f"[demo] {stage}: rkld " in printed
        assert json.loads((out / "models" / stage / "run.json").read_text())["status"] == \
            "finished"
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"target", "retain", "rkld"}
    assert results["retain"]["forget_quality"] is None
    assert 0 <= results["rkld"]["forget_quality"] <= 1
    assert results["rkld"]["model_utility"] is None          # synthetic: no general knowledge
    report = (out / "report.md").read_text()
    assert "| question | true answer | target | rkld |" in report
    assert report.count("(p ") == 2 * 2 * 3           # 2 models x 2 authors x 3 questions
    assert "3 authors" in report                      # synthetic default: 2 retain + 1 forget
    record = json.loads((out / "demo.json").read_text())
    assert record["stages"]["target"]["command"].startswith(f"rkld finetune --model {folder}")
    assert record["config"]["max_authors"] == 3


def _with_defaults(init, overrides):
    def patched(self, *args, **kwargs):
        init(self, *args, **{**overrides, **kwargs})
    return patched
