"""The output folder of a training run: checks, lock, overwrite, resume, run record, checkpoints.

A run never loses or mixes results:
- ``check_output`` refuses, before any work, an output folder that is, contains or lies inside
  an input, a folder that holds something else, a finished run (without ``overwrite``) and an
  unfinished one (without ``resume`` or ``overwrite``);
- ``RunFolder`` holds the folder for the run's duration: an exclusive lock (``.rkld.lock``),
  the overwritten run kept in ``.replaced/`` until the new one has finished, ``resume``
  refused when a setting or input that shapes the result changed, and ``run.json`` with the
  full configuration, content fingerprints of models and data, and the status (``running``,
  ``finished``, ``failed`` after :class:`TrainingDiverged` or another error, ``interrupted``
  after Ctrl-C);
- ``save_checkpoint`` / ``load_checkpoint`` write ``checkpoints/step-N`` atomically with a
  ``manifest.json`` of checksums (verified on load, over all processes) and name the newest
  in ``checkpoints/latest.json`` (``read_pointer``: missing or unreadable is an error); the
  strategy (:mod:`rkld.strategies`) writes and reads the state itself.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from . import __version__
from .config import RESUMABLE_SETTINGS, RunConfig
from .parallel import DistInfo, barrier, broadcast_object, gather_objects
from .storage import (
    LOCK_FILE,
    CorruptFileError,
    RunLock,
    atomic_torch_save,
    atomic_write_json,
    check_separate,
    fsync_path,
    load_torch,
    local_path,
    read_json,
    sha256_file,
    write_error,
)

RUN_RECORD = "run.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
REPLACED = ".replaced"   # an overwritten run, kept until the run replacing it has finished


class TrainingDiverged(RuntimeError):
    """A loss or gradient norm was not finite: the run stopped before that update was saved."""


# --------------------------------------------------------------------------- output folder

def _run_entries(out: Path) -> list:
    """What the folder holds besides the lock and an overwritten run kept aside."""
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.name not in (LOCK_FILE, REPLACED)]


def check_output(cfg: RunConfig, stage: str, inputs: dict,
                  info: DistInfo | None = None) -> Path:
    """Refuse output folders that would lose or mix results; change nothing on disk.

    Only the main process looks at the folder, and every process raises what it found: the
    processes of one launch reach this point at different times, and one that looked after the
    main process had written this launch's ``run.json`` would take it for an unfinished run."""
    out = Path(cfg.out).expanduser()
    check_separate(out, inputs)
    if info is None:
        _refuse_output(out, cfg, stage)
    else:
        _on_main(info, lambda: _refuse_output(out, cfg, stage))
    return out


def _refuse_output(out: Path, cfg: RunConfig, stage: str) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; expected a folder")
    record = out / RUN_RECORD
    if _run_entries(out):
        if not record.exists():
            raise FileExistsError(f"--out {out} is not empty and holds no rkld run ({RUN_RECORD});"
                                  f" choose a new or empty folder")
        if cfg.overwrite:
            return out
        previous = read_json(record, "the run record")
        if previous.get("status") == "finished":
            raise FileExistsError(f"--out {out} already holds a finished {previous.get('stage')} "
                                  f"run; pass --overwrite to replace it")
        if not cfg.resume:
            raise FileExistsError(f"--out {out} holds an unfinished {previous.get('stage')} run; "
                                  f"pass --resume to continue it or --overwrite to restart")
        if previous.get("stage") != stage:
            raise ValueError(f"--resume: {out} holds a {previous.get('stage')} run, not {stage}")
        read_pointer(out)
    elif cfg.resume:
        raise FileNotFoundError(f"--resume: {out} holds no run to resume; drop --resume to "
                                f"start one")


