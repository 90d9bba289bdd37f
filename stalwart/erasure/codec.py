"""Reed-Solomon coding of byte buffers into checksummed fragments (zfec underneath).

This file owns the fragment format and the two coding APIs built on it:

* **Whole-buffer API** -- ``encode(data, k, n)`` splits ``data`` into ``k`` equal pieces
  (the last one zero-padded) and returns ``n`` self-describing fragments, any ``k`` of
  which give ``data`` back through ``decode(fragments, k, n)``.
* **Stripe API** -- used by :mod:`stalwart.erasure.layout` for cross-node parity.
  ``encode_parity(data_chunks, m)`` computes the ``m`` parity fragments of a stripe of
  ``k`` data chunks without copying the chunks (systematic code: the data chunks stay
  where they are, in the nodes' own shards); ``decode_stripe`` rebuilds missing data
  chunks from any ``k`` of the ``k + m`` stripe members.

Fragment format (little endian, parsed with :mod:`struct`, never pickle)::

    offset size  field
         0    4  magic b"SWEC"
         4    1  version (1)
         5    1  kind: 0 = whole-buffer fragment, 1 = stripe parity fragment
         6    2  k                 number of data pieces
         8    2  n                 total pieces (k + parity)
        10    2  index             this fragment's piece number, 0 <= index < n
        12    2  num_table_entries k for stripe parity fragments, else 0
        14    2  reserved (zero)
        16    8  payload_nbytes    length of the payload
        24    8  original_nbytes   whole-buffer: length of the encoded data before padding;
                                   stripe parity: the stripe's chunk length
        32    8  tag               caller's identity of the buffer / stripe (0 if unused)
        40    8  checksum          xxhash3-64 of payload + bytes [0, 40) + table
        48  16*t table             stripe parity only: per data chunk (nbytes u64, xxh3-64 u64)
         .     .  payload

The checksum covers the header fields too, so a flipped bit anywhere in a fragment -- in
its index, its lengths or its payload -- makes the fragment count as missing (an erasure)
instead of silently decoding to wrong bytes. The payload comes first in the hashed sequence
so the encoder can hash each parity segment while it is still in cache, before the table
(which needs every data chunk's hash) is known. The stripe table records the length and hash
of every data chunk the parity was computed from, so ``decode_stripe`` can verify
surviving data chunks (held as plain bytes in the nodes' shards) and treat a corrupt one
as missing too.
"""

from __future__ import annotations

import functools
import math
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import xxhash
import zfec

FRAGMENT_MAGIC = b"SWEC"
FRAGMENT_VERSION = 1
KIND_WHOLE_BUFFER = 0
KIND_STRIPE_PARITY = 1

_HEADER = struct.Struct("<4sBBHHHH2xQQQ")  # everything except the trailing checksum
_CHECKSUM = struct.Struct("<Q")
_TABLE_ENTRY = struct.Struct("<QQ")
FRAGMENT_HEADER_NBYTES = _HEADER.size + _CHECKSUM.size  # 48
TABLE_ENTRY_NBYTES = _TABLE_ENTRY.size  # 16

# zfec addresses pieces with one byte.
MAX_TOTAL_PIECES = 256

# Parity is computed segment by segment: a segment of every data chunk stays in cache while
# zfec reads it once per parity piece, and each segment's output is copied straight into the
# fragment buffer (no second full-size copy to prepend the header).
DEFAULT_SEGMENT_NBYTES = 256 * 1024

Buffer = bytes | bytearray | memoryview


class ErasureError(Exception):
    """Base class for erasure-coding failures that are not caller mistakes."""


class CorruptFragment(ErasureError):
    """A fragment whose header or checksum does not verify."""


