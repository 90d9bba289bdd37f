"""A rank's state tree laid out as one contiguous byte region plus JSON metadata (no pickle).

`flatten` splits a nested state (dicts, lists, tensors, JSON scalars) into its tensors and a JSON
skeleton that points at them. `layout_of` places every tensor at a 64-byte aligned offset of one
region; the `Layout` (names, dtypes, shapes, offsets, sizes, plus free-form JSON `extra`, where
the skeleton travels) is the metadata every consumer of a snapshot reads: the snapshot manager,
the erasure code, the durable tier and restore.

Capture is `copy_into` (a byte-exact memcpy, or a D2H copy on a side CUDA stream), integrity is
`checksums` / `verify` (xxhash3-64 per entry), and restore is `unflatten`, whose tensors are views
over the region: the caller's `load_state_dict` copies them into the live tensors, so a restore
costs one copy.

The JSON form of a layout is `{"entries": [{"name", "dtype", "shape", "offset", "nbytes"}, ...],
"total_bytes": int, "extra": {...}}`; dtype names are torch's without the `torch.` prefix
("float32", "bfloat16", "int64", "uint8", "bool", "float8_e4m3fn", ...).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash

ALIGNMENT_BYTES = 64
TENSOR_KEY = "__tensor__"

# Same-sized integer twins: copying through them moves bits, never values, so NaN payloads,
# negative zeros and subnormals survive exactly whatever the floating-point dtype.
_INTEGER_TWIN = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

Buffer = memoryview | np.ndarray | bytearray | bytes


class SnapshotCorruptError(RuntimeError):
    """A snapshot region's bytes do not match the checksums recorded when it was written."""

    def __init__(self, message: str, entry: str | None = None):
        super().__init__(message)
        self.entry = entry


# ---------------------------------------------------------------------------------------------
# Tree <-> (tensors, skeleton)


def flatten(tree: Any) -> tuple[list[tuple[str, torch.Tensor]], Any]:
    """Split a nested state into `[(path, tensor), ...]` and a JSON skeleton.

    Dicts (string keys) and lists/tuples are walked; each tensor is replaced in the skeleton by
    `{"__tensor__": index}`; every other leaf must be a JSON value (None, bool, int, float, str).
    Tuples come back as lists. Paths join keys with "/" (parameter names keep their dots).
    """
    tensors: list[tuple[str, torch.Tensor]] = []

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            if hasattr(node, "to_local") or hasattr(node, "full_tensor"):
                raise ValueError(
                    f"state entry {path!r} is a distributed tensor; pass the rank's local shard "
                    "(tensor.to_local()) so each rank snapshots only what it holds"
                )
            tensors.append((path, node))
            return {TENSOR_KEY: len(tensors) - 1}
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if not isinstance(key, str):
                    raise ValueError(
                        f"state entry {path or '<root>'!r} has key {key!r} of type "
                        f"{type(key).__name__}; snapshot keys must be str (JSON would turn it "
                        "into a string and the restored state would not match)"
                    )
                if key == TENSOR_KEY:
                    raise ValueError(
                        f"state entry {path or '<root>'!r} uses the reserved key {TENSOR_KEY!r}; "
                        "rename it"
                    )
                out[key] = walk(value, f"{path}/{key}" if path else key)
            return out
        if isinstance(node, list | tuple):
            return [
                walk(value, f"{path}/{index}" if path else str(index))
                for index, value in enumerate(node)
            ]
        if node is None or isinstance(node, bool | int | float | str):
            if isinstance(node, int | float) and not isinstance(node, bool):
                # Subclasses (np.float64, IntEnum) become the plain value JSON writes back.
                node = int(node) if isinstance(node, int) else float(node)
            return node
        raise ValueError(
            f"state entry {path or '<root>'!r} is a {type(node).__module__}.{type(node).__name__}, "
            "which a snapshot cannot hold: use a torch.Tensor for arrays and plain "
            "None/bool/int/float/str (or dicts and lists of them) for everything else"
        )

    skeleton = walk(tree, "")
    return tensors, skeleton


