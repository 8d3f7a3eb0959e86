"""``rkld benchmark --model PRETRAINED``: the protocol's plumbing with a saved (tiny) model
standing in for a pretrained one, so it runs in seconds: the target and retain models fine-tune
that model, each method unlearns the same target, the stage times are announced from a
measured rate before anything runs, and a second run reuses every finished stage."""
import json

import pytest

from rkld.benchmark import Protocol, run_benchmark, stage_estimates
from rkld.cli import _model_settings, build_parser
from rkld.cli import _protocol as cli_protocol
from rkld.data import load_benchmark
from rkld.models import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pretrained(tmp_path):
    texts = [r["question"] + " " + r["answer"] for r in load_benchmark("synthetic").split("full")]
    folder = tmp_path / "pretrained"
    build_tiny_model(texts, folder, seed=5, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, vocab_size=300)
    return folder


def _protocol(out, model, **overrides):
    settings = dict(out=str(out), model=str(model), data="synthetic", data_seed=3,
                    max_authors=10, retain_seeds=(11, 12), max_length=64, max_new_tokens=4,
                    finetune_args="--epochs 1 --lr 5e-3 --batch-size 32 --micro-batch-size 32",
                    strengthen_args="--epochs 1 --lr 3e-3 --batch-size 16 "
                                    "--micro-batch-size 16",
                    unlearn_args="--epochs 1 --lr 1e-3 --batch-size 8 --micro-batch-size 8",
                    allow_weak=True)
    settings.update(overrides)
    return Protocol(**settings)


def test_benchmark_fine_tunes_the_pretrained_model(tmp_path, pretrained, capsys):
    out = tmp_path / "bench"
    result = run_benchmark(_protocol(out, pretrained), [1], ["rkld", "ga"])
    printed = capsys.readouterr().out
    assert "measured now:" in printed and "tokens/s training" in printed
    assert printed.index("measured now:") < printed.index("finetune ->")
    for line in ("retain model (finetune): 2 x", "target (finetune): 1 x",
                 "unlearning run (at most): 2 x", "evaluation: 5 x"):
        assert line in printed
    assert [r["method"] for r in result["rows"]] == ["target", "rkld", "ga"]
    models = out / "models" / "data-3"
    for name in ("retain-11", "retain-12", "seed-1/target"):
        config = json.loads((models / name / "run.json").read_text())["config"]
        assert config["model"] == str(pretrained) and config["model"] != "tiny"
        assert "real_authors" not in config["split"]     # pretrained: no general-knowledge data
    for method in ("rkld", "ga"):
        config = json.loads((models / "seed-1" / method / "run.json").read_text())["config"]
        assert config["model"] == str(models / "seed-1" / "target")
    again = run_benchmark(_protocol(out, pretrained), [1], ["rkld", "ga"])
    assert not [k for k in again["stage_seconds"] if not k.startswith("eval/")]
    assert again["rows"][1]["fq"] == result["rows"][1]["fq"]


def test_stage_estimates_scale_with_the_measured_rate(tmp_path, pretrained):
    protocol = _protocol(tmp_path, pretrained)
    rates = {"train_tokens_per_s": 100.0, "forward_tokens_per_s": 400.0, "decode_step_s": 0.1,
             "tokens_per_example": 50.0}
    rows = {name: (count, seconds) for name, count, seconds in
            stage_estimates(protocol, [1, 2], ["rkld"], rates)}
    bench = load_benchmark("synthetic", seed=3, max_authors=10)
    assert rows["target (finetune)"] == (2, pytest.approx(len(bench.split("full")) * 50 / 100))
    faster = stage_estimates(protocol, [1, 2], ["rkld"], {**rates, "train_tokens_per_s": 200.0})
    assert faster[1][2] == pytest.approx(rows["target (finetune)"][1] / 2)


def test_pretrained_defaults_fill_what_the_command_line_left():
    args = build_parser().parse_args(["benchmark", "--out", "x", "--model", "smollm2-135m"])
    settings = _model_settings(args)
    assert settings["model"] == "smollm2-135m" and "--lr 2e-4" in settings["finetune_args"]
    assert settings["template"].startswith("<|im_start|>user")
    args = build_parser().parse_args(["benchmark", "--out", "x", "--model", "smollm2-135m",
                                      "--finetune-args", "--epochs 1"])
    protocol = cli_protocol(args, 1)
    assert protocol.finetune_args == "--epochs 1" and protocol.max_length == 160
    assert "--lr 2e-4" in protocol.strengthen_args
    tiny = _model_settings(build_parser().parse_args(["benchmark", "--out", "x"]))
    assert tiny == {"model": "tiny", "template": "auto"}
