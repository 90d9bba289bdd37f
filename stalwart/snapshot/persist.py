"""The durable tier: committed snapshots written to disk as safetensors shards + a manifest.

This file owns the on-disk checkpoint format, its atomic write protocol, verified loading,
listing and pruning, and :class:`DurableWriter`, the background thread the snapshot manager
hands committed versions to. Layout under ``root``::

    checkpoints/
      step_<N>/                  one complete checkpoint
        <shard name>.safetensors one per shard: the shard's bytes, verbatim, as tensors
        manifest.json            step, shard names, each file's size and xxh3-64, run_meta
      step_<N>.tmp-<pid>/        a write in progress (or killed): ignored, later removed
      latest                     "step_<N>": the newest complete checkpoint

Atomicity: files are written and fsynced inside ``step_<N>.tmp-<pid>/``, the manifest last;
the directory is fsynced and renamed to ``step_<N>``; only then is ``latest`` replaced
(temp file + fsync + rename). A crash at any point leaves the previous checkpoint and
``latest`` untouched; a checkpoint directory without a manifest is never listed.

Each shard file is a standard safetensors file (``safetensors.safe_open`` loads it): every
layout entry becomes a tensor of its dtype and shape, alignment gaps become ``uint8`` padding
tensors named ``__gap__@<offset>`` so the data section is the shard's bytes exactly. The
shard layout JSON is stored in the header's ``__metadata__`` under ``stalwart.layout``.
Reading back never unpickles anything: JSON headers and raw bytes only.

A shard is given either as ``(buffer, layout)`` or as any object with ``.layout`` and
``.read_into(offset, out: memoryview)`` (e.g. an NVMe-offloaded job streaming its state from
disk); either way it is written in bounded chunks, never copied whole.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import xxhash

CHECKPOINTS_DIRNAME = "checkpoints"
LATEST_FILENAME = "latest"
MANIFEST_FILENAME = "manifest.json"
SHARD_SUFFIX = ".safetensors"
FORMAT_NAME = "stalwart-checkpoint"
FORMAT_VERSION = 1
LAYOUT_METADATA_KEY = "stalwart.layout"
GAP_PREFIX = "__gap__@"

DEFAULT_CHUNK_NBYTES = 8 << 20

_STEP_DIR = re.compile(r"^step_(\d+)$")
# What a writer leaves behind when it dies: temporaries, directories being replaced/deleted.
_LEFTOVER = re.compile(r"^(.+)\.(?:tmp|replaced|deleting)-(\d+)$")

# torch dtype name -> (safetensors dtype, bytes per element)
_SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint64": ("U64", 8),
    "uint32": ("U32", 4),
    "uint16": ("U16", 2),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
}


class CheckpointCorruptError(RuntimeError):
    """A checkpoint on disk does not match its manifest (the message names file and field)."""


@runtime_checkable
class StreamingShard(Protocol):
    """A shard whose bytes are read on demand, e.g. from an NVMe offload store."""

    layout: dict

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the shard's bytes ``[offset, offset + len(out))``."""


Shard = tuple[Any, dict] | StreamingShard


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    path: Path
    run_meta: dict
    shards: dict[str, tuple[np.ndarray, dict]]  # name -> (uint8 array of total_bytes, layout)


# ------------------------------------------------------------------------------------------
# Paths and listing
# ------------------------------------------------------------------------------------------


def checkpoints_dir(root: str | Path) -> Path:
    return Path(root) / CHECKPOINTS_DIRNAME


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return checkpoints_dir(root) / f"step_{step}"


def list_checkpoints(root: str | Path) -> list[int]:
    """Steps of the complete checkpoints (a manifest present), ascending.

    Temporary ``.tmp-`` directories and directories without a manifest are ignored."""
    directory = checkpoints_dir(root)
    if not directory.is_dir():
        return []
    steps = []
    for entry in directory.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / MANIFEST_FILENAME).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def _read_latest_pointer(root: str | Path) -> int | None:
    try:
        text = (checkpoints_dir(root) / LATEST_FILENAME).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    match = _STEP_DIR.match(text)
    return int(match.group(1)) if match else None