def _rebuild(skeleton: Any, tensors: Sequence[torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {TENSOR_KEY}:
            return tensors[skeleton[TENSOR_KEY]]
        return {key: _rebuild(value, tensors) for key, value in skeleton.items()}
    if isinstance(skeleton, list):
        return [_rebuild(value, tensors) for value in skeleton]
    return skeleton


# ---------------------------------------------------------------------------------------------
# Layout


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"layout dtype {name!r} is not a torch dtype name (expected e.g. 'float32', "
            "'bfloat16', 'int64', 'uint8')"
        )
    return dtype


def _align(offset: int) -> int:
    return (offset + ALIGNMENT_BYTES - 1) // ALIGNMENT_BYTES * ALIGNMENT_BYTES


@dataclass(frozen=True)
class LayoutEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }


@dataclass
class Layout:
    """Where each tensor of a rank's state lives in its snapshot region."""

    entries: list[LayoutEntry]
    total_bytes: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "entries": [entry.to_dict() for entry in self.entries],
            "total_bytes": self.total_bytes,
            "extra": self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        try:
            raw_entries = data["entries"]
            total_bytes = int(data["total_bytes"])
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"snapshot layout is missing {error}; expected "
                '{"entries": [...], "total_bytes": int, "extra": {...}}'
            ) from None
        entries = []
        for index, raw in enumerate(raw_entries):
            try:
                entry = LayoutEntry(
                    name=str(raw["name"]),
                    dtype=str(raw["dtype"]),
                    shape=tuple(int(size) for size in raw["shape"]),
                    offset=int(raw["offset"]),
                    nbytes=int(raw["nbytes"]),
                )
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"snapshot layout entry {index} is malformed: {error}") from None
            itemsize = dtype_from_name(entry.dtype).itemsize
            expected_nbytes = math.prod(entry.shape) * itemsize
            if entry.nbytes != expected_nbytes or entry.offset < 0:
                raise ValueError(
                    f"snapshot layout entry {entry.name!r}: nbytes={entry.nbytes} offset="
                    f"{entry.offset} do not fit dtype {entry.dtype} shape {list(entry.shape)} "
                    f"(expected nbytes={expected_nbytes})"
                )
            if entry.offset + entry.nbytes > total_bytes:
                raise ValueError(
                    f"snapshot layout entry {entry.name!r} ends at byte "
                    f"{entry.offset + entry.nbytes}, past total_bytes={total_bytes}"
                )
            entries.append(entry)
        return cls(entries=entries, total_bytes=total_bytes, extra=dict(data.get("extra") or {}))

    @classmethod
    def from_json(cls, text: str | bytes) -> Layout:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"snapshot layout is not valid JSON: {error}") from None
        return cls.from_dict(data)

    @classmethod
    def coerce(cls, layout: Layout | dict | str | bytes) -> Layout:
        if isinstance(layout, Layout):
            return layout
        if isinstance(layout, dict):
            return cls.from_dict(layout)
        return cls.from_json(layout)


def layout_of(tensors: Sequence[tuple[str, torch.Tensor]], extra: dict | None = None) -> Layout:
    """Place each tensor at the next 64-byte aligned offset (cache line, and every dtype's size)."""
    entries = []
    offset = 0
    for name, tensor in tensors:
        offset = _align(offset)
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(
            LayoutEntry(
                name=name,
                dtype=dtype_name(tensor.dtype),
                shape=tuple(tensor.shape),
                offset=offset,
                nbytes=nbytes,
            )
        )
        offset += nbytes
    return Layout(entries=entries, total_bytes=_align(offset), extra=dict(extra or {}))


def layout_tree(
    tree: Any, extra: dict | None = None
) -> tuple[list[tuple[str, torch.Tensor]], Layout]:
    """`flatten` + `layout_of`, with the skeleton stored in `layout.extra["skeleton"]`."""
    tensors, skeleton = flatten(tree)
    return tensors, layout_of(tensors, extra={**(extra or {}), "skeleton": skeleton})


# ---------------------------------------------------------------------------------------------
# Bytes