# Settings that name files or folders. ``out`` is the folder being resumed, wherever it is
# now (a run may be moved); the models are identified by content fingerprints (run.json
# "models"), so another spelling or place of the same files is the same model; ``data`` is
# compared as a resolved path (its splits' content is fingerprinted too).
PATH_SETTINGS = ("out", "model", "strengthened", "data")


def resolved_paths(cfg: RunConfig) -> dict:
    """``{setting: absolute path}`` of the path settings that name a local file or folder."""
    paths = {}
    for name in PATH_SETTINGS:
        path = local_path(getattr(cfg, name, None))
        if path is not None:
            paths[name] = str(path)
    return paths


def _same_path_setting(name: str, old, new, previous: dict) -> bool:
    if old == new:
        return True
    if name == "out":
        return True
    if name in ("model", "strengthened") and (previous.get("models") or {}).get(name):
        return True     # the content fingerprints below decide
    new_path = local_path(new)
    if new_path is None:
        return False    # a name (synthetic, tofu, a hub id) that differs
    recorded = (previous.get("paths") or {}).get(name)
    old_path = Path(recorded) if recorded else local_path(old)
    if old_path is None:
        # Recorded as a path that is gone (the run and its inputs were moved): the content
        # fingerprints decide. A name that is not a path (e.g. synthetic) differs.
        return os.sep in str(old) or str(old).startswith((".", "~"))
    return old_path == new_path or not old_path.exists()


def resume_differences(previous: dict, cfg: RunConfig, data: dict, models: dict) -> list:
    """``name old -> new`` for every setting or input that differs from the recorded run.
    Paths compare as resolved folders (a moved run resumes); models and data by content."""
    old_config = previous.get("config") or {}
    new_config = cfg.to_dict()
    changes = []
    for name in sorted(set(old_config) | set(new_config)):
        old, new = old_config.get(name), new_config.get(name)
        if name in RESUMABLE_SETTINGS or old == new:
            continue
        if name in PATH_SETTINGS and _same_path_setting(name, old, new, previous):
            continue
        changes.append(f"{name} {old!r} -> {new!r}")
    old_data = previous.get("data") or {}
    changes += [f"data split {name} (its content changed)" for name in sorted(set(old_data)
                | set(data)) if old_data.get(name) != data.get(name)]
    old_models = previous.get("models") or {}
    changes += [f"{name} model (its files changed)" if old_models.get(name) else
                f"{name} model (not recorded by the earlier run)"
                for name in sorted(set(old_models) | set(models))
                if old_models.get(name) != models.get(name)]
    return changes


def _on_main(info: DistInfo, work):
    """``work()`` on the main process; an exception there is raised on every process."""
    result, failure = None, None
    if info.is_main:
        try:
            result = work()
        except Exception as err:       # re-raised below, after the other processes know
            failure = err
    if not info.distributed:
        if failure is not None:
            raise failure
        return result
    try:
        shared = broadcast_object(failure, info)
    except Exception:                  # an exception that does not pickle: its message
        shared = broadcast_object(None if failure is None else ValueError(str(failure)), info)
    if failure is not None:
        raise failure
    if shared is not None:     # every process stops with the main process's error
        raise shared
    return result