class NotEnoughFragments(ErasureError):
    """Fewer than k valid pieces survive; the data cannot be rebuilt."""

    def __init__(
        self, num_valid: int, num_needed: int, rejected: Sequence[str] = (), where: str = ""
    ):
        self.num_valid = num_valid
        self.num_needed = num_needed
        self.rejected = list(rejected)
        self.where = where
        message = f"only {num_valid} valid fragments, {num_needed} needed to rebuild the data"
        if where:
            message = f"{where}: {message}"
        if self.rejected:
            message += "; rejected: " + "; ".join(self.rejected)
        super().__init__(message)


@dataclass(frozen=True)
class FragmentHeader:
    kind: int
    k: int
    n: int
    index: int
    num_table_entries: int
    payload_nbytes: int
    original_nbytes: int
    tag: int
    checksum: int

    @property
    def payload_offset(self) -> int:
        return FRAGMENT_HEADER_NBYTES + self.num_table_entries * TABLE_ENTRY_NBYTES


def byte_view(buffer: Buffer) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer (numpy arrays included)."""
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous; pass a contiguous copy instead")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _check_k_n(k: int, n: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} is invalid: k (data pieces) must be an integer >= 1")
    if not isinstance(n, int) or n < k or n > MAX_TOTAL_PIECES:
        raise ValueError(
            f"n={n!r} is invalid for k={k}: n (total pieces) must satisfy "
            f"k <= n <= {MAX_TOTAL_PIECES}"
        )


@functools.lru_cache(maxsize=64)
def _encoder(k: int, n: int) -> zfec.Encoder:
    return zfec.Encoder(k, n)


@functools.lru_cache(maxsize=64)
def _decoder(k: int, n: int) -> zfec.Decoder:
    return zfec.Decoder(k, n)


def _pack_header_prefix(
    kind: int,
    k: int,
    n: int,
    index: int,
    num_table_entries: int,
    payload_nbytes: int,
    original_nbytes: int,
    tag: int,
) -> bytes:
    return _HEADER.pack(
        FRAGMENT_MAGIC,
        FRAGMENT_VERSION,
        kind,
        k,
        n,
        index,
        num_table_entries,
        payload_nbytes,
        original_nbytes,
        tag,
    )


def parse_header(fragment: Buffer) -> FragmentHeader:
    """Parse and sanity-check a fragment's header (does not verify the checksum)."""
    view = byte_view(fragment)
    if len(view) < FRAGMENT_HEADER_NBYTES:
        raise CorruptFragment(
            f"fragment of {len(view)} bytes is shorter than the {FRAGMENT_HEADER_NBYTES}-byte header"
        )
    (magic, version, kind, k, n, index, num_table_entries, payload_nbytes, original_nbytes, tag) = (
        _HEADER.unpack_from(view, 0)
    )
    (checksum,) = _CHECKSUM.unpack_from(view, _HEADER.size)
    if magic != FRAGMENT_MAGIC:
        raise CorruptFragment(f"bad magic {bytes(magic)!r}, expected {FRAGMENT_MAGIC!r}")
    if version != FRAGMENT_VERSION:
        raise CorruptFragment(f"unsupported fragment version {version}")
    if kind not in (KIND_WHOLE_BUFFER, KIND_STRIPE_PARITY):
        raise CorruptFragment(f"unknown fragment kind {kind}")
    if not (1 <= k <= n <= MAX_TOTAL_PIECES and index < n):
        raise CorruptFragment(f"inconsistent k={k}, n={n}, index={index}")
    header = FragmentHeader(
        kind, k, n, index, num_table_entries, payload_nbytes, original_nbytes, tag, checksum
    )
    expected_nbytes = header.payload_offset + payload_nbytes
    if len(view) != expected_nbytes:
        raise CorruptFragment(
            f"fragment is {len(view)} bytes but its header describes {expected_nbytes}"
        )
    return header


def verify_fragment(fragment: Buffer) -> FragmentHeader:
    """Parse the header and verify the checksum; raise :class:`CorruptFragment` on mismatch."""
    view = byte_view(fragment)
    header = parse_header(view)
    actual = _checksum(view, header.payload_offset)
    if actual != header.checksum:
        raise CorruptFragment(
            f"checksum mismatch for piece {header.index}: stored {header.checksum:#018x}, "
            f"computed {actual:#018x}"
        )
    return header