def _byte_tensor(buffer: Buffer, total_bytes: int) -> torch.Tensor:
    """A uint8 tensor over the caller's buffer (no copy), checked to be large enough."""
    if isinstance(buffer, torch.Tensor):
        byte_view = buffer.view(torch.uint8).reshape(-1)
    elif isinstance(buffer, np.ndarray):
        if buffer.dtype != np.uint8 or buffer.ndim != 1:
            raise ValueError(
                f"snapshot buffer must be a 1-D uint8 array, got dtype {buffer.dtype} shape "
                f"{buffer.shape}"
            )
        byte_view = torch.from_numpy(buffer) if buffer.size else torch.empty(0, dtype=torch.uint8)
    else:
        view = memoryview(buffer).cast("B")
        if len(view) == 0:
            byte_view = torch.empty(0, dtype=torch.uint8)
        else:
            # numpy gives a read-only array for read-only memory; torch warns about it once
            # and shares the memory anyway (writing through it is the caller's bug).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                byte_view = torch.from_numpy(np.frombuffer(view, dtype=np.uint8))
    if byte_view.numel() < total_bytes:
        raise ValueError(
            f"snapshot buffer holds {byte_view.numel()} bytes but the layout needs {total_bytes}; "
            "allocate the region from layout.total_bytes"
        )
    return byte_view


def _region(byte_view: torch.Tensor, entry: LayoutEntry) -> torch.Tensor:
    """The entry's bytes viewed as its dtype and shape (zero copy)."""
    dtype = entry.torch_dtype
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    raw = byte_view[entry.offset : entry.offset + entry.nbytes]
    return raw.view(dtype).view(entry.shape)


def _bit_view(tensor: torch.Tensor) -> torch.Tensor:
    twin = _INTEGER_TWIN.get(tensor.element_size())
    if twin is None or tensor.dtype == twin:
        return tensor
    return tensor.view(twin)


def _matched(tensors, layout: Layout, caller: str) -> list[tuple[torch.Tensor, LayoutEntry]]:
    """(tensor, entry) pairs, each tensor checked against its entry's dtype and shape."""
    if len(tensors) != len(layout.entries):
        raise ValueError(
            f"{caller} got {len(tensors)} tensors for a layout of {len(layout.entries)} entries"
        )
    pairs = []
    for item, entry in zip(tensors, layout.entries):
        tensor = item[1] if isinstance(item, tuple) else item
        if dtype_name(tensor.dtype) != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(
                f"tensor {entry.name!r} is {dtype_name(tensor.dtype)}{list(tensor.shape)} but the "
                f"layout says {entry.dtype}{list(entry.shape)}; recompute the layout"
            )
        pairs.append((tensor, entry))
    return pairs


def copy_into(
    tensors: Sequence[tuple[str, torch.Tensor]] | Sequence[torch.Tensor],
    layout: Layout,
    buffer: Buffer,
    *,
    stream: torch.cuda.Stream | None = None,
    ready_event: torch.cuda.Event | None = None,
    pinned: bool = False,
) -> torch.cuda.Event | None:
    """Copy every tensor into its region of `buffer`, byte for byte.

    CPU tensors: a plain copy (torch releases the GIL while it runs). CUDA tensors: a D2H copy
    enqueued on `stream` after it waits for `ready_event` (recorded where the tensors were
    final) or, without one, for the current stream; non-blocking when `pinned` says the buffer is page-locked
    (`cudaHostRegister`). Returns a CUDA event recorded after the last copy (synchronize it
    before reading the buffer), or None when everything was copied synchronously.
    """
    layout = Layout.coerce(layout)
    byte_view = _byte_tensor(buffer, layout.total_bytes)
    cuda_tensors = []
    for tensor, entry in _matched(tensors, layout, "copy_into"):
        if entry.nbytes == 0:
            continue
        if tensor.is_cuda:
            cuda_tensors.append((tensor, entry))
            continue
        _bit_view(_region(byte_view, entry)).copy_(_bit_view(tensor.detach()))
    if not cuda_tensors:
        return None
    device = cuda_tensors[0][0].device
    stream = stream if stream is not None else torch.cuda.current_stream(device)
    if ready_event is not None:
        stream.wait_event(ready_event)
    else:
        stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for tensor, entry in cuda_tensors:
            _bit_view(_region(byte_view, entry)).copy_(
                _bit_view(tensor.detach()), non_blocking=pinned
            )
        done = torch.cuda.Event()
        done.record(stream)
    return done


