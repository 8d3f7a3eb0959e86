"""The teacher cache: frozen teachers' final hidden states at the supervised positions, on disk.

The original and strengthened models are frozen and the forget set is fixed, so their final
hidden states (the input of the lm_head) are computed once, in eval mode, and stored with their
lm_head weights. Unlearning then keeps only the student in memory; the fused-linear loss
rebuilds teacher logits chunk by chunk. This is exact (no dropout in eval mode), not an
approximation: the states are the ones a live teacher would produce for the same tokens.

Layout of a cache folder:
    meta.json                 key (what the states were computed from: the models' content
                              fingerprints, the data, the encoding), teachers, world size, the
                              sha256 of every file, complete flag (written last, so a
                              half-built cache is never used)
    {teacher}.rank{r}.pt      {"indices": example ids, "offsets": row offsets, "hidden": [n, H]}
                              for the examples process r computed (example i on rank i % world);
                              with ``row_lse``, also "lse": [n] float32, the logsumexp of each
                              row's logits (for ``--teacher-boost logprobs``)
    {teacher}.head.pt         {"weight": [V, H], "bias": [V] or None}
    .{teacher}.rank{r}.building   while building only: the file-backed buffer the states are
                              written into batch by batch, removed once the part is saved

Rows are stored in the order ``rkld.models.supervised_positions`` yields them: position t of
an example holds the state that predicts token t + 1 (already shifted to the labels).
Files are memory-mapped on load, so a cache larger than RAM still works. Their checksums are
verified when a cache is opened; a cache whose files do not match is rebuilt, never used.

Public API:
    TeacherCache.build(folder, examples, teachers, key, ...) -> TeacherCache
    TeacherCache.open(folder, key, device) -> TeacherCache | None
        None: absent, stale (another key), incomplete, corrupt or altered (said in one line)
    cache.rows(teacher, indices) -> [n, H] states for those examples, in order
    cache.head(teacher) -> (weight, bias)
    cache.row_lse(teacher, indices, rows) -> [n] logsumexp of those rows' logits (stored when
        the cache was built with ``row_lse``, else computed from ``rows``)
    LiveTeachers: the same interface, running the teacher models on each batch.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .data import collate
from .models import final_hidden, output_head, supervised_positions
from .parallel import DistInfo, barrier, full_shape, full_tensor, gather_objects, shard_frozen
from .storage import (
    CorruptFileError,
    atomic_torch_save,
    atomic_write_json,
    load_torch,
    read_json,
    sha256_file,
)
from .strategies import strategy_for
from .teacher_boost import row_logsumexp

META = "meta.json"
_REBUILD = "delete the teacher_cache folder, or resume, which rebuilds it"


def _file_backed(shape: tuple, dtype: torch.dtype, path: Path) -> torch.Tensor:
    """An uninitialised tensor whose memory is the file ``path`` (created or overwritten):
    its pages are written back to disk and can be dropped from RAM, unlike ``torch.empty``."""
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    path.unlink(missing_ok=True)
    return torch.from_file(str(path), shared=True, size=count, dtype=dtype).view(shape)


def supervised_count(example: dict) -> int:
    """Number of next-token targets an example supervises (rows it has in the cache)."""
    return sum(label != -100 for label in example["labels"][1:])


class TeacherCache:
    def __init__(self, folder: Path, device: torch.device, verify: bool = True):
        """Open a complete cache; with ``verify`` every file's checksum is checked first
        (CorruptFileError naming the file when one does not match)."""
        self.folder = Path(folder)
        self.device = device
        self.meta = read_json(self.folder / META, "the teacher cache's metadata")
        checksums = self.meta.get("files")
        if not isinstance(checksums, dict):
            raise CorruptFileError(f"{self.folder / META}: the teacher cache records no "
                                   f"checksums (written by an older rkld or incomplete); "
                                   f"{_REBUILD}")
        if verify:
            for name, digest in sorted(checksums.items()):
                path = self.folder / name
                if not path.is_file() or sha256_file(path) != digest:
                    raise CorruptFileError(f"{path}: the teacher-cache file is missing or does "
                                           f"not match the checksum in {META}; {_REBUILD}")
        self._where = {}      # teacher -> {example index: (hidden tensor, start, end)}
        self._lse = {}        # teacher -> {example index: (lse tensor, start, end)}, if stored
        self._heads = {}
        for teacher in self.meta["teachers"]:
            table = {}
            for rank in range(self.meta["world_size"]):
                part = load_torch(self.folder / f"{teacher}.rank{rank}.pt",
                                  "a teacher-cache file", mmap=True, advice=_REBUILD)
                offsets = part["offsets"].tolist()
                for j, index in enumerate(part["indices"].tolist()):
                    table[index] = (part["hidden"], offsets[j], offsets[j + 1])
                    if "lse" in part:
                        self._lse.setdefault(teacher, {})[index] = (part["lse"], offsets[j],
                                                                    offsets[j + 1])
            self._where[teacher] = table
            head = load_torch(self.folder / f"{teacher}.head.pt", "a teacher-cache head file",
                              advice=_REBUILD)
            self._heads[teacher] = (head["weight"].to(device),
                                    None if head["bias"] is None else head["bias"].to(device))

    @classmethod
    def open(cls, folder, key: dict, device: torch.device):
        """The cache in ``folder`` if it is complete, was built from ``key`` and its files
        match their checksums; else None (a damaged cache is reported in one line)."""
        meta_path = Path(folder) / META
        if not meta_path.exists():
            return None
        try:
            meta = read_json(meta_path, "the teacher cache's metadata")
            if not meta.get("complete") or meta.get("key") != key:
                return None
            return cls(folder, device)
        except (CorruptFileError, FileNotFoundError) as err:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"[rkld] rebuilding the teacher cache: {err}", flush=True)
            return None

    @classmethod
    def build(cls, folder, examples: list, teachers: dict, key: dict, micro_batch_size: int,
              pad_token_id: int, info: DistInfo, progress: bool = False,
              row_lse: bool = False) -> "TeacherCache":
        """Run each teacher once over ``examples`` and store its states; return the cache.

        ``teachers`` maps a name to a function that loads the model (on ``info.device``);
        teachers are loaded one at a time and freed before the next, so the peak is one model
        (sharded over the processes under FSDP2). Every process computes the examples ``i``
        with ``i % world_size == rank``. ``row_lse`` also stores the logsumexp of every row's
        logits (one pass of the head over the stored states, after the model's).
        """
        folder = Path(folder)
        if info.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / META).unlink(missing_ok=True)
        barrier(info)
        mine = list(range(info.rank, len(examples), info.world_size))
        counts = [supervised_count(examples[i]) for i in mine]
        offsets = [0]
        for count in counts:
            offsets.append(offsets[-1] + count)
        # The same number of batches on every process (sharded teachers need all of them in
        # every forward); a process out of examples runs a throw-away batch.
        n_batches = math.ceil(math.ceil(len(examples) / info.world_size) / micro_batch_size)
        written = {}        # file name -> sha256, of the files this process wrote
        for name, load in teachers.items():
            model = shard_frozen(load(), info)
            model.eval()
            weight, bias = output_head(model)
            # The states go straight to a file-backed buffer as each batch is computed, so a
            # process never holds all its rows in RAM (long documents: tokens x H per teacher).
            scratch = folder / f".{name}.rank{info.rank}.building"
            store = _file_backed((offsets[-1], full_shape(weight)[1]), weight.dtype, scratch)
            batches = range(n_batches)
            if progress and info.is_main:
                from tqdm.auto import tqdm
                batches = tqdm(batches, desc=f"caching {name}", unit="batch")
            # ZeRO-3 gathers parameters into buffers it reuses: no inference-mode tensors there.
            with torch.inference_mode(strategy_for(info).inference_mode), torch.no_grad():
                for b in batches:
                    start = b * micro_batch_size
                    chunk = mine[start:start + micro_batch_size]
                    batch = collate([examples[i] for i in chunk or [0]], pad_token_id)
                    batch = {k: v.to(info.device) for k, v in batch.items()}
                    hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"],
                                          batch.get("position_ids"))
                    if chunk:
                        rows, _ = supervised_positions(hidden, batch["labels"])
                        store[offsets[start]:offsets[start + len(chunk)]] = rows.cpu()
            weight, bias = full_tensor(weight), None if bias is None else full_tensor(bias)
            part = {"indices": torch.tensor(mine, dtype=torch.long),
                    "offsets": torch.tensor(offsets, dtype=torch.long), "hidden": store}
            if row_lse:
                part["lse"] = row_logsumexp(store, weight.detach(),
                                            None if bias is None else bias.detach()).cpu()
            part_name = f"{name}.rank{info.rank}.pt"
            written[part_name] = atomic_torch_save(part, folder / part_name)
            if info.is_main:
                written[f"{name}.head.pt"] = atomic_torch_save(
                    {"weight": weight.detach().cpu().clone(),
                     "bias": None if bias is None else bias.detach().cpu().clone()},
                    folder / f"{name}.head.pt")
            del model, weight, bias, store, part    # frees the teacher (modules hold no cycles)
            scratch.unlink(missing_ok=True)
            if info.device.type == "cuda":
                torch.cuda.empty_cache()
        checksums = {}
        for part in gather_objects(written, info):
            checksums.update(part)
        if info.is_main:
            atomic_write_json(folder / META, {
                "key": key, "teachers": list(teachers), "world_size": info.world_size,
                "examples": len(examples), "files": dict(sorted(checksums.items())),
                "complete": True})
        barrier(info)
        return cls(folder, info.device, verify=False)

    def rows(self, teacher: str, indices: list, batch=None) -> torch.Tensor:
        """The cached states of ``indices`` (example ids), concatenated in that order."""
        table = self._where[teacher]
        parts = [table[i][0][table[i][1]:table[i][2]] for i in indices]
        if len(parts) == 1 and self.device.type == "cpu":
            # A view of the memory-mapped file: the loss reads it one token chunk at a time, so
            # a long document's states are paged in as needed, never copied whole.
            return parts[0]
        return torch.cat(parts).to(self.device, non_blocking=True)

    def head(self, teacher: str):
        return self._heads[teacher]

    def row_lse(self, teacher: str, indices: list, rows: torch.Tensor) -> torch.Tensor:
        """The logsumexp of the logits of ``indices``' rows: stored ones when the cache holds
        them, else computed from ``rows`` (the states of the same examples, in that order)."""
        table = self._lse.get(teacher)
        if table is None:
            return row_logsumexp(rows, *self._heads[teacher])
        parts = [table[i][0][table[i][1]:table[i][2]] for i in indices]
        return torch.cat(parts).to(self.device, non_blocking=True)

    def nbytes(self) -> int:
        """Bytes of the cached states (memory-mapped, not resident) plus the heads (resident)."""
        total = 0
        for table in self._where.values():
            seen = {id(t[0]): t[0] for t in table.values()}
            total += sum(t.numel() * t.element_size() for t in seen.values())
        for weight, bias in self._heads.values():
            total += weight.numel() * weight.element_size()
        return total


class LiveTeachers:
    """Teacher models kept in memory and run on every batch (``--live-teachers``): the same
    interface as TeacherCache, for checking it and for data too large to cache.

    The teachers' lm_head parameters are gathered once here (when FSDP2 or ZeRO-3 shards them),
    so every process must construct it."""

    def __init__(self, models: dict):
        self.models = models
        self._heads = {}
        for name, model in models.items():
            model.eval()
            weight, bias = output_head(model)
            weight, bias = full_tensor(weight), None if bias is None else full_tensor(bias)
            self._heads[name] = (weight.detach(), None if bias is None else bias.detach())

    def rows(self, teacher: str, indices: list, batch: dict) -> torch.Tensor:
        model = self.models[teacher]
        with torch.no_grad():
            hidden = final_hidden(model, batch["input_ids"], batch["attention_mask"],
                                  batch.get("position_ids"))
            rows, _ = supervised_positions(hidden, batch["labels"])
        return rows

    def head(self, teacher: str):
        return self._heads[teacher]

    def row_lse(self, teacher: str, indices: list, rows: torch.Tensor) -> torch.Tensor:
        """The logsumexp of the logits of ``rows`` (computed, one head pass)."""
        return row_logsumexp(rows, *self._heads[teacher])
