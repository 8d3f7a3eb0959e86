"""Unlearning with 2 CPU processes (gloo) under DDP and FSDP2 equals one process.

One ``torchrun`` launch runs, for each strategy, (a) the gradient of one optimizer step
(checks the normalisation by the step's global token count, including the world-size factor
that DDP's and FSDP's gradient averaging needs) and (b) a whole unlearning run with the
teacher cache and a retain term, checkpoints and the final save included.
"""
import json
import textwrap

import pytest
import torch
from conftest import torchrun
from safetensors.torch import load_file

from rkld.config import UnlearnConfig
from rkld.data import load_benchmark
from rkld.models import load_model
from rkld.parallel import DistInfo
from rkld.teacher_cache import LiveTeachers
from rkld.train import TrainData, _encode, _UnlearnObjective, step_gradients, unlearn

STEP = [3, 11, 0, 7, 19, 5, 2]          # 7 examples: the two processes get 4 and 3

WORKER = textwrap.dedent('''
    import json, sys, torch
    torch.set_num_threads(1)
    from rkld.config import UnlearnConfig
    from rkld.data import load_benchmark
    from rkld.models import load_model
    from rkld.parallel import full_tensor, init_distributed, wrap_model
    from rkld.teacher_cache import LiveTeachers
    from rkld.train import TrainData, _encode, _UnlearnObjective, step_gradients, unlearn

    settings, step, root = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    for strategy in ("ddp", "fsdp"):
        cfg = UnlearnConfig(**settings, out=f"{root}/{strategy}", parallel=strategy)
        info = init_distributed(strategy)
        student, tokenizer = load_model(cfg.model)
        student = wrap_model(student, info)
        teachers = LiveTeachers({"original": load_model(cfg.model)[0],
                                 "strengthened": load_model(cfg.strengthened)[0]})
        examples = _encode(tokenizer, load_benchmark("synthetic").split("forget10"), cfg, "f")
        data = TrainData(examples, None, tokenizer.pad_token_id)
        no_retain = UnlearnConfig(**dict(settings, retain_term="none"), out="unused")
        loss, tokens, _ = step_gradients(student, _UnlearnObjective(no_retain, teachers, None),
                                         data, step, 2, info)
        grads = {name.removeprefix("module."): full_tensor(param.grad).clone()
                 for name, param in student.named_parameters()}
        if info.is_main:
            torch.save({"loss": loss, "tokens": tokens, "grads": grads},
                       f"{root}/{strategy}_step.pt")
        unlearn(cfg)

    # Leave the process group before exiting: at interpreter shutdown gloo's threads can abort.
    torch.distributed.destroy_process_group()
''')


def test_two_processes_match_one(pair, tmp_path):
    settings = dict(model=str(pair / "original"), strengthened=str(pair / "strengthened"),
                    forget="forget10", epochs=2, lr=2e-3, batch_size=8, micro_batch_size=2,
                    max_length=48, retain_term="nll", progress=False)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun(script, json.dumps(settings), json.dumps(STEP), tmp_path)

    # One process: the same step's gradient, and the same run.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = UnlearnConfig(**settings, out=str(tmp_path / "single"))
        student, tokenizer = load_model(cfg.model)
        teachers = LiveTeachers({"original": load_model(cfg.model)[0],
                                 "strengthened": load_model(cfg.strengthened)[0]})
        examples = _encode(tokenizer, load_benchmark("synthetic").split("forget10"), cfg, "f")
        no_retain = UnlearnConfig(**dict(settings, retain_term="none"), out="unused")
        loss, tokens, _ = step_gradients(student, _UnlearnObjective(no_retain, teachers, None),
                                         TrainData(examples, None, tokenizer.pad_token_id),
                                         STEP, 2, DistInfo())
        unlearn(cfg)
    finally:
        torch.set_num_threads(previous)

    single_weights = load_file(str(tmp_path / "single" / "model.safetensors"))
    for strategy in ("ddp", "fsdp"):
        step = torch.load(tmp_path / f"{strategy}_step.pt")
        assert step["tokens"] == tokens
        assert step["loss"] == pytest.approx(loss, rel=1e-5)
        for name, param in student.named_parameters():
            torch.testing.assert_close(step["grads"][name], param.grad, rtol=1e-4, atol=1e-7,
                                       msg=lambda m: f"{strategy} gradient of {name}: {m}")
        weights = load_file(str(tmp_path / strategy / "model.safetensors"))
        assert weights.keys() == single_weights.keys()
        for name, value in single_weights.items():
            torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-5,
                                       msg=lambda m: f"{strategy} weight {name}: {m}")
        record = json.loads((tmp_path / strategy / "run.json").read_text())
        assert record["world_size"] == 2 and record["strategy"] == strategy
        assert record["status"] == "finished"


LATE_WORKER = textwrap.dedent('''
    import json, os, sys, time, torch
    torch.set_num_threads(1)
    import rkld.runs as runs
    import rkld.train as train
    from rkld.config import UnlearnConfig

    settings, out = json.loads(sys.argv[1]), sys.argv[2]
    waiting = out + ".rank0-waits"
    # Rank 1 reaches the output check late, as a loaded machine can make it do: only once rank 0
    # has either written run.json of this launch (it did not wait) or started waiting for the
    # other processes (rank 0's first broadcast, from the run machinery or the loop, is marked
    # by a file).
    if os.environ["RANK"] == "0":
        for module in (runs, train):
            def marked_broadcast_object(*args, _broadcast=module.broadcast_object, **kwargs):
                open(waiting, "w").close()
                return _broadcast(*args, **kwargs)
            module.broadcast_object = marked_broadcast_object
    else:
        load_benchmark = train.load_benchmark
        def late_load_benchmark(*args, **kwargs):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (
                    os.path.exists(waiting) or os.path.exists(os.path.join(out, "run.json"))):
                time.sleep(0.05)
            return load_benchmark(*args, **kwargs)
        train.load_benchmark = late_load_benchmark
    train.unlearn(UnlearnConfig(**settings, out=out, parallel="ddp"))
    torch.distributed.destroy_process_group()
''')


def test_a_process_that_checks_the_output_late_is_not_refused(pair, tmp_path):
    """The processes of one launch must not take their own run for an earlier unfinished one
    (the cause of a rare failure of the test above on a loaded machine)."""
    settings = dict(model=str(pair / "original"), strengthened=str(pair / "strengthened"),
                    forget="forget01", epochs=1, lr=1e-3, batch_size=4, micro_batch_size=2,
                    max_length=32, progress=False)
    script = tmp_path / "late_worker.py"
    script.write_text(LATE_WORKER)
    torchrun(script, json.dumps(settings), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "finished" and record["world_size"] == 2