class RunFolder:
    """The output folder for the duration of a run: locked, prepared, and closed with a status.

    On entry (main process): take the lock; with ``overwrite``, move the old run into
    ``.replaced/``; with ``resume``, refuse any change of what shapes the result and a missing
    or unreadable checkpoint pointer; write ``run.json``. On exit: status ``finished`` (and the
    replaced run deleted) after :meth:`finish`; ``failed`` (with the error) after
    ``TrainingDiverged``, a failed write (a full disk) or another error of the run;
    ``interrupted`` after Ctrl-C; unchanged (``running``) after a foreign exception, as after a
    kill (:func:`run_status`). Every status but ``finished`` can be resumed. The lock is
    released.
    """

    def __init__(self, out: Path, cfg: RunConfig, stage: str, info: DistInfo, data: dict,
                 models: dict):
        self.out, self.cfg, self.stage, self.info = out, cfg, stage, info
        self.data, self.models = data, models
        self.lock = RunLock(out)
        self.pointer = None       # the checkpoint to resume from (checkpoints/latest.json)

    def __enter__(self) -> "RunFolder":
        self.pointer = _on_main(self.info, self._open)
        self.pointer = broadcast_object(self.pointer, self.info)
        return self

    def _open(self):
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            return self._prepare()
        except BaseException:
            self.lock.release()
            raise

    def _prepare(self):
        out, cfg = self.out, self.cfg
        # Checked again under the lock: another run may have changed the folder meanwhile.
        check_output(cfg, self.stage, {})
        record = out / RUN_RECORD
        pointer = None
        if cfg.overwrite and _run_entries(out):
            self._move_aside()
        if cfg.resume:
            previous = read_json(record, "the run record")
            changes = resume_differences(previous, cfg, self.data, self.models)
            if changes:
                raise ValueError(f"--resume: the run in {out} was started with other settings "
                                 f"or inputs: {'; '.join(changes)}. Resume with the original "
                                 f"ones, or start over with --overwrite")
            pointer = read_pointer(out)
            previous.pop("error", None)
            previous.update(status="running", resumed=previous.get("resumed", []) + [_now()])
            # Where the run and its inputs are now (they may have moved or be spelled anew).
            new_config = cfg.to_dict()
            previous.setdefault("config", {}).update(
                {name: new_config[name] for name in PATH_SETTINGS if name in new_config})
            previous["paths"] = resolved_paths(cfg)
            atomic_write_json(record, previous)
        else:
            atomic_write_json(record, {
                "stage": self.stage, "status": "running", "config": cfg.to_dict(),
                "versions": _versions(), "data": self.data, "models": self.models,
                "paths": resolved_paths(cfg),
                "world_size": self.info.world_size, "strategy": self.info.strategy,
                "started": _now()})
        return pointer

    def _move_aside(self) -> None:
        """Keep the run being overwritten in ``.replaced/`` until the new one has finished.
        If an earlier overwrite left one there, that one is the last finished run and stays,
        unless the folder's own run has finished since."""
        replaced = self.out / REPLACED
        if replaced.exists():
            current = read_json(self.out / RUN_RECORD, "the run record") \
                if (self.out / RUN_RECORD).exists() else {}
            if current.get("status") == "finished":
                shutil.rmtree(replaced)
            else:
                for entry in _run_entries(self.out):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                return
        replaced.mkdir()
        for entry in _run_entries(self.out):
            if entry.name != REPLACED:
                os.replace(entry, replaced / entry.name)

    def finish(self, stats: dict) -> None:
        if self.info.is_main:
            record = read_json(self.out / RUN_RECORD, "the run record")
            record.update(status="finished", stats=_json_numbers(stats), finished=_now())
            atomic_write_json(self.out / RUN_RECORD, record)
            shutil.rmtree(self.out / REPLACED, ignore_errors=True)
        barrier(self.info)

    def __exit__(self, kind, error, traceback) -> None:
        if not self.info.is_main:
            return
        try:
            status = run_status(error)
            if status is not None:
                record = read_json(self.out / RUN_RECORD, "the run record")
                record.update(status=status, error=_first_line(error) or status, ended=_now())
                if status == "failed":
                    record["failed"] = record["ended"]
                try:
                    atomic_write_json(self.out / RUN_RECORD, record)
                except OSError:
                    pass    # a full disk: the error being raised already says so
        finally:
            self.lock.release()


def run_status(error) -> str | None:
    """The status a run stopped by ``error`` records: ``interrupted`` after Ctrl-C, ``failed``
    after a non-finite loss, a write that failed (a full disk) or another error of the run
    (OSError, ValueError, RuntimeError); None for any other exception, e.g. one raised by a
    caller's callback: like a process killed outright, the run stays ``running`` and can be
    resumed (so can an interrupted or failed one)."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, (OSError, ValueError, RuntimeError)):
        return "failed"
    return None


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _json_numbers(value):
    """``value`` with non-finite floats (a resumed run with no step left has no loss or
    speed) as None: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_numbers(item) for item in value]
    return value


