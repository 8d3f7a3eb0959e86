"""Files a run cannot afford to lose or misread: atomic writes, checksums, safe loading, locks.

Every file the pipeline relies on later (run records, checkpoints, teacher caches) is written
to a temporary name next to its destination, flushed and fsynced, renamed over the
destination, and the folder is fsynced too, so that after a crash either the old or the new
file is there, whole. Loading never unpickles code (``torch.load(weights_only=True)``), and a
file that cannot be read is reported in one line naming it and the cause.

Public API:
    atomic_write_text(path, text)          write a text file atomically (fsync file and folder)
    atomic_write_json(path, payload)       the same for JSON (NaN refused)
    atomic_torch_save(obj, path) -> str    torch.save atomically; returns the file's sha256
    sha256_file(path) -> str
    write_error(path, err) -> OSError      a failed write, in one line naming the file (disk full)
    read_json(path, what) -> object        clear errors for missing, empty or corrupt files
    load_torch(path, what, sha256=None, mmap=False)
        torch.load(weights_only=True), checksum verified first when given; a corrupt,
        truncated or altered file raises CorruptFileError naming it
    CorruptFileError                       (a ValueError)
    RunLock(folder)                        an exclusive lock file holding the owner's pid
    locked_output(folder)                  RunLock held for a with block (rkld eval's --out)
    check_separate(out, inputs, what_out)  refuse an output folder that is, contains or lies
                                           inside one of the inputs
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
from pathlib import Path

import torch

LOCK_FILE = ".rkld.lock"


class CorruptFileError(ValueError):
    """A file exists but does not hold what it should (truncated, corrupt, or altered)."""


def fsync_path(path: Path) -> None:
    """fsync a file or a folder, where the filesystem allows it (some do not open folders; a
    rename is atomic all the same)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(path, err: BaseException) -> OSError:
    """An OSError naming the file and the cause, in one line (disk full said as such)."""
    text = str(err)
    no_space = (getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text
                or "unexpected pos" in text)     # how torch's zip writer reports a full disk
    if no_space:
        error = OSError(f"could not write {path}: the disk is full; free some space and run "
                        f"again (with --resume to continue a run)")
        error.errno = errno.ENOSPC
        return error
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    error = OSError(f"could not write {path}: {first}")
    error.errno = getattr(err, "errno", None) or errno.EIO
    return error


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise write_error(path, err) from err
    fsync_path(path.parent)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old file or the new one, whole."""
    _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path, payload, indent: int = 1) -> None:
    """Write JSON atomically. NaN and infinities are refused (they are not JSON)."""
    atomic_write_text(path, json.dumps(payload, indent=indent, allow_nan=False, default=str))


def atomic_torch_save(obj, path) -> str:
    """``torch.save(obj)`` to ``path`` atomically; returns the sha256 of the bytes written."""
    digest = hashlib.sha256()

    class _Hashing:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            digest.update(data)
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    _atomic_write(Path(path), lambda f: torch.save(obj, _Hashing(f)))
    return digest.hexdigest()


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path, what: str):
    """The JSON in ``path``; FileNotFoundError or CorruptFileError naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} is missing") from None
    except OSError as err:
        raise OSError(f"{path}: could not read {what}: {err.strerror or err}") from None
    if not text.strip():
        raise CorruptFileError(f"{path}: {what} is empty (truncated by a crash or a full disk)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{path}: {what} is not valid JSON ({err.msg} at line "
                               f"{err.lineno}); it is corrupt or truncated") from None


def load_torch(path, what: str, sha256: str | None = None, mmap: bool = False,
               advice: str = ""):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code.

    With ``sha256``, the file's checksum is verified first. A missing file raises
    FileNotFoundError; a corrupt, truncated or altered one CorruptFileError; both name the file
    and end with ``advice`` (what the user can do).
    """
    path = Path(path)
    tail = f"; {advice}" if advice else ""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} is missing{tail}")
    if sha256 is not None and sha256_file(path) != sha256:
        raise CorruptFileError(f"{path}: {what} does not match the checksum recorded when it "
                               f"was written (altered, corrupt or truncated){tail}")
    try:
        return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
    except Exception as err:    # zip reader, unpickler: all mean the file is not what it was
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptFileError(f"{path}: {what} is corrupt or truncated ({first[:200]})"
                               f"{tail}") from None


# --------------------------------------------------------------------------- locking

def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on a folder: ``folder/.rkld.lock`` created atomically (O_EXCL),
    holding the owner's pid and host. A lock left by a dead process on this host is taken
    over (with a message); a live owner, or one on another host, is an error."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.held = False

    def acquire(self, log=print) -> "RunLock":
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue        # removed meanwhile, or unreadable and replaced: try again
                pid, host = holder.get("pid"), holder.get("host")
                if host == owner["host"] and isinstance(pid, int) and not _process_alive(pid):
                    log(f"[rkld] taking over the lock {self.path} of process {pid}, which is "
                        f"no longer running")
                    self._remove_if(holder)
                    continue
                raise FileExistsError(
                    f"{self.folder} is in use by process {pid} on {host} (lock {self.path}); "
                    f"wait for that run to end, or remove the lock file if that process is "
                    f"gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            self._owner = owner
            return self
        raise FileExistsError(f"could not take the lock {self.path}: other processes keep "
                              f"creating it")

    def _holder(self):
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            if isinstance(holder, dict):
                return holder
        except json.JSONDecodeError:
            pass
        # Unreadable: a writer died between creating and filling it, or it is being filled.
        return {"pid": None, "host": None, "text": text}

    def _remove_if(self, holder: dict) -> None:
        if self._holder() == holder:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def release(self) -> None:
        if self.held:
            self._remove_if(self._owner)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


@contextlib.contextmanager
def locked_output(folder, enabled: bool = True):
    """Hold :class:`RunLock` on an output folder (created if needed) for the ``with`` block; a
    folder this call created and that is still empty at the end (the work was refused) is
    removed again. ``enabled=False`` (the other processes of a launch) does nothing."""
    if not enabled:
        yield
        return
    folder = Path(str(folder)).expanduser()
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder)
    try:
        lock.acquire()
        yield
    finally:
        lock.release()
        if created:
            remove_if_empty(folder)


def remove_if_empty(folder) -> None:
    """Remove ``folder`` if it holds nothing (e.g. made for work that was then refused)."""
    try:
        Path(folder).rmdir()
    except OSError:
        pass


# --------------------------------------------------------------------------- paths

def local_path(ref) -> Path | None:
    """The resolved path of a local file or folder reference; None for names that are not
    local paths (a hub id, 'synthetic', 'tiny')."""
    if ref is None:
        return None
    path = Path(str(ref)).expanduser()
    if path.exists():
        return path.resolve()
    return None


def check_separate(out, inputs: dict, what_out: str = "--out") -> Path:
    """Refuse an output folder that is, contains or lies inside one of ``inputs``
    (``{description: path or None}``); return the resolved output folder."""
    out_path = Path(str(out)).expanduser().resolve()
    for what, ref in inputs.items():
        path = local_path(ref)
        if path is None:
            continue
        if path == out_path:
            relation = "is"
        elif out_path in path.parents:
            relation = "contains"
        elif path in out_path.parents:
            relation = "lies inside"
        else:
            continue
        raise ValueError(f"{what_out} {out} {relation} {what} ({ref}); writing there could "
                         f"destroy it: choose an output folder apart from every input")
    return out_path