def latest_step(root: str | Path) -> int | None:
    """The step ``latest`` points to if that checkpoint is complete, else the newest
    complete checkpoint, else None."""
    complete = list_checkpoints(root)
    pointed = _read_latest_pointer(root)
    if pointed is not None and pointed in complete:
        return pointed
    return complete[-1] if complete else None


def prune_checkpoints(root: str | Path, keep: int) -> list[int]:
    """Delete all but the ``keep`` newest complete checkpoints, never the one ``latest``
    points to, plus temporary directories left by writers that are no longer running.
    Returns the steps deleted."""
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep={keep!r} is invalid: keep at least 1 checkpoint")
    complete = list_checkpoints(root)
    protected = set(complete[-keep:])
    pointed = _read_latest_pointer(root)
    if pointed is not None:
        protected.add(pointed)
    removed = []
    for step in complete:
        if step not in protected:
            _remove_tree(checkpoint_dir(root, step))
            removed.append(step)
    _remove_abandoned_temporaries(root)
    return removed


def _remove_tree(path: Path) -> None:
    # Rename first so a crash halfway through deletion never leaves a half-deleted
    # directory that still looks like a checkpoint.
    doomed = path.with_name(f"{path.name}.deleting-{os.getpid()}")
    try:
        path.rename(doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned_temporaries(root: str | Path) -> None:
    """Remove temporaries of writers that died (assumes one host writes a given root)."""
    directory = checkpoints_dir(root)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and not _process_alive(int(match.group(2))):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


def _validate_name(name: str) -> None:
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name + SHARD_SUFFIX == MANIFEST_FILENAME
        or name == LATEST_FILENAME
    ):
        raise ValueError(
            f"shard name {name!r} is invalid: use a non-empty file name without '/' that "
            f"does not start with '.' (e.g. 'rank00003')"
        )


def _shard_parts(name: str, shard: Shard) -> tuple[dict, memoryview | None, StreamingShard | None]:
    if isinstance(shard, tuple):
        if len(shard) != 2:
            raise ValueError(f"shard {name!r}: expected (buffer, layout), got a {len(shard)}-tuple")
        buffer, layout = shard
        view = memoryview(buffer)
        if not view.c_contiguous:
            raise ValueError(f"shard {name!r}: the buffer must be C-contiguous")
        return layout, view.cast("B") if view.format != "B" or view.ndim != 1 else view, None
    if isinstance(shard, StreamingShard):
        return shard.layout, None, shard
    raise ValueError(
        f"shard {name!r} is a {type(shard).__name__}: pass (buffer, layout) or an object with "
        f".layout and .read_into(offset, memoryview)"
    )


