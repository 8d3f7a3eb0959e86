"""Resuming a 2-process (gloo) unlearning run, under DDP and FSDP2, equals not stopping it.

A first ``torchrun`` launch runs, for each strategy, an uninterrupted unlearning run and the
same run "killed" (an exception from ``on_step``) after a step whose work is only partly in the
newest checkpoint; a second launch, new processes as after a real crash, resumes the killed
runs. The resumed runs must end with the uninterrupted runs' weights and step losses.
"""
import json
import textwrap

import pytest
import torch
from conftest import torchrun
from safetensors.torch import load_file

STRATEGIES = ("ddp", "fsdp")
# forget10 has 20 examples: 3 steps per epoch of 8, 6 in all. Checkpoints after steps 2, 3
# (epoch end) and 4; killed after step 5, so the resume starts from step 4 and redoes step 5.
STEPS, KILLED_AFTER, CHECKPOINT = 6, 5, 4

WORKER = textwrap.dedent('''
    import json, sys, torch
    torch.set_num_threads(1)
    from rkld.config import UnlearnConfig
    from rkld.train import unlearn

    class Killed(Exception):
        pass

    plan, root, phase = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    settings = plan["settings"]

    def kill_after(step, record):
        if step == plan["killed_after"]:
            raise Killed

    for strategy in plan["strategies"]:
        config = lambda name, **more: UnlearnConfig(**settings, **more, parallel=strategy,
                                                    out=f"{root}/{strategy}-{name}")
        if phase == "kill":
            unlearn(config("full"))
            try:
                unlearn(config("resumed"), on_step=kill_after)
            except Killed:
                pass
            else:
                raise SystemExit("the run was not killed")
        else:
            unlearn(config("resumed", resume=True))

    # Leave the process group before exiting: at interpreter shutdown gloo's threads can abort.
    torch.distributed.destroy_process_group()
''')


def _launch(script, settings, root, phase):
    plan = {"settings": settings, "strategies": STRATEGIES, "killed_after": KILLED_AFTER}
    torchrun(script, json.dumps(plan), root, phase)


def _log(folder) -> list:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_resumed_two_process_run_matches_an_uninterrupted_one(pair, tmp_path):
    settings = dict(model=str(pair / "original"), strengthened=str(pair / "strengthened"),
                    forget="forget10", epochs=2, lr=2e-3, batch_size=8, micro_batch_size=2,
                    max_length=48, save_every=2, progress=False)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    _launch(script, settings, tmp_path, "kill")
    for strategy in STRATEGIES:
        killed = tmp_path / f"{strategy}-resumed"
        assert json.loads((killed / "run.json").read_text())["status"] == "running"
        latest = json.loads((killed / "checkpoints" / "latest.json").read_text())
        assert latest["step"] == CHECKPOINT, strategy
        assert [r["step"] for r in _log(killed)] == list(range(1, KILLED_AFTER + 1))

    _launch(script, settings, tmp_path, "resume")
    for strategy in STRATEGIES:
        full, resumed = tmp_path / f"{strategy}-full", tmp_path / f"{strategy}-resumed"
        record = json.loads((resumed / "run.json").read_text())
        assert record["status"] == "finished" and record["strategy"] == strategy
        assert record["world_size"] == 2
        assert record["stats"]["resumed_from_step"] == CHECKPOINT
        assert json.loads((full / "run.json").read_text())["stats"]["resumed_from_step"] == 0
        assert not list((resumed / "checkpoints").glob(".tmp-*"))

        full_log, resumed_log = _log(full), _log(resumed)
        assert [r["step"] for r in full_log] == list(range(1, STEPS + 1))
        assert [r["step"] for r in resumed_log] == list(range(1, STEPS + 1))   # step 5 once
        for want, got in zip(full_log, resumed_log):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), (strategy, got["step"])
            assert got["lr"] == pytest.approx(want["lr"], rel=1e-12), (strategy, got["step"])
            assert got["supervised_tokens"] == want["supervised_tokens"], (strategy, got["step"])

        want_weights = load_file(str(full / "model.safetensors"))
        got_weights = load_file(str(resumed / "model.safetensors"))
        assert got_weights.keys() == want_weights.keys()
        original = load_file(str(pair / "original" / "model.safetensors"))
        assert any(not torch.equal(value, original[name]) for name, value in want_weights.items())
        for name, value in want_weights.items():
            torch.testing.assert_close(got_weights[name], value, rtol=0, atol=1e-6,
                                       msg=lambda m: f"{strategy} weight {name}: {m}")
