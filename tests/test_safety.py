"""A run is never lost or corrupted: output folders apart from inputs, overwrite that keeps the
old run until the new one finished, resume that refuses what changed, locks, checksums,
weights-only loading, no remote code, non-finite stops, and one-line errors naming the file."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rkld import storage
from rkld.cli import main
from rkld.config import FinetuneConfig, UnlearnConfig
from rkld.data import load_benchmark
from rkld.evaluate import EpochEvaluator, EvalConfig
from rkld.models import load_model, model_fingerprint
from rkld.storage import CorruptFileError, RunLock, atomic_torch_save, atomic_write_json
from rkld.teacher_cache import TeacherCache
from rkld.train import TrainingDiverged, finetune, unlearn
from rkld_kernels import fused_linear_rkl_loss, fused_rkl_loss
from rkld_kernels._checks import check_labels

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    pass


def _cfg(pair, out, **overrides):
    settings = dict(model=str(pair / "original"), strengthened=str(pair / "strengthened"),
                    out=str(out), forget="forget10", epochs=2, batch_size=8, micro_batch_size=8,
                    max_length=48, lr=2e-3, save_every=2, progress=False)
    settings.update(overrides)
    return UnlearnConfig(**settings)


def _kill_after(n):
    def on_step(step, record):
        if step == n:
            raise Killed
    return on_step


def _killed_run(pair, out, **overrides):
    """A run killed after step 5 of 6: its newest checkpoint is step 4."""
    with pytest.raises(Killed):
        unlearn(_cfg(pair, out, **overrides), on_step=_kill_after(5))
    return Path(out)


def _copy_model(source, target):
    shutil.copytree(source, target)
    return target


# --------------------------------------------------------------------------- data loss

@pytest.mark.parametrize("where", ["original", "strengthened", "inside", "parent"])
def test_out_that_is_contains_or_lies_inside_an_input_is_refused(pair, tmp_path, where):
    model = _copy_model(pair / "original", tmp_path / "models" / "original")
    strong = _copy_model(pair / "strengthened", tmp_path / "models" / "strengthened")
    before = (model / "model.safetensors").read_bytes()
    out = {"original": model, "strengthened": strong, "inside": model / "run",
           "parent": tmp_path / "models"}[where]
    cfg = UnlearnConfig(model=str(model), strengthened=str(strong), out=str(out),
                        overwrite=True, progress=False)
    relation = {"inside": "lies inside", "parent": "contains"}.get(where, "is")
    with pytest.raises(ValueError, match=f"{relation} the (original|strengthened) model"):
        unlearn(cfg)
    assert (model / "model.safetensors").read_bytes() == before
    assert (strong / "model.safetensors").exists() and not (model / "run").exists()
    with pytest.raises(ValueError, match="is the model"):
        finetune(FinetuneConfig(model=str(model), out=str(model), overwrite=True))
    assert (model / "model.safetensors").read_bytes() == before


def test_overwrite_keeps_the_old_run_until_the_new_one_finished(pair, tmp_path):
    out = tmp_path / "u"
    unlearn(_cfg(pair, out, epochs=1))
    finished = (out / "model.safetensors").read_bytes()
    # A replacing run killed half-way: the finished run is still there, whole.
    with pytest.raises(Killed):
        unlearn(_cfg(pair, out, overwrite=True, alpha=4.0), on_step=_kill_after(2))
    assert (out / ".replaced" / "model.safetensors").read_bytes() == finished
    assert json.loads((out / ".replaced" / "run.json").read_text())["status"] == "finished"
    assert json.loads((out / "run.json").read_text())["config"]["alpha"] == 4.0
    # Overwriting again keeps that finished run (not the unfinished one) until it finishes.
    with pytest.raises(Killed):
        unlearn(_cfg(pair, out, overwrite=True, alpha=2.0), on_step=_kill_after(1))
    assert (out / ".replaced" / "model.safetensors").read_bytes() == finished
    unlearn(_cfg(pair, out, overwrite=True, alpha=2.0, epochs=1))
    assert not (out / ".replaced").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert not (out / storage.LOCK_FILE).exists()


@pytest.mark.parametrize("damage", ["deleted", "empty"])
def test_resume_without_a_readable_checkpoint_pointer_is_an_error(pair, tmp_path, damage):
    out = _killed_run(pair, tmp_path / "u")
    latest = out / "checkpoints" / "latest.json"
    log_before = (out / "log.jsonl").read_text()
    if damage == "deleted":
        latest.unlink()
        error, message = FileNotFoundError, "latest.json is missing"
    else:
        latest.write_text("")
        error, message = CorruptFileError, "latest.json: the checkpoint pointer is empty"
    with pytest.raises(error, match=message):
        unlearn(_cfg(pair, out, resume=True))
    assert (out / "log.jsonl").read_text() == log_before        # never a silent restart


@pytest.mark.parametrize("killed_epoch", [2, 3])
def test_killed_during_an_epoch_evaluation_redoes_it_on_resume(pair, tmp_path, killed_epoch):
    bench = load_benchmark("synthetic")
    config = EvalConfig(forget_split="forget10", generation=False, max_length=48,
                        progress=False)
    reference = [0.5] * len(bench.split("forget10_perturbed"))
    out = tmp_path / "u"
    cfg = _cfg(pair, out, method="ga", strengthened=None, epochs=3, batch_size=20,
               micro_batch_size=20, save_every=0)
    evaluator = EpochEvaluator(out, bench, config, reference, keep_peak=False)

    def killed_in_evaluation(epoch, model, tokenizer, stats):
        if epoch == killed_epoch:
            raise Killed        # as a SIGKILL in the middle of evaluating that epoch
        evaluator(epoch, model, tokenizer, stats)

    with pytest.raises(Killed):
        unlearn(cfg, on_epoch_end=killed_in_evaluation)
    resumed = EpochEvaluator(out, bench, config, reference, keep_peak=False, resume=True)
    _, stats = unlearn(_cfg(pair, out, method="ga", strengthened=None, epochs=3, batch_size=20,
                            micro_batch_size=20, save_every=0, resume=True),
                       on_epoch_end=resumed)
    assert stats["resumed_from_step"] == killed_epoch       # one step per epoch
    curve = json.loads((out / "epoch_curve.json").read_text())["curve"]
    assert [p["epoch"] for p in curve] == [1, 2, 3]
    assert (out / "epoch_eval" / f"epoch-{killed_epoch}" / "TOFU_EVAL.json").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


# --------------------------------------------------------------------------- code execution

def test_checkpoint_rng_file_is_never_unpickled(pair, tmp_path):
    out = _killed_run(pair, tmp_path / "u")
    folder = out / "checkpoints" / "step-4"
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"cpu": Payload(), "cuda": None}, folder / "rng.rank0.pt")
    # The attacker also fixes the manifest: only weights-only loading stops the code.
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["rng.rank0.pt"] = storage.sha256_file(folder / "rng.rank0.pt")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match="rng.rank0.pt: the checkpoint's random-number"):
        unlearn(_cfg(pair, out, resume=True))
    assert not marker.exists()


def test_model_code_shipped_in_a_folder_never_runs(pair, tmp_path, monkeypatch):
    folder = _copy_model(pair / "original", tmp_path / "custom")
    marker = tmp_path / "code-ran"
    (folder / "modeling_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'rkld_custom'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="rkld_custom",
                  auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    # Without trust_remote_code=False, transformers asks on the terminal; answer yes.
    monkeypatch.setattr("builtins.input", lambda prompt="": "y")
    with pytest.raises(ValueError, match="never runs code shipped with a model"):
        load_model(folder)
    assert main(["unlearn", "--model", str(folder), "--method", "ga", "--out",
                 str(tmp_path / "u"), "--no-progress"]) == 2
    assert not marker.exists()


# --------------------------------------------------------------------------- silently wrong

def test_resume_refuses_changed_settings_and_inputs(pair, tmp_path, capsys):
    out = _killed_run(pair, tmp_path / "u")
    record = (out / "run.json").read_text()
    with pytest.raises(ValueError) as caught:
        unlearn(_cfg(pair, out, resume=True, alpha=4.0, lr=1e-3, direction="forward",
                     batch_size=4, epochs=3))
    message = str(caught.value)
    assert "\n" not in message
    for change in ("alpha 8.0 -> 4.0", "lr 0.002 -> 0.001", "direction 'reverse' -> 'forward'",
                   "batch_size 8 -> 4", "epochs 2 -> 3"):
        assert change in message
    with pytest.raises(ValueError, match="method 'rkld' -> 'ga'"):
        unlearn(_cfg(pair, out, resume=True, method="ga", strengthened=None))
    # The strengthened model replaced at the same path: its content fingerprint changed.
    moved = _copy_model(pair / "strengthened", tmp_path / "strong")
    weights = load_file(str(moved / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] + 1.0
    save_file(weights, str(moved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"strengthened model \(its files changed\)"):
        unlearn(_cfg(pair, out, resume=True, strengthened=str(moved)))
    assert (out / "run.json").read_text() == record          # the old configuration is kept
    # What only changes how the work is done may change: the run finishes.
    _, stats = unlearn(_cfg(pair, out, resume=True, save_every=0, micro_batch_size=4))
    assert stats["resumed_from_step"] == 4


def test_teacher_cache_key_holds_content_fingerprints_and_checksums(pair, tmp_path, capsys):
    out, _ = unlearn(_cfg(pair, tmp_path / "u", epochs=1))
    folder = out / "teacher_cache" / "forget"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["key"]["strengthened"] == model_fingerprint(pair / "strengthened")
    assert meta["key"]["original"] == model_fingerprint(pair / "original")
    assert TeacherCache.open(folder, meta["key"], torch.device("cpu")) is not None
    # A cache file replaced by a valid file with other values.
    part = torch.load(folder / "strengthened.rank0.pt", weights_only=True)
    part["hidden"] = part["hidden"] + 1.0
    torch.save(part, folder / "strengthened.rank0.pt")
    with pytest.raises(CorruptFileError, match="strengthened.rank0.pt: the teacher-cache file"):
        TeacherCache(folder, torch.device("cpu"))
    capsys.readouterr()
    assert TeacherCache.open(folder, meta["key"], torch.device("cpu")) is None
    assert "rebuilding the teacher cache" in capsys.readouterr().out


def test_non_finite_hyper_parameters_are_refused_up_front(pair, tmp_path):
    for name in ("lr", "alpha", "temperature", "weight_decay", "max_grad_norm",
                 "warmup_epochs"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            unlearn(_cfg(pair, tmp_path / "u", **{name: float("inf")}))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        unlearn(_cfg(pair, tmp_path / "u", chunk_size=0))
    assert not (tmp_path / "u").exists()


def test_nan_weights_stop_the_run_and_keep_the_last_good_checkpoint(pair, tmp_path, capsys):
    out = _killed_run(pair, tmp_path / "u")
    folder = out / "checkpoints" / "step-4"
    state = torch.load(folder / "state.pt", weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, folder / "state.pt")      # as if saved by a run that diverged
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["state.pt"] = storage.sha256_file(folder / "state.pt")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainingDiverged, match="step 5: the loss is nan"):
        unlearn(_cfg(pair, out, resume=True))
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and "nan" in record["error"]
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert folder.is_dir() and not (out / "model.safetensors").exists()
    # From the command line: a non-zero exit and one line.
    args = ["unlearn", "--model", str(pair / "original"), "--strengthened",
            str(pair / "strengthened"), "--out", str(out), "--forget", "forget10", "--epochs",
            "2", "--batch-size", "8", "--micro-batch-size", "8", "--max-length", "48",
            "--lr", "2e-3", "--save-every", "2", "--no-progress", "--resume"]
    capsys.readouterr()
    assert main(args) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "rkld unlearn" in line]
    assert len(errors) == 1 and "rkld unlearn: failed: step 5: the loss is nan" in errors[0]


def test_a_second_run_on_a_locked_folder_is_refused(pair, tmp_path, capsys):
    out = _killed_run(pair, tmp_path / "u")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / storage.LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid,
                                                          "host": os.uname().nodename}))
        log_before = (out / "log.jsonl").read_text()
        with pytest.raises(FileExistsError, match=f"in use by process {sleeper.pid}"):
            unlearn(_cfg(pair, out, resume=True))
        assert (out / "log.jsonl").read_text() == log_before
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder is gone: its stale lock is taken over, with a message.
    capsys.readouterr()
    _, stats = unlearn(_cfg(pair, out, resume=True))
    assert f"taking over the lock {out / storage.LOCK_FILE} of process {sleeper.pid}" in \
        capsys.readouterr().out
    assert stats["resumed_from_step"] == 4 and not (out / storage.LOCK_FILE).exists()


def test_lock_is_exclusive():
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        with RunLock(folder):
            with pytest.raises(FileExistsError, match=f"in use by process {os.getpid()}"):
                RunLock(folder).acquire()
        RunLock(folder).acquire().release()     # released: free again


def test_unsigned_labels_and_unrepresentable_ignore_index_are_refused():
    logits = torch.randn(4, 7)
    labels = torch.tensor([1, 2, 156, 3], dtype=torch.uint8)
    with pytest.raises(TypeError, match="signed integer dtype .* got torch.uint8"):
        fused_rkl_loss(logits, logits.clone(), labels=labels, backend="torch")
    with pytest.raises(ValueError, match=r"ignore_index must be an integer that labels' dtype "
                                         r"torch.int8 can hold \(-128..127\); got -1000"):
        check_labels("f", labels.to(torch.int8), (4,), "x", ignore_index=-1000)
    check_labels("f", labels.to(torch.int8), (4,), "x", ignore_index=-100)
    # Through the public losses: int8 labels cannot hold -1000, so nothing would be masked.
    int8_labels = labels.to(torch.int8)
    with pytest.raises(ValueError, match=r"fused_rkl_loss: ignore_index .* got -1000"):
        fused_rkl_loss(logits, logits.clone(), labels=int8_labels, ignore_index=-1000,
                       backend="torch")
    hidden, weight = torch.randn(4, 5), torch.randn(7, 5)
    with pytest.raises(ValueError, match=r"fused_linear_rkl_loss: ignore_index .* got -1000"):
        fused_linear_rkl_loss(hidden, weight, hidden.clone(), weight.clone(),
                              labels=int8_labels, ignore_index=-1000)
    with pytest.raises(TypeError, match="signed integer dtype .* got torch.uint8"):
        fused_linear_rkl_loss(hidden, weight, hidden.clone(), weight.clone(), labels=labels)


# --------------------------------------------------------------------------- clear errors

def test_damaged_files_are_named_in_one_line(pair, tmp_path):
    out = _killed_run(pair, tmp_path / "u")
    state = out / "checkpoints" / "step-4" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])           # truncated
    with pytest.raises(CorruptFileError) as caught:
        unlearn(_cfg(pair, out, resume=True))
    assert str(state) in str(caught.value) and "\n" not in str(caught.value)
    (out / "run.json").write_text("")
    with pytest.raises(CorruptFileError, match="run.json: the run record is empty"):
        unlearn(_cfg(pair, out, resume=True))
    truncated = tmp_path / "cache.pt"
    atomic_torch_save({"hidden": torch.zeros(100, 8)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CorruptFileError, match="cache.pt: a cache file is corrupt or truncated"):
        storage.load_torch(truncated, "a cache file")


def test_full_disk_is_said_as_such(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to simulate a full disk")
    # The temporary file of the atomic write is the full device.
    (tmp_path / "state.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError, match="could not write .*state.pt: the disk is full"):
        atomic_torch_save({"w": torch.zeros(100_000)}, tmp_path / "state.pt")
    (tmp_path / "run.json.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError, match="run.json: the disk is full"):
        atomic_write_json(tmp_path / "run.json", {"status": "running"})
    assert not (tmp_path / "state.pt").exists() and not (tmp_path / "run.json").exists()


def test_atomic_writes_fsync_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write_json(tmp_path / "run.json", {"a": 1})
    atomic_torch_save({"a": torch.zeros(3)}, tmp_path / "x.pt")
    assert synced == [str(tmp_path / "run.json.tmp"), str(tmp_path),
                      str(tmp_path / "x.pt.tmp"), str(tmp_path)]


# --------------------------------------------------------------------------- paths, stops, writes

def test_resume_compares_folders_not_spellings_and_a_moved_run_resumes(pair, tmp_path,
                                                                        monkeypatch):
    out = _killed_run(pair, tmp_path / "u")
    # The same folders spelled otherwise: relative, with a trailing '/', from another directory.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Killed):
        unlearn(_cfg(pair, "u/", resume=True, model=str(pair / "original") + "/"),
                on_step=_kill_after(5))
    # The run folder and the models moved elsewhere: same files, so the run resumes.
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(out, moved)
    models = _copy_model(pair, tmp_path / "models")
    monkeypatch.chdir(moved.parent)
    with pytest.raises(ValueError, match="data 'synthetic' -> "):     # still refused
        unlearn(_cfg(models, "run", resume=True, data="synthetic:phrasings=2"))
    _, stats = unlearn(_cfg(models, "run", resume=True))
    assert stats["resumed_from_step"] == 4
    record = json.loads((moved / "run.json").read_text())
    assert record["status"] == "finished" and record["paths"]["out"] == str(moved)
    assert record["config"]["model"] == str(models / "original")


def test_strengthened_model_equal_to_the_model_is_refused(pair, tmp_path):
    copy = _copy_model(pair / "original", tmp_path / "copy")
    for strengthened in (pair / "original", copy):
        with pytest.raises(ValueError, match="holds the same files as --model .*nothing is "
                                             "unlearned"):
            unlearn(_cfg(pair, tmp_path / "u", strengthened=str(strengthened)))
    assert not (tmp_path / "u").exists()


def _unlearn_args(pair, out, *extra):
    return ["unlearn", "--model", str(pair / "original"), "--strengthened",
            str(pair / "strengthened"), "--out", str(out), "--forget", "forget10", "--epochs",
            "2", "--batch-size", "8", "--micro-batch-size", "8", "--max-length", "48", "--lr",
            "2e-3", "--save-every", "2", "--no-progress", *extra]


def _error_lines(capsys, command="unlearn"):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith(f"rkld {command}")]


def test_full_disk_during_a_checkpoint_is_one_line_and_recorded(pair, tmp_path, capsys,
                                                               monkeypatch):
    out = tmp_path / "u"
    real_save = torch.save

    def full_disk_at_step_4(obj, f, *args, **kwargs):
        if isinstance(f, Path) and f.parent.name == ".tmp-step-4":
            real_save(obj, f, *args, **kwargs)      # a partial file, as a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_at_step_4)
    assert main(_unlearn_args(pair, out)) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "the disk is full" in errors[0] and ".tmp-step-4" in errors[0]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and "the disk is full" in record["error"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", "step-3"]
    assert not (out / storage.LOCK_FILE).exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert main(_unlearn_args(pair, out, "--resume")) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from_step"] == 3


def test_full_disk_during_the_final_save_then_a_resume_with_nothing_left(pair, tmp_path, capsys,
                                                                        monkeypatch):
    from transformers import PreTrainedModel
    out = tmp_path / "u"
    real = PreTrainedModel.save_pretrained

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    assert main(_unlearn_args(pair, out)) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and f"could not write {out}: the disk is full" in errors[0]
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    # Every step was done: the resume only saves the model. Its report is JSON (no NaN).
    assert main(_unlearn_args(pair, out, "--resume")) == 0
    printed = capsys.readouterr().out
    assert "NaN" not in printed
    report = json.loads(printed, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert report["resumed_from_step"] == 6 and report["tokens_per_s"] is None
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_ctrl_c_is_one_line_and_recorded(pair, tmp_path, capsys, monkeypatch):
    out = tmp_path / "u"

    def ctrl_c_after_5(step, record):
        if step == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        unlearn(_cfg(pair, out), on_step=ctrl_c_after_5)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert not (out / storage.LOCK_FILE).exists()
    # Ctrl-C while a checkpoint is written: its temporary folder is removed.
    real_save = torch.save

    def ctrl_c_in_checkpoint(obj, f, *args, **kwargs):
        if isinstance(f, Path) and f.parent.name == ".tmp-step-6":
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", ctrl_c_in_checkpoint)
    capsys.readouterr()
    assert main(_unlearn_args(pair, out, "--resume")) == 130
    errors = _error_lines(capsys)
    assert errors == [f"rkld unlearn: interrupted (Ctrl-C); continue the run in {out} with "
                      f"--resume"]
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(torch, "save", real_save)
    _, stats = unlearn(_cfg(pair, out, resume=True))
    assert stats["resumed_from_step"] == 4


def test_backend_triton_that_cannot_run_is_refused_before_the_teacher_cache(pair, tmp_path,
                                                                           monkeypatch):
    import rkld_kernels.triton_backend as triton_backend
    monkeypatch.setattr(triton_backend, "interpreter_enabled", lambda: False)
    with pytest.raises(ValueError, match="--backend triton on cpu: .*interpreter is off.*"
                                         "--backend torch"):
        unlearn(_cfg(pair, tmp_path / "u", backend="triton"))
    assert not (tmp_path / "u").exists()


def test_damaged_model_folders_are_named_in_one_line(pair, tmp_path, capsys):
    truncated = _copy_model(pair / "original", tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    header = _copy_model(pair / "strengthened", tmp_path / "header")
    (header / "model.safetensors").write_bytes(b"\x05\x00")
    no_tokenizer = _copy_model(pair / "original", tmp_path / "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    cases = [(truncated, weights, "corrupt or truncated", "model"),
             (header, header / "model.safetensors", "corrupt or truncated", "strengthened"),
             (no_tokenizer, no_tokenizer, "tokenizer files", "model")]
    for damaged, named, what, role in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as caught:
            unlearn(_cfg(pair, tmp_path / "u", **{role: str(damaged)}))
        assert str(named) in str(caught.value) and what in str(caught.value)
        assert main(["eval", "--model", str(damaged), "--out", str(tmp_path / "e"),
                     "--no-generation", "--no-progress"]) == 2
        errors = _error_lines(capsys, "eval")
        assert len(errors) == 1 and str(named) in errors[0] and what in errors[0]
    assert not (tmp_path / "u").exists() and not (tmp_path / "e").exists()


def test_bad_data_files_are_named(tmp_path):
    rows = load_benchmark("synthetic").split("full")
    folder = tmp_path / "tofu"
    folder.mkdir()
    (folder / "full.json").write_bytes(b'[{"question": "Qui est l\xe0?", "answer": "a"}]')
    with pytest.raises(ValueError, match=r"full.json: expected UTF-8 text; byte 0xe0 at offset"):
        load_benchmark(folder)
    broken = [dict(row) for row in rows[:5]]
    del broken[3]["answer"]
    (folder / "full.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"full.json: row 3 lacks 'answer'"):
        load_benchmark(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(ValueError, match=r"corpus.txt: expected UTF-8 text"):
        load_benchmark(corpus)


def test_truncated_reference_is_named(tmp_path):
    from rkld.evaluate import check_reference
    reference = tmp_path / "TOFU_EVAL.json"
    reference.write_text('{"forget_truth_ratio": {"value_by_index": {"0": {"sco')
    with pytest.raises(CorruptFileError, match=f"{reference}: the retain model's log "
                                               r"\(--reference\) is not valid JSON"):
        check_reference(reference, load_benchmark("synthetic"), "forget10")