def _safetensors_header(name: str, layout: dict) -> bytes:
    """The safetensors JSON header for a shard, gaps filled with uint8 padding tensors."""
    if not isinstance(layout, dict) or "entries" not in layout or "total_bytes" not in layout:
        raise ValueError(f"shard {name!r}: layout must be a dict with 'entries' and 'total_bytes'")
    total_bytes = layout["total_bytes"]
    if not isinstance(total_bytes, int) or total_bytes < 0:
        raise ValueError(f"shard {name!r}: layout total_bytes={total_bytes!r} must be an int >= 0")
    try:
        layout_json = json.dumps(layout, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"shard {name!r}: layout is not JSON-serialisable: {error}") from None
    header: dict[str, Any] = {
        "__metadata__": {
            LAYOUT_METADATA_KEY: layout_json,
            "format": FORMAT_NAME,
            "shard": name,
        }
    }
    cursor = 0
    entries = sorted(layout["entries"], key=lambda entry: (entry["offset"], entry["nbytes"]))
    for entry in entries:
        entry_name, dtype = entry["name"], entry["dtype"]
        offset, nbytes, shape = entry["offset"], entry["nbytes"], list(entry["shape"])
        if entry_name in header or entry_name.startswith(GAP_PREFIX):
            raise ValueError(f"shard {name!r}: entry name {entry_name!r} is duplicated or reserved")
        if not (isinstance(offset, int) and isinstance(nbytes, int) and offset >= cursor >= 0):
            raise ValueError(
                f"shard {name!r}: entry {entry_name!r} at offset {offset} overlaps the previous "
                f"entry (which ends at {cursor}); entries must not overlap"
            )
        if offset + nbytes > total_bytes:
            raise ValueError(
                f"shard {name!r}: entry {entry_name!r} ends at {offset + nbytes}, beyond "
                f"total_bytes={total_bytes}"
            )
        if offset > cursor:
            header[f"{GAP_PREFIX}{cursor}"] = {
                "dtype": "U8",
                "shape": [offset - cursor],
                "data_offsets": [cursor, offset],
            }
        if dtype in _SAFETENSORS_DTYPES:
            safetensors_dtype, itemsize = _SAFETENSORS_DTYPES[dtype]
            if math.prod(shape) * itemsize != nbytes:
                raise ValueError(
                    f"shard {name!r}: entry {entry_name!r} has nbytes={nbytes} but shape "
                    f"{shape} of {dtype} needs {math.prod(shape) * itemsize}"
                )
        else:
            # Not a safetensors dtype: stored as raw bytes; the layout keeps the real dtype.
            safetensors_dtype, shape = "U8", [nbytes]
        header[entry_name] = {
            "dtype": safetensors_dtype,
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        }
        cursor = offset + nbytes
    if cursor < total_bytes:
        header[f"{GAP_PREFIX}{cursor}"] = {
            "dtype": "U8",
            "shape": [total_bytes - cursor],
            "data_offsets": [cursor, total_bytes],
        }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # The data section starts 8-byte aligned, as safetensors' own writer does.
    encoded += b" " * (-(len(encoded) + 8) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_shard_file(path: Path, name: str, shard: Shard, chunk_nbytes: int) -> dict:
    layout, view, streaming = _shard_parts(name, shard)
    header = _safetensors_header(name, layout)
    total_bytes = layout["total_bytes"]
    if view is not None and len(view) < total_bytes:
        raise ValueError(
            f"shard {name!r}: buffer holds {len(view)} bytes but layout total_bytes={total_bytes}"
        )
    hasher = xxhash.xxh3_64()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, memoryview(header))
        hasher.update(header)
        staging = memoryview(bytearray(min(chunk_nbytes, total_bytes))) if streaming else None
        for start in range(0, total_bytes, chunk_nbytes):
            stop = min(start + chunk_nbytes, total_bytes)
            if streaming is not None:
                piece = staging[: stop - start]
                streaming.read_into(start, piece)
            else:
                piece = view[start:stop]
            hasher.update(piece)
            _write_all(fd, piece)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {
        "file": path.name,
        "nbytes": len(header) + total_bytes,
        "xxh3_64": f"{hasher.intdigest():016x}",
        "total_bytes": total_bytes,
    }