def fragment_payload(fragment: Buffer) -> memoryview:
    """Zero-copy view of a fragment's payload (the header must already have been checked)."""
    view = byte_view(fragment)
    header = parse_header(view)
    return view[header.payload_offset :]


def fragment_table(fragment: Buffer) -> list[tuple[int, int]]:
    """The (nbytes, xxh3-64) table of a stripe parity fragment."""
    view = byte_view(fragment)
    header = parse_header(view)
    return [
        _TABLE_ENTRY.unpack_from(view, FRAGMENT_HEADER_NBYTES + i * TABLE_ENTRY_NBYTES)
        for i in range(header.num_table_entries)
    ]


def _checksum(view: memoryview, payload_offset: int, payload_hasher=None) -> int:
    """Fragment checksum: payload, then the header fields, then the table (see format)."""
    if payload_hasher is None:
        payload_hasher = xxhash.xxh3_64()
        payload_hasher.update(view[payload_offset:])
    payload_hasher.update(view[: _HEADER.size])
    payload_hasher.update(view[FRAGMENT_HEADER_NBYTES:payload_offset])
    return payload_hasher.intdigest()


def _finish_fragment(fragment: bytearray, payload_offset: int, payload_hasher=None) -> None:
    """Write the checksum of a fully assembled fragment into its header."""
    checksum = _checksum(memoryview(fragment), payload_offset, payload_hasher)
    _CHECKSUM.pack_into(fragment, _HEADER.size, checksum)


# --------------------------------------------------------------------------------------
# Whole-buffer API
# --------------------------------------------------------------------------------------


