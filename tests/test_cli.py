"""The ``rkld`` command line: parsing into configs, a tiny run, and one-line user errors."""
import json
import subprocess
import sys

import pytest
import torch

from rkld.cli import _config, build_parser, main
from rkld.config import FinetuneConfig, UnlearnConfig

TINY_ARGS = ["--tiny-vocab", "300", "--tiny-hidden", "32", "--tiny-layers", "2",
             "--max-length", "48", "--no-progress"]


def test_unlearn_arguments_fill_the_config():
    args = build_parser().parse_args(
        ["unlearn", "--model", "m", "--strengthened", "s", "--out", "o", "--forget", "forget05",
         "--alpha", "4", "--direction", "forward", "--retain-term", "kl", "--live-teachers",
         "--lora", "--batch-size", "16", "--micro-batch-size", "4", "--resume"])
    cfg = _config(UnlearnConfig, args)
    assert (cfg.model, cfg.strengthened, cfg.forget, cfg.alpha) == ("m", "s", "forget05", 4.0)
    assert (cfg.direction, cfg.retain_term, cfg.live_teachers, cfg.lora) == \
        ("forward", "kl", True, True)
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.resume, cfg.progress) == (16, 4, True, True)
    # Unset options keep the dataclass defaults (the paper's).
    assert (cfg.lr, cfg.weight_decay, cfg.epochs, cfg.method) == (1e-5, 0.01, 5, "rkld")
    assert cfg.tiny == {}
    assert (cfg.seed, cfg.data_seed, cfg.stop_at_holdout) == (0, 0, False)
    args = build_parser().parse_args(["unlearn", "--model", "m", "--out", "o", "--seed", "3",
                                      "--data-seed", "7", "--method", "npo", "--npo-beta",
                                      "0.2", "--stop-at-holdout", "--stop-check-every", "5"])
    cfg = _config(UnlearnConfig, args)
    assert (cfg.seed, cfg.data_seed, cfg.method, cfg.npo_beta) == (3, 7, "npo", 0.2)
    assert (cfg.stop_at_holdout, cfg.stop_check_every) == (True, 5)


def _rebuilt(command: str, config_class):
    import shlex
    words = shlex.split(command)
    assert words[0] == "rkld"
    return _config(config_class, build_parser().parse_args(words[1:]))


def _result_settings(cfg) -> dict:
    """The settings that shape a run's result (what a printed command must reproduce)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "overwrite",
                                                                  "progress")}


def test_command_line_rebuilds_the_config():
    from rkld.cli import command_line
    unlearn = UnlearnConfig(model="m", strengthened="s dir", out="o", alpha=24.0, lr=4e-4,
                            epochs=6, batch_size=4, micro_batch_size=4, live_teachers=True,
                            teacher_boost="logprobs", direction="forward", max_authors=7,
                            dtype="bfloat16", overwrite=True, progress=False)
    command = command_line("unlearn", unlearn.to_dict())
    assert "--alpha 24.0" in command and "--lr 0.0004" in command and "'s dir'" in command
    assert "--overwrite" not in command and "--weight-decay" not in command   # at its default
    assert _result_settings(_rebuilt(command, UnlearnConfig)) == _result_settings(unlearn)
    finetune = FinetuneConfig(model="tiny", out="t", split="full,world_facts", seed=3,
                              tiny={"vocab_size": 1024, "hidden_size": 128,
                                    "num_hidden_layers": 2, "intermediate_size": 344})
    command = command_line("finetune", finetune.to_dict())
    assert _result_settings(_rebuilt(command, FinetuneConfig)) == _result_settings(finetune)
    with pytest.raises(ValueError, match="num_attention_heads have no rkld finetune option"):
        command_line("finetune", dict(finetune.to_dict(), tiny={"num_attention_heads": 2}))


def test_choices_are_enforced(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["unlearn", "--model", "m", "--out", "o", "--method", "dpo"])
    assert "invalid choice: 'dpo'" in capsys.readouterr().err


def test_finetune_tiny_then_errors(tmp_path, capsys):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "target"
        code = main(["finetune", "--model", "tiny", "--out", str(out), "--split", "forget10",
                     "--epochs", "1", "--lr", "1e-3", "--batch-size", "10",
                     "--micro-batch-size", "10", *TINY_ARGS])
    finally:
        torch.set_num_threads(previous)
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out) and report["steps"] == 2
    cfg = json.loads((out / "run.json").read_text())["config"]
    assert cfg["tiny"] == {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2}
    assert FinetuneConfig(**cfg).split == "forget10"

    code = main(["finetune", "--model", "tiny", "--out", str(out), *TINY_ARGS])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("rkld finetune: error: ") and "--overwrite" in err
    assert "Traceback" not in err
    code = main(["unlearn", "--model", str(out), "--strengthened", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "u"), "--no-progress"])
    assert code == 2
    assert "strengthened model folder" in capsys.readouterr().err


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, "-m", "rkld", "unlearn", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for option in ("--live-teachers", "--retain-term", "--direction", "--resume", "--lora"):
        assert option in result.stdout


@pytest.mark.parametrize("argv, named", [
    (["eval", "--model", "m", "--out", "o", "--batch-size", "0"],
     "argument --batch-size: expected a positive integer; got 0"),
    (["demo", "--threads", "0"], "argument --threads: expected a positive integer; got 0"),
    (["unlearn", "--model", "m", "--out", "o", "--save-every", "-1"],
     "argument --save-every: expected an integer >= 0; got -1"),
    (["finetune", "--model", "tiny", "--out", "o", "--epochs", "two"],
     "argument --epochs: expected a positive integer; got 'two'"),
    (["unlearn", "--model", "m", "--out", "o", "--nonsense", "1"],
     "unrecognized arguments: --nonsense 1"),
])
def test_bad_option_values_are_one_line(argv, named, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and err.startswith("rkld")


@pytest.mark.parametrize("option, value, named", [
    ("--tiny-hidden", "3", "--tiny-hidden (hidden_size) must be a multiple of 8"),
    ("--tiny-vocab", "1", "--tiny-vocab (vocab_size) must be at least 259"),
])
def test_tiny_settings_a_model_cannot_have_are_refused(option, value, named, tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["finetune", "--model", "tiny", "--out", str(out), option, value,
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and f"got {value}" in err
    assert not out.exists()