def _write_file_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(temp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def write_checkpoint(
    root: str | Path,
    step: int,
    shards: Mapping[str, Shard],
    run_meta: dict,
    keep: int,
    *,
    chunk_nbytes: int = DEFAULT_CHUNK_NBYTES,
) -> Path:
    """Write ``shards`` as checkpoint ``step`` atomically, point ``latest`` at it, prune to
    ``keep``. Returns the checkpoint directory."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} is invalid: it must be an integer >= 0")
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep={keep!r} is invalid: keep at least 1 checkpoint")
    if chunk_nbytes < 1:
        raise ValueError(f"chunk_nbytes={chunk_nbytes!r} is invalid: it must be >= 1")
    if not shards:
        raise ValueError("shards is empty: a checkpoint needs at least one shard")
    for name in shards:
        _validate_name(name)
    try:
        run_meta_json = json.dumps(run_meta, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"run_meta is not JSON-serialisable ({error}); pass plain JSON data"
        ) from None

    directory = checkpoints_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    temp = directory / f"step_{step}.tmp-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    try:
        files = {}
        for name, shard in shards.items():
            files[name] = _write_shard_file(
                temp / f"{name}{SHARD_SUFFIX}", name, shard, chunk_nbytes
            )
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "step": step,
            "created_unix_s": time.time(),
            "shards": files,
            "run_meta": json.loads(run_meta_json),
        }
        _write_file_atomically(temp / MANIFEST_FILENAME, json.dumps(manifest, indent=1))
        _fsync_dir(temp)
        if final.exists():
            # Rewriting a step (e.g. after resuming from an older one): move the old copy
            # aside, never delete it before the new one is in place.
            aside = directory / f"step_{step}.replaced-{os.getpid()}"
            final.rename(aside)
            temp.rename(final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            temp.rename(final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _write_file_atomically(directory / LATEST_FILENAME, f"step_{step}\n")
    _fsync_dir(directory)
    prune_checkpoints(root, keep)
    return final


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST_FILENAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{manifest_path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointCorruptError(f"{manifest_path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointCorruptError(f"{manifest_path}: not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this build reads {FORMAT_VERSION})"
        )
    if not isinstance(manifest.get("shards"), dict) or not isinstance(manifest.get("step"), int):
        raise CheckpointCorruptError(f"{manifest_path}: 'shards' or 'step' missing or malformed")
    return manifest


def _check_size(path: Path, expected_nbytes: int) -> None:
    try:
        actual_nbytes = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{path}: missing (listed in the manifest)") from None
    if actual_nbytes != expected_nbytes:
        raise CheckpointCorruptError(
            f"{path}: size {actual_nbytes} bytes, manifest says {expected_nbytes} "
            f"({'truncated' if actual_nbytes < expected_nbytes else 'extended'})"
        )


def _read_verified(
    path: Path, expected_nbytes: int, expected_hash: str, chunk_nbytes: int, keep: bool = True
) -> np.ndarray | None:
    """The file's bytes once its size and xxh3-64 match (`keep=False`: only check, through one
    chunk-sized buffer, and return None)."""
    _check_size(path, expected_nbytes)
    data = np.empty(expected_nbytes if keep else min(chunk_nbytes, expected_nbytes), np.uint8)
    view = memoryview(data)
    hasher = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as handle:
        position = 0
        while position < expected_nbytes:
            size = min(chunk_nbytes, expected_nbytes - position)
            window = view[position : position + size] if keep else view[:size]
            count = handle.readinto(window)
            if not count:
                raise CheckpointCorruptError(
                    f"{path}: ended at byte {position} of {expected_nbytes}"
                )
            hasher.update(window[:count])
            position += count
    actual_hash = f"{hasher.intdigest():016x}"
    if actual_hash != expected_hash:
        raise CheckpointCorruptError(
            f"{path}: xxh3-64 {actual_hash} does not match the manifest's {expected_hash}"
        )
    return data if keep else None


def _parse_shard_file(path: Path, data: np.ndarray, total_bytes: int) -> tuple[np.ndarray, dict]:
    if len(data) < 8:
        raise CheckpointCorruptError(f"{path}: too short for a safetensors header")
    (header_nbytes,) = struct.unpack_from("<Q", data, 0)
    if 8 + header_nbytes > len(data):
        raise CheckpointCorruptError(
            f"{path}: safetensors header length {header_nbytes} exceeds the file"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + header_nbytes]))
        layout = json.loads(header["__metadata__"][LAYOUT_METADATA_KEY])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CheckpointCorruptError(
            f"{path}: no readable stalwart layout in the header ({error!r})"
        ) from None
    body = data[8 + header_nbytes :]
    if len(body) != total_bytes or layout.get("total_bytes") != total_bytes:
        raise CheckpointCorruptError(
            f"{path}: data section is {len(body)} bytes, layout says {layout.get('total_bytes')}, "
            f"manifest says {total_bytes}"
        )
    return body, layout


def _shard_record(path: Path, name: str, record: dict) -> tuple[Path, int, str, int]:
    """(file, nbytes, xxh3-64, total_bytes) of one manifest record, checked for shape."""
    try:
        file_path = path / record["file"]
        expected_nbytes, expected_hash = int(record["nbytes"]), str(record["xxh3_64"])
        total_bytes = int(record["total_bytes"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointCorruptError(
            f"{path / MANIFEST_FILENAME}: malformed record for shard {name!r}"
        ) from None
    if file_path.parent != path:
        raise CheckpointCorruptError(
            f"{path / MANIFEST_FILENAME}: shard {name!r} points outside the checkpoint"
        )
    return file_path, expected_nbytes, expected_hash, total_bytes


def verify_checkpoint(
    root: str | Path,
    step: int,
    *,
    chunk_nbytes: int = DEFAULT_CHUNK_NBYTES,
    checksums: bool = True,
) -> None:
    """Check every file of checkpoint ``step`` against its manifest (sizes and xxh3-64),
    streaming through one chunk-sized buffer; raises as :func:`load_checkpoint` does.
    ``checksums=False``: the manifest and every file's presence and size only, without reading
    the data (whoever loads a shard verifies its checksum then)."""
    path = checkpoint_dir(root, step)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    manifest = _read_manifest(path)
    if manifest["step"] != step:
        raise CheckpointCorruptError(
            f"{path / MANIFEST_FILENAME}: says step {manifest['step']}, directory is step {step}"
        )
    for name, record in manifest["shards"].items():
        file_path, nbytes, expected_hash, _ = _shard_record(path, name, record)
        if checksums:
            _read_verified(file_path, nbytes, expected_hash, chunk_nbytes, keep=False)
        else:
            _check_size(file_path, nbytes)


# How often `newest_usable_step` lists again when checkpoints are pruned under it.
_RELIST_ATTEMPTS = 5


def newest_usable_step(
    root: str | Path,
    candidates: list[int] | Callable[[], list[int]] | None = None,
    log=None,
    *,
    checksums: bool = True,
    exclude: Collection[int] = (),
    below: int | None = None,
) -> int | None:
    """The newest of ``candidates`` (default: every complete checkpoint, ``latest`` first) whose
    files all verify; each one that does not is reported through ``log`` and skipped. None when
    none verifies. ``candidates`` may be a function returning the list; steps in ``exclude``
    (found unusable before) are skipped silently, and so are steps at or above ``below`` (a
    caller that needs an older one than a step that failed). ``checksums=False`` checks manifests and file
    sizes only (`verify_checkpoint`), for a caller whose loaders verify the data as they read.

    A writer may finish a newer checkpoint and prune the one being checked meanwhile (its
    directory is gone): the candidates are then listed again, so the newer one is found instead
    of falling back further."""
    for _ in range(_RELIST_ATTEMPTS):
        vanished = False
        for step in _candidate_steps(root, candidates):
            if step in exclude or (below is not None and step >= below):
                continue
            existed = checkpoint_dir(root, step).is_dir()
            try:
                verify_checkpoint(root, step, checksums=checksums)
                return step
            except (CheckpointCorruptError, OSError) as error:
                if existed and not checkpoint_dir(root, step).is_dir():
                    vanished = True  # pruned under us: a newer one was just completed
                    break
                if log is not None:
                    log(f"durable checkpoint of step {step} is unusable ({error}); trying older")
        if not vanished:
            return None
    return None


def _candidate_steps(root: str | Path, candidates) -> list[int]:
    if callable(candidates):
        return list(candidates())
    if candidates is not None:
        return list(candidates)
    steps = sorted(list_checkpoints(root), reverse=True)
    pointed = latest_step(root)
    if pointed is not None:
        steps = [pointed] + [s for s in steps if s != pointed]
    return steps


def load_checkpoint(
    root: str | Path,
    step: int | None = None,
    *,
    names: Sequence[str] | None = None,
    chunk_nbytes: int = DEFAULT_CHUNK_NBYTES,
) -> LoadedCheckpoint:
    """Load checkpoint ``step`` (default: :func:`latest_step`), verifying every file's size
    and xxh3-64 against the manifest before returning anything. ``names`` limits the load to
    those shards (a rank reads only its own).

    Raises ``FileNotFoundError`` when there is no such checkpoint and
    :class:`CheckpointCorruptError` (naming the file and the mismatch) when one does not verify.
    """
    if step is None:
        step = latest_step(root)
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {checkpoints_dir(root)}")
    path = checkpoint_dir(root, step)
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; available steps: {list_checkpoints(root)}"
        )
    manifest = _read_manifest(path)
    if manifest["step"] != step:
        raise CheckpointCorruptError(
            f"{path / MANIFEST_FILENAME}: says step {manifest['step']}, directory is step {step}"
        )
    shards = {}
    wanted = manifest["shards"] if names is None else {n: manifest["shards"].get(n) for n in names}
    for name, record in wanted.items():
        if record is None:
            raise FileNotFoundError(
                f"checkpoint {path} has no shard {name!r}; it has {sorted(manifest['shards'])}"
            )
        file_path, expected_nbytes, expected_hash, total_bytes = _shard_record(path, name, record)
        data = _read_verified(file_path, expected_nbytes, expected_hash, chunk_nbytes)
        shards[name] = _parse_shard_file(file_path, data, total_bytes)
    return LoadedCheckpoint(step, path, manifest.get("run_meta", {}), shards)


def open_checkpoint_streaming(
    root: str | Path, step: int, *, names: Sequence[str], chunk_nbytes: int = DEFAULT_CHUNK_NBYTES
) -> dict[str, StreamingShard]:
    """Shards ``names`` of checkpoint ``step`` as streaming shards, for state larger than host
    memory (an NVMe offload store restores from them): each file's size and xxh3-64 are checked
    against the manifest in one chunked pass that keeps nothing, then ``read_into`` reads the
    requested bytes from the file on demand. Errors as :func:`load_checkpoint`."""
    path = checkpoint_dir(root, step)
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; available steps: {list_checkpoints(root)}"
        )
    manifest = _read_manifest(path)
    shards: dict[str, StreamingShard] = {}
    for name in names:
        record = manifest["shards"].get(name)
        if record is None:
            raise FileNotFoundError(
                f"checkpoint {path} has no shard {name!r}; it has {sorted(manifest['shards'])}"
            )
        file_path = path / str(record.get("file"))
        if file_path.parent != path:
            raise CheckpointCorruptError(
                f"{path / MANIFEST_FILENAME}: shard {name!r} points outside the checkpoint"
            )
        expected_nbytes, total_bytes = int(record["nbytes"]), int(record["total_bytes"])
        hasher = xxhash.xxh3_64()
        chunk = bytearray(min(chunk_nbytes, max(expected_nbytes, 1)))
        size = 0
        with open(file_path, "rb", buffering=0) as handle:
            while count := handle.readinto(chunk):
                hasher.update(memoryview(chunk)[:count])
                size += count
            handle.seek(0)
            head = handle.read(8)
            (header_nbytes,) = struct.unpack("<Q", head) if len(head) == 8 else (expected_nbytes,)
            header_bytes = handle.read(header_nbytes) if 8 + header_nbytes <= size else b""
        actual_hash = f"{hasher.intdigest():016x}"
        if size != expected_nbytes or actual_hash != str(record["xxh3_64"]):
            raise CheckpointCorruptError(
                f"{file_path}: {size} bytes with xxh3-64 {actual_hash}, the manifest says "
                f"{expected_nbytes} bytes with {record['xxh3_64']}"
            )
        try:
            layout = json.loads(json.loads(header_bytes)["__metadata__"][LAYOUT_METADATA_KEY])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise CheckpointCorruptError(
                f"{file_path}: no readable stalwart layout in the header ({error!r})"
            ) from None
        if size - 8 - header_nbytes != total_bytes:
            raise CheckpointCorruptError(
                f"{file_path}: data section is {size - 8 - header_nbytes} bytes, manifest says "
                f"{total_bytes}"
            )

        class _FileShard:
            def __init__(self, file_path: Path, data_offset: int, layout: dict):
                self.layout, self._path, self._data_offset = layout, file_path, data_offset

            def read_into(self, offset: int, out: memoryview) -> None:
                out = memoryview(out).cast("B")
                with open(self._path, "rb", buffering=0) as handle:
                    done = 0
                    while done < len(out):
                        count = os.preadv(
                            handle.fileno(), [out[done:]], self._data_offset + offset + done
                        )
                        if count <= 0:
                            raise CheckpointCorruptError(
                                f"{self._path}: ended before byte {offset + done} of the data"
                            )
                        done += count

        shards[name] = _FileShard(file_path, 8 + header_nbytes, layout)
    return shards


def evict_from_page_cache(root: str | Path, step: int) -> int:
    """Ask the kernel to drop a checkpoint's files from the page cache (cold-read
    benchmarks). Returns how many files were advised; 0 where posix_fadvise is missing."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    count = 0
    for path in checkpoint_dir(root, step).iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            count += 1
        finally:
            os.close(fd)
    return count