def _split_padded(view: memoryview, k: int) -> tuple[list[Buffer], int]:
    """Split into k equal pieces: views of ``view`` except a zero-padded copy of the tail."""
    piece_nbytes = -(-len(view) // k)
    pieces: list[Buffer] = []
    for i in range(k):
        start = i * piece_nbytes
        piece = view[start : start + piece_nbytes]
        if len(piece) < piece_nbytes:
            padded = bytearray(piece_nbytes)
            padded[: len(piece)] = piece
            piece = padded
        pieces.append(piece)
    return pieces, piece_nbytes


def encode(data: Buffer, k: int, n: int, *, tag: int = 0) -> list[bytes]:
    """Encode ``data`` into ``n`` checksummed fragments, any ``k`` of which rebuild it.

    ``tag`` is an optional 64-bit identity stored in every fragment; ``decode(..., tag=...)``
    rejects fragments of another buffer.
    """
    _check_k_n(k, n)
    _check_tag(tag)
    view = byte_view(data)
    pieces, piece_nbytes = _split_padded(view, k)
    blocks = _encoder(k, n).encode(pieces)
    fragments = []
    for index, block in enumerate(blocks):
        fragment = bytearray(FRAGMENT_HEADER_NBYTES + piece_nbytes)
        fragment[: _HEADER.size] = _pack_header_prefix(
            KIND_WHOLE_BUFFER, k, n, index, 0, piece_nbytes, len(view), tag
        )
        fragment[FRAGMENT_HEADER_NBYTES:] = block
        _finish_fragment(fragment, FRAGMENT_HEADER_NBYTES)
        fragments.append(bytes(fragment))
    return fragments


def _check_tag(tag: int | None) -> None:
    if tag is not None and not (isinstance(tag, int) and 0 <= tag < 2**64):
        raise ValueError(f"tag={tag!r} is invalid: it must be an integer in [0, 2**64)")


def decode(fragments: Iterable[Buffer | None], k: int, n: int, *, tag: int | None = None) -> bytes:
    """Rebuild the data from any ``k`` valid fragments produced by :func:`encode`.

    Fragments whose header or checksum fails, that belong to another (k, n) or ``tag``,
    or that duplicate a piece already seen are treated as missing. ``None`` entries are
    allowed (a known-missing fragment). Raises :class:`NotEnoughFragments` naming how many
    were valid and why the others were rejected.
    """
    _check_k_n(k, n)
    _check_tag(tag)
    rejected: list[str] = []
    # Valid fragments grouped by the buffer they describe; a checksum-valid fragment from a
    # different encoding (other length) must not be mixed into the decode.
    by_identity: dict[tuple[int, int, int], dict[int, memoryview]] = {}
    for position, fragment in enumerate(fragments):
        if fragment is None:
            continue
        try:
            header = verify_fragment(fragment)
        except CorruptFragment as error:
            rejected.append(f"fragment #{position}: {error}")
            continue
        if header.kind != KIND_WHOLE_BUFFER or header.k != k or header.n != n:
            rejected.append(
                f"fragment #{position}: kind={header.kind}, k={header.k}, n={header.n} "
                f"but expected whole-buffer fragments with k={k}, n={n}"
            )
            continue
        if tag is not None and header.tag != tag:
            rejected.append(f"fragment #{position}: tag {header.tag} != expected {tag}")
            continue
        identity = (header.payload_nbytes, header.original_nbytes, header.tag)
        pieces = by_identity.setdefault(identity, {})
        pieces.setdefault(header.index, fragment_payload(fragment))
    if not by_identity:
        raise NotEnoughFragments(0, k, rejected)
    identity, pieces = max(by_identity.items(), key=lambda item: len(item[1]))
    if len(pieces) < k:
        raise NotEnoughFragments(len(pieces), k, rejected)
    payload_nbytes, original_nbytes, _ = identity
    if original_nbytes > payload_nbytes * k:
        raise NotEnoughFragments(0, k, rejected + ["headers describe impossible lengths"])
    # Prefer data pieces: decoding with all primaries is a plain concatenation.
    chosen = sorted(pieces)[:k]
    data_pieces = _decoder(k, n).decode([pieces[i] for i in chosen], list(chosen))
    out = bytearray(payload_nbytes * k)
    for i, piece in enumerate(data_pieces):
        out[i * payload_nbytes : (i + 1) * payload_nbytes] = piece
    del out[original_nbytes:]
    return bytes(out)


# --------------------------------------------------------------------------------------
# Stripe API (systematic: data chunks live in the shards, only parity is materialised)
# --------------------------------------------------------------------------------------


def _zero_padded(view: memoryview, length: int) -> Buffer:
    if len(view) == length:
        return view
    padded = bytearray(length)
    padded[: len(view)] = view
    return padded


def encode_parity(
    data_chunks: Sequence[Buffer],
    m: int,
    *,
    tag: int = 0,
    parity_indices: Sequence[int] | None = None,
    num_threads: int = 1,
    segment_nbytes: int = DEFAULT_SEGMENT_NBYTES,
    allocate: Callable[[int], bytearray | memoryview] | None = None,
) -> list[bytearray]:
    """Parity fragments of the stripe formed by ``data_chunks`` (k = len(data_chunks)).

    Data chunks are read in place (zero copy); a chunk shorter than the longest is treated
    as zero-padded to the stripe length (only such short chunks are copied). Each returned
    fragment carries the stripe's table (length and xxh3-64 of every data chunk) so
    :func:`decode_stripe` can verify surviving data chunks. ``parity_indices`` selects
    which of the ``m`` parity pieces to compute (default all, in order). ``num_threads``
    > 1 encodes segments in parallel (zfec releases the GIL). ``allocate(nbytes)`` supplies
    the fragment buffers (every byte is overwritten), so a caller encoding every step can
    recycle them: a fresh gigabyte-sized buffer costs more in page faults than the copy.

    With k = 1 every parity piece of the code equals the data chunk (the systematic code's
    single column is all ones), so the payload is a plain copy and its checksum is the data
    chunk's: byte-identical to zfec's output at memory-copy speed.
    """
    k = len(data_chunks)
    if k < 1:
        raise ValueError("data_chunks is empty: a stripe needs at least one data chunk")
    if not isinstance(m, int) or m < 1 or k + m > MAX_TOTAL_PIECES:
        raise ValueError(
            f"m={m!r} is invalid for k={k}: need m >= 1 and k + m <= {MAX_TOTAL_PIECES}"
        )
    if parity_indices is None:
        parity_indices = list(range(m))
    for parity_index in parity_indices:
        if not (isinstance(parity_index, int) and 0 <= parity_index < m):
            raise ValueError(f"parity_indices contains {parity_index!r}; each must be in [0, {m})")
    if num_threads < 1:
        raise ValueError(f"num_threads={num_threads!r} is invalid: it must be >= 1")
    if segment_nbytes < 1:
        raise ValueError(f"segment_nbytes={segment_nbytes!r} is invalid: it must be >= 1")
    _check_tag(tag)

    views = [byte_view(chunk) for chunk in data_chunks]
    chunk_nbytes = max(len(view) for view in views)
    padded = [_zero_padded(view, chunk_nbytes) for view in views]
    n = k + m
    payload_offset = FRAGMENT_HEADER_NBYTES + k * TABLE_ENTRY_NBYTES
    allocate = allocate or bytearray
    fragments = [allocate(payload_offset + chunk_nbytes) for _ in parity_indices]
    for fragment in fragments:
        if len(fragment) != payload_offset + chunk_nbytes:
            raise ValueError(
                f"allocate returned {len(fragment)} bytes for a fragment of "
                f"{payload_offset + chunk_nbytes}"
            )
    data_hashers = [xxhash.xxh3_64() for _ in views]
    payload_hashers = [xxhash.xxh3_64() for _ in fragments]
    encoder = _encoder(k, n)
    block_numbers = tuple(k + parity_index for parity_index in parity_indices)
    padded_views = [memoryview(chunk) for chunk in padded]
    payload_views = [memoryview(fragment)[payload_offset:] for fragment in fragments]

    def encode_segment(start: int, hash_in_order: bool) -> None:
        stop = min(start + segment_nbytes, chunk_nbytes)
        segments = [view[start:stop] for view in padded_views]
        if k == 1:
            blocks = [segments[0]] * len(block_numbers)
        else:
            blocks = encoder.encode(segments, block_numbers)
        for payload_view, block in zip(payload_views, blocks):
            payload_view[start:stop] = block
        if hash_in_order:
            # Hash while the segment is still in cache; the data hash covers only the
            # chunk's real bytes, not the virtual zero padding.
            for hasher, view in zip(data_hashers, views):
                if start < len(view):
                    hasher.update(view[start:stop])
            if k > 1:
                for hasher, block in zip(payload_hashers, blocks):
                    hasher.update(block)

    starts = range(0, chunk_nbytes, segment_nbytes)
    if num_threads == 1 or len(starts) <= 1:
        for start in starts:
            encode_segment(start, hash_in_order=True)
    else:
        # zfec releases the GIL, so segments encode in parallel; hashes need order, so
        # they are computed afterwards in one pass each.
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            list(pool.map(lambda start: encode_segment(start, hash_in_order=False), starts))
        for hasher, view in zip(data_hashers, views):
            hasher.update(view)
        if k > 1:
            for hasher, payload_view in zip(payload_hashers, payload_views):
                hasher.update(payload_view)
    if k == 1:  # each payload is the data chunk itself: same bytes, same hash
        payload_hashers = [data_hashers[0].copy() for _ in fragments]

    table = b"".join(
        _TABLE_ENTRY.pack(len(view), hasher.intdigest())
        for view, hasher in zip(views, data_hashers)
    )
    for fragment, parity_index, payload_hasher in zip(fragments, parity_indices, payload_hashers):
        fragment[: _HEADER.size] = _pack_header_prefix(
            KIND_STRIPE_PARITY, k, n, k + parity_index, k, chunk_nbytes, chunk_nbytes, tag
        )
        fragment[FRAGMENT_HEADER_NBYTES:payload_offset] = table
        _finish_fragment(fragment, payload_offset, payload_hasher)
    return fragments


def decode_stripe(
    data_chunks: Sequence[Buffer | None],
    parity_fragments: Iterable[Buffer | None],
    *,
    tag: int | None = None,
) -> list[Buffer]:
    """All ``k`` data chunks of a stripe, rebuilding the missing ones from parity.

    ``data_chunks[i]`` is the i-th data chunk as held by its node (unpadded, as given to
    :func:`encode_parity`) or ``None`` when lost. A present chunk whose length or xxh3-64
    differs from the stripe table is treated as lost; so is a parity fragment whose header,
    checksum, ``tag`` or stripe shape does not match. Present, verified chunks are returned
    as given (zero copy); rebuilt ones are ``bytes`` trimmed to their recorded length.
    Raises :class:`NotEnoughFragments` when fewer than k members verify.
    """
    k = len(data_chunks)
    if k < 1:
        raise ValueError("data_chunks is empty: a stripe has at least one data chunk")
    _check_tag(tag)
    rejected: list[str] = []
    parity_by_index: dict[int, memoryview] = {}
    stripe: tuple[int, bytes] | None = None  # (n, table) of the first valid parity fragment
    table_entries: list[tuple[int, int]] = []
    chunk_nbytes = 0
    for position, fragment in enumerate(parity_fragments):
        if fragment is None:
            continue
        try:
            header = verify_fragment(fragment)
        except CorruptFragment as error:
            rejected.append(f"parity fragment #{position}: {error}")
            continue
        if header.kind != KIND_STRIPE_PARITY or header.k != k:
            rejected.append(
                f"parity fragment #{position}: kind={header.kind}, k={header.k}, "
                f"expected a stripe parity fragment with k={k}"
            )
            continue
        if tag is not None and header.tag != tag:
            rejected.append(f"parity fragment #{position}: tag {header.tag} != expected {tag}")
            continue
        view = byte_view(fragment)
        table = bytes(view[FRAGMENT_HEADER_NBYTES : header.payload_offset])
        if stripe is None:
            stripe = (header.n, table)
            table_entries = fragment_table(view)
            chunk_nbytes = header.payload_nbytes
        elif stripe != (header.n, table) or header.payload_nbytes != chunk_nbytes:
            # Checksum-valid but from another version of the stripe: never mix versions.
            rejected.append(f"parity fragment #{position}: describes a different stripe version")
            continue
        parity_by_index.setdefault(header.index, view[header.payload_offset :])

    present: dict[int, memoryview] = {}
    for index, chunk in enumerate(data_chunks):
        if chunk is None:
            continue
        view = byte_view(chunk)
        if stripe is not None:
            expected_nbytes, expected_hash = table_entries[index]
            if len(view) != expected_nbytes:
                rejected.append(
                    f"data chunk {index}: {len(view)} bytes, stripe table says {expected_nbytes}"
                )
                continue
            if xxhash.xxh3_64_intdigest(view) != expected_hash:
                rejected.append(f"data chunk {index}: xxh3-64 differs from the stripe table")
                continue
        present[index] = view

    missing = [index for index in range(k) if index not in present]
    if not missing:
        return [data_chunks[index] for index in range(k)]
    num_valid = len(present) + len(parity_by_index)
    if stripe is None or num_valid < k:
        raise NotEnoughFragments(num_valid, k, rejected)
    n = stripe[0]
    chosen_indices = sorted(present)
    chosen_blocks: list[Buffer] = [_zero_padded(present[i], chunk_nbytes) for i in chosen_indices]
    for parity_block_index in sorted(parity_by_index)[: len(missing)]:
        chosen_indices.append(parity_block_index)
        chosen_blocks.append(parity_by_index[parity_block_index])
    if chunk_nbytes == 0:
        decoded: list[Buffer] = [b""] * k
    else:
        decoded = _decoder(k, n).decode(chosen_blocks, chosen_indices)
    result: list[Buffer] = []
    for index in range(k):
        if index in present:
            result.append(data_chunks[index])
        else:
            real_nbytes = table_entries[index][0]
            block = decoded[index]
            result.append(bytes(block[:real_nbytes]) if real_nbytes != len(block) else block)
    return result


# --------------------------------------------------------------------------------------
# Throughput measurement (called by bench/snapshot.py)
# --------------------------------------------------------------------------------------


def measure_encode_throughput(
    buffers: Sequence[Buffer],
    k: int,
    m: int,
    *,
    num_repeats: int = 3,
    num_threads: int = 1,
) -> dict:
    """Encode throughput of :func:`encode_parity` vs raw ``zfec.Encoder.encode``.

    Each buffer is split into ``k`` chunks (views; the tail chunk zero-padded once, outside
    the timing) and encoded into ``m`` parity pieces both ways, alternately, ``num_repeats``
    times; the best wall time and the best process CPU time of each are kept. Throughput
    is data bytes encoded per second (and per CPU second).
    Raw zfec produces bare parity bytes; our path also hashes every data chunk, writes
    headers and checksums the fragments, which is what the fraction prices.
    """
    _check_k_n(k, k + m)
    if m < 1:
        raise ValueError(f"m={m!r} is invalid: need at least one parity piece")
    if num_repeats < 1:
        raise ValueError(f"num_repeats={num_repeats!r} is invalid: it must be >= 1")
    stripes = [_split_padded(byte_view(buffer), k)[0] for buffer in buffers]
    num_bytes = sum(len(byte_view(buffer)) for buffer in buffers)
    encoder = _encoder(k, k + m)
    parity_numbers = tuple(range(k, k + m))

    def run_ours() -> tuple[float, float]:
        start_s, start_cpu_s = time.perf_counter(), time.process_time()
        for chunks in stripes:
            encode_parity(chunks, m, num_threads=num_threads)
        return time.perf_counter() - start_s, time.process_time() - start_cpu_s

    def run_zfec() -> tuple[float, float]:
        start_s, start_cpu_s = time.perf_counter(), time.process_time()
        for chunks in stripes:
            encoder.encode(chunks, parity_numbers)
        return time.perf_counter() - start_s, time.process_time() - start_cpu_s

    best = {"ours_s": math.inf, "zfec_s": math.inf, "ours_cpu_s": math.inf, "zfec_cpu_s": math.inf}
    for _ in range(num_repeats):
        for name, run in (("zfec", run_zfec), ("ours", run_ours)):
            wall_s, cpu_s = run()
            best[f"{name}_s"] = min(best[f"{name}_s"], wall_s)
            best[f"{name}_cpu_s"] = min(best[f"{name}_cpu_s"], cpu_s)

    def rate(seconds: float) -> float:
        return num_bytes / seconds if seconds > 0 else math.inf

    ours_bytes_per_s, zfec_bytes_per_s = rate(best["ours_s"]), rate(best["zfec_s"])
    ours_bytes_per_cpu_s, zfec_bytes_per_cpu_s = rate(best["ours_cpu_s"]), rate(best["zfec_cpu_s"])
    return {
        "k": k,
        "m": m,
        "num_buffers": len(stripes),
        "num_bytes": num_bytes,
        "num_repeats": num_repeats,
        "num_threads": num_threads,
        **best,
        "ours_bytes_per_s": ours_bytes_per_s,
        "zfec_bytes_per_s": zfec_bytes_per_s,
        "fraction_of_zfec": ours_bytes_per_s / zfec_bytes_per_s,
        # CPU time is less disturbed by other processes on a shared machine than wall time.
        "ours_bytes_per_cpu_s": ours_bytes_per_cpu_s,
        "zfec_bytes_per_cpu_s": zfec_bytes_per_cpu_s,
        "cpu_fraction_of_zfec": ours_bytes_per_cpu_s / zfec_bytes_per_cpu_s,
    }