def _versions() -> dict:
    import tokenizers
    import transformers
    versions = {"rkld": __version__, "python": platform.python_version(),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__}
    try:
        import peft
        versions["peft"] = peft.__version__
    except ImportError:
        pass
    return versions


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


# --------------------------------------------------------------------------- checkpoints

def read_pointer(out: Path) -> dict:
    """``checkpoints/latest.json`` of a run to resume: missing or unreadable is an error."""
    latest = out / CHECKPOINTS / "latest.json"
    if not latest.exists():
        raise FileNotFoundError(f"--resume: {latest} is missing, so there is no checkpoint to "
                                f"continue from (the run stopped before its first one, or the "
                                f"file was deleted); start over with --overwrite")
    pointer = read_json(latest, "the checkpoint pointer")
    if not isinstance(pointer, dict) or not isinstance(pointer.get("step"), int) \
            or not isinstance(pointer.get("dir"), str):
        raise CorruptFileError(f"{latest}: the checkpoint pointer lacks its step or folder; "
                               f"start over with --overwrite")
    if not (out / CHECKPOINTS / pointer["dir"]).is_dir():
        raise FileNotFoundError(f"{out / CHECKPOINTS / pointer['dir']}: the checkpoint that "
                                f"{latest} names is missing; start over with --overwrite")
    return pointer


def _checksums(folder: Path, info: DistInfo, files: list | None = None) -> dict:
    """sha256 of every file under ``folder`` (relative names), shared out over the processes."""
    if files is None:
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                       and p.name != MANIFEST)
    mine = {name: sha256_file(folder / name) for name in files[info.rank::info.world_size]}
    merged = {}
    for part in gather_objects(mine, info):
        merged.update(part)
    return merged


def _verify_checkpoint(folder: Path, info: DistInfo) -> None:
    """Compare the checkpoint's files with its manifest (on every process, which agree)."""
    manifest = read_json(folder / MANIFEST, "the checkpoint's manifest of checksums")
    actual = _checksums(folder, info, sorted(manifest))
    for name, digest in sorted(manifest.items()):
        if actual.get(name) != digest:
            raise CorruptFileError(f"{folder / name}: the checkpoint file does not match the "
                                   f"checksum in {MANIFEST} (corrupt, truncated or altered); "
                                   f"start over with --overwrite")


def save_checkpoint(out: Path, strategy, model, optimizer, step: int,
                     epoch_end: int | None = None, callbacks_pending: bool = False) -> None:
    """Write checkpoints/step-N atomically: into a temporary folder, with a manifest of
    checksums, fsynced and renamed when complete; ``latest.json`` is replaced last, so a crash
    at any point leaves the previous one usable. A write that fails (a full disk) or Ctrl-C
    removes the temporary folder; the error names the checkpoint in one line."""
    tmp = out / CHECKPOINTS / f".tmp-step-{step}"
    try:
        _write_checkpoint(out, tmp, strategy, model, optimizer, step, epoch_end,
                          callbacks_pending)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # torch.save reports a full disk as a RuntimeError ("enforce fail"), safetensors as
        # its own error: both become one OSError line naming the checkpoint.
        if isinstance(err, (OSError, RuntimeError)) and not str(err).startswith("could not "):
            raise write_error(tmp, err) from err
        raise