# ------------------------------------------------------------------------------------------
# Background writer
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteResult:
    step: int
    path: Path | None
    error: BaseException | None
    duration_s: float
    num_bytes: int

    @property
    def ok(self) -> bool:
        return self.error is None


_STOP = object()


class DurableWriter:
    """Writes checkpoints in a background thread so the caller can hand a version over and
    go on.

    The caller must keep each submitted shard's bytes alive and unchanged until that step's
    :class:`WriteResult` is reported (``on_done``, :meth:`poll`, :meth:`flush`). At most
    ``max_pending`` versions wait in the queue; :meth:`submit` blocks when it is full, or
    returns False at once with ``block=False`` (the caller then skips that version).
    """

    def __init__(
        self,
        root: str | Path,
        keep: int,
        *,
        max_pending: int = 1,
        on_done: Callable[[WriteResult], None] | None = None,
        chunk_nbytes: int = DEFAULT_CHUNK_NBYTES,
    ):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r} is invalid: keep at least 1 checkpoint")
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending={max_pending!r} is invalid: it must be >= 1")
        self.root = Path(root)
        self.keep = keep
        self.chunk_nbytes = chunk_nbytes
        self._on_done = on_done
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._results: list[WriteResult] = []
        self._lock = threading.Condition()
        self._num_submitted = 0
        self._num_finished = 0
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="stalwart-durable-writer", daemon=True
        )
        self._thread.start()

    def submit(
        self,
        step: int,
        shards: Mapping[str, Shard],
        run_meta: dict,
        *,
        block: bool = True,
        timeout_s: float | None = None,
    ) -> bool:
        """Queue checkpoint ``step``; False when the queue stayed full (nothing queued)."""
        if self._closed:
            raise RuntimeError("DurableWriter is closed; create a new one to write more")
        with self._lock:
            self._num_submitted += 1
        try:
            self._queue.put((step, dict(shards), run_meta), block=block, timeout=timeout_s)
        except queue.Full:
            with self._lock:
                self._num_submitted -= 1
            return False
        return True

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            step, shards, run_meta = item
            del item
            started = time.perf_counter()
            try:
                path = write_checkpoint(
                    self.root, step, shards, run_meta, self.keep, chunk_nbytes=self.chunk_nbytes
                )
                num_bytes = sum(
                    int(record["nbytes"])
                    for record in json.loads((path / MANIFEST_FILENAME).read_text())[
                        "shards"
                    ].values()
                )
                result = WriteResult(step, path, None, time.perf_counter() - started, num_bytes)
            except BaseException as error:  # reported, never raised in this thread
                result = WriteResult(step, None, error, time.perf_counter() - started, 0)
            del shards  # release the caller's buffers before reporting
            if self._on_done is not None:
                try:
                    self._on_done(result)
                except Exception:  # a failing callback must not stop the writer
                    pass
            with self._lock:
                self._results.append(result)
                self._num_finished += 1
                self._lock.notify_all()

    def poll(self) -> list[WriteResult]:
        """Results finished since the last poll/flush."""
        with self._lock:
            results, self._results = self._results, []
        return results

    def flush(self, timeout_s: float | None = None) -> list[WriteResult]:
        """Wait until every submitted checkpoint is written (or failed); returns the results
        not yet polled. Raises TimeoutError if writes are still running after ``timeout_s``."""
        with self._lock:
            target = self._num_submitted
            if not self._lock.wait_for(lambda: self._num_finished >= target, timeout_s):
                raise TimeoutError(
                    f"{target - self._num_finished} checkpoint writes still running after {timeout_s}s"
                )
        return self.poll()

    @property
    def num_pending(self) -> int:
        with self._lock:
            return self._num_submitted - self._num_finished

    def close(self, timeout_s: float | None = None) -> list[WriteResult]:
        """Finish queued writes, stop the thread, return the results not yet polled."""
        if self._closed:
            return self.poll()
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"durable writer still busy after {timeout_s}s")
        return self.poll()

    def __enter__(self) -> DurableWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