# Fused copy + checksum works through an entry in pieces this size: each piece is hashed
# right after it is copied, while it is still in cache, so the snapshot's bytes cross the memory
# bus once for both (a separate checksum pass re-reads the whole region).
FUSED_PIECE_BYTES = 1 << 20


def copy_and_checksum(
    tensors: Sequence[tuple[str, torch.Tensor]] | Sequence[torch.Tensor],
    layout: Layout,
    buffer: Buffer,
    *,
    piece_bytes: int = FUSED_PIECE_BYTES,
) -> list[int]:
    """`copy_into` for CPU tensors that also returns `checksums` of the copied bytes, in one
    pass: the same bytes and the same xxhash3-64 values as the two calls."""
    layout = Layout.coerce(layout)
    byte_view = _byte_tensor(buffer, layout.total_bytes)
    memory = _as_memoryview(byte_view) if byte_view.numel() else memoryview(b"")
    sums = []
    for tensor, entry in _matched(tensors, layout, "copy_and_checksum"):
        tensor = tensor.detach()
        if tensor.is_cuda:
            raise ValueError(f"copy_and_checksum is for CPU tensors; {entry.name!r} is on CUDA")
        hasher = xxhash.xxh3_64()
        if entry.nbytes and tensor.is_contiguous():
            source = tensor.reshape(-1).view(torch.uint8)
            target = byte_view[entry.offset : entry.offset + entry.nbytes]
            for start in range(0, entry.nbytes, piece_bytes):
                stop = min(start + piece_bytes, entry.nbytes)
                target[start:stop].copy_(source[start:stop])
                hasher.update(memory[entry.offset + start : entry.offset + stop])
        elif entry.nbytes:
            _bit_view(_region(byte_view, entry)).copy_(_bit_view(tensor))
            hasher.update(memory[entry.offset : entry.offset + entry.nbytes])
        sums.append(hasher.intdigest())
    return sums


def read_verified(
    layout: Layout | dict | str,
    read_into: Callable[[int, memoryview], None],
    expected: Sequence[int],
    targets: Mapping[str, torch.Tensor] | None = None,
    *,
    piece_bytes: int = FUSED_PIECE_BYTES,
) -> Any:
    """`verify` and `unflatten` in one pass, for restoring into live tensors: each entry is read
    with `read_into(offset, memoryview)` (`shm.RegionReader.read_into` for a region file,
    without mapping it; `buffer_reader` for bytes in memory) 1 MiB at a time straight into its
    contiguous CPU tensor in `targets` (name, dtype and shape matching; the tensors a restore
    copies into anyway, so the consumer's own copy is then a no-op) or else into a new tensor,
    every piece hashed right after it lands. SnapshotCorruptError names the first entry that
    fails; targets written up to then hold bytes of the corrupt snapshot: restore again from
    another copy before using them."""
    layout = Layout.coerce(layout)
    _check_count(layout, expected)
    skeleton = _skeleton(layout, "read_verified")
    targets = targets or {}
    tensors = []
    for entry, want in zip(layout.entries, expected):
        target = targets.get(entry.name)
        if not _fits(target, entry):
            target = torch.empty(entry.shape, dtype=entry.torch_dtype)
        hasher = xxhash.xxh3_64()
        if entry.nbytes:
            destination = memoryview(target.detach().reshape(-1).view(torch.uint8).numpy())
            for start in range(0, entry.nbytes, piece_bytes):
                piece = destination[start : min(start + piece_bytes, entry.nbytes)]
                read_into(entry.offset + start, piece)
                hasher.update(piece)
        _check_entry(entry, hasher.intdigest(), want)
        tensors.append(target)
    return _rebuild(skeleton, tensors)


def buffer_reader(buffer: Buffer, total_bytes: int) -> Callable[[int, memoryview], None]:
    """`read_verified`'s reader over bytes already in memory (a mapped region, an array)."""
    memory = _as_memoryview(_byte_tensor(buffer, total_bytes)) if total_bytes else memoryview(b"")

    def read_into(offset: int, target: memoryview) -> None:
        target[:] = memory[offset : offset + len(target)]

    return read_into