def _write_checkpoint(out: Path, tmp: Path, strategy, model, optimizer, step: int,
                      epoch_end, callbacks_pending: bool) -> None:
    info = strategy.info
    root = out / CHECKPOINTS
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    strategy.save_state(model, optimizer, tmp)
    atomic_torch_save({"cpu": torch.get_rng_state(),
                       "cuda": torch.cuda.get_rng_state() if info.device.type == "cuda" else None},
                      tmp / f"rng.rank{info.rank}.pt")
    barrier(info)
    checksums = _checksums(tmp, info)
    if info.is_main:
        _fsync_tree(tmp)
        atomic_write_json(tmp / MANIFEST, checksums)
        final = root / f"step-{step}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = {"step": step, "dir": final.name, "strategy": info.strategy,
                   "world_size": info.world_size}
        if epoch_end is not None:
            # Cleared once the epoch-end callbacks have run: a resume redoes them otherwise.
            pointer.update(epoch_end=epoch_end, callbacks_pending=callbacks_pending)
        atomic_write_json(root / "latest.json", pointer)
        for old in root.glob("step-*"):
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
    barrier(info)


def _fsync_tree(folder: Path) -> None:
    """fsync the files a strategy wrote (DeepSpeed and torch.distributed.checkpoint do not)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        fsync_path(path)


def callbacks_done(out: Path, info: DistInfo) -> None:
    if info.is_main:
        latest = out / CHECKPOINTS / "latest.json"
        pointer = read_json(latest, "the checkpoint pointer")
        pointer["callbacks_pending"] = False
        atomic_write_json(latest, pointer)
    barrier(info)


def load_checkpoint(out: Path, pointer: dict, strategy, model, optimizer) -> int:
    """Restore the checkpoint ``pointer`` names, after verifying its checksums; return its
    step."""
    info = strategy.info
    folder = out / CHECKPOINTS / pointer["dir"]
    strategy.check_checkpoint(folder, pointer)
    _verify_checkpoint(folder, info)
    strategy.load_state(model, optimizer, folder, pointer)
    rng_file = folder / f"rng.rank{info.rank}.pt"
    if rng_file.exists():
        rng = load_torch(rng_file, "the checkpoint's random-number state",
                         advice="start over with --overwrite")
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and info.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
    return int(pointer["step"])


def kept_log(log_path: Path, step: int) -> list:
    """The log lines of steps up to ``step`` (a resume redoes the later ones). A line cut off
    by a crash can only be the last one; it is dropped."""
    if not step or not log_path.exists():
        return []
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break
            raise CorruptFileError(f"{log_path}: line {number + 1} is not valid JSON; the log "
                                   f"is corrupt") from None
        if record["step"] <= step:
            kept.append(line)
    return kept


# --------------------------------------------------------------------------- evaluation data

def data_mismatches(model_dir, data: str, data_seed: int, max_authors) -> list:
    """How the data an evaluation uses differs from the data ``model_dir``'s run trained on,
    read from its ``run.json`` (none without one): one line per difference.

    A run recorded before ``data_seed`` existed chose the synthetic benchmark by ``seed``.
    """
    path = Path(str(model_dir)) / RUN_RECORD
    if not path.is_file():
        return []
    try:
        config = json.loads(path.read_text()).get("config") or {}
    except (OSError, ValueError):
        return [f"{path} is unreadable, so the data it was trained on is unknown"]
    lines = []
    recorded = config.get("data")
    if recorded is not None and not _same_data(str(recorded), str(data)):
        lines.append(f"benchmark: the model was trained on --data {recorded}, this evaluation "
                     f"uses {data}")
    synthetic = str(data).startswith("synthetic")
    seed = config.get("data_seed", config.get("seed"))
    if synthetic and seed is not None and seed != data_seed:
        lines.append(f"data seed: the model was trained on synthetic benchmark {seed}, this "
                     f"evaluation uses {data_seed} (pass --data-seed {seed})")
    if "max_authors" in config and config.get("max_authors") != max_authors:
        lines.append(f"authors: the model was trained with --max-authors "
                     f"{config.get('max_authors')}, this evaluation uses {max_authors}")
    return lines


def _same_data(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