def _fits(target: torch.Tensor | None, entry: LayoutEntry) -> bool:
    """Whether a restore may write `entry` straight into `target`."""
    return (
        target is not None
        and target.device.type == "cpu"
        and target.is_contiguous()
        and dtype_name(target.dtype) == entry.dtype
        and tuple(target.shape) == entry.shape
    )


def _check_count(layout: Layout, expected: Sequence[int]) -> None:
    if len(expected) != len(layout.entries):
        raise SnapshotCorruptError(
            f"snapshot has {len(expected)} checksums for {len(layout.entries)} layout entries"
        )


def _skeleton(layout: Layout, caller: str) -> Any:
    if "skeleton" not in layout.extra:
        raise ValueError(f"{caller} needs layout.extra['skeleton'] (see layout_tree)")
    return layout.extra["skeleton"]


def _check_entry(entry: LayoutEntry, digest: int, want: int) -> None:
    if digest != int(want):
        raise SnapshotCorruptError(
            f"snapshot entry {entry.name!r} (bytes {entry.offset}..{entry.offset + entry.nbytes}) "
            "fails its checksum; the region is corrupt, restore from another copy",
            entry=entry.name,
        )


def _as_memoryview(buffer: Buffer) -> memoryview:
    if isinstance(buffer, torch.Tensor):
        return memoryview(buffer.view(torch.uint8).reshape(-1).numpy())
    return memoryview(buffer).cast("B")


def checksums(layout: Layout | dict | str, buffer: Buffer) -> list[int]:
    """xxhash3-64 of every entry's bytes, in layout order."""
    layout = Layout.coerce(layout)
    view = _as_memoryview(buffer)
    if len(view) < layout.total_bytes:
        raise ValueError(
            f"snapshot buffer holds {len(view)} bytes but the layout needs {layout.total_bytes}"
        )
    return [
        xxhash.xxh3_64_intdigest(view[entry.offset : entry.offset + entry.nbytes])
        for entry in layout.entries
    ]


def verify(layout: Layout | dict | str, buffer: Buffer, expected: Sequence[int]) -> None:
    """Raise `SnapshotCorruptError` naming the first entry whose bytes changed."""
    layout = Layout.coerce(layout)
    if len(expected) != len(layout.entries):
        raise SnapshotCorruptError(
            f"snapshot has {len(expected)} checksums for {len(layout.entries)} layout entries"
        )
    actual = checksums(layout, buffer)
    bad = [entry for entry, want, got in zip(layout.entries, expected, actual) if int(want) != got]
    if bad:
        first = bad[0]
        others = f" (and {len(bad) - 1} more entries)" if len(bad) > 1 else ""
        raise SnapshotCorruptError(
            f"snapshot entry {first.name!r} (bytes {first.offset}..{first.offset + first.nbytes}) "
            f"fails its checksum{others}; the region is corrupt, restore from another copy",
            entry=first.name,
        )


def unflatten(
    layout: Layout | dict | str,
    skeleton: Any,
    buffer: Buffer,
    *,
    materialize: bool = False,
    clone_below_bytes: int = 0,
) -> Any:
    """Rebuild the state tree; tensors are views over `buffer` unless `materialize` clones them.

    `skeleton=None` takes it from `layout.extra["skeleton"]`. Tensors of at most
    `clone_below_bytes` bytes are cloned even without `materialize`: some consumers of small
    tensors ignore a view's storage offset (`torch.set_rng_state` reads from the start of the
    storage), and cloning a few KiB costs nothing.
    """
    layout = Layout.coerce(layout)
    if skeleton is None:
        if "skeleton" not in layout.extra:
            raise ValueError("unflatten needs a skeleton: none given and layout.extra has none")
        skeleton = layout.extra["skeleton"]
    byte_view = _byte_tensor(buffer, layout.total_bytes)
    tensors = [_region(byte_view, entry) for entry in layout.entries]
    tensors = [
        tensor.clone() if materialize or entry.nbytes <= clone_below_bytes else tensor
        for tensor, entry in zip(tensors, layout.entries)
    ]
    return _rebuild(skeleton, tensors)
