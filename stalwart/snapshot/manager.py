"""SnapshotManager: one Ray actor per node that owns the node's snapshot memory.

It is a separate, CPU-only process from the trainers, so a crashed trainer loses nothing that
was committed. For every local rank it owns two shared-memory slots (double buffering); the
trainer's agent copies a new version into the slot that does not hold the newest committed one.

A version's life:
1. each local rank's agent `publish`es it; the manager verifies the checksums;
2. once every local rank is verified, the manager computes the parity fragments it holds for
   its erasure group (pulling the data chunks it needs from peer managers) and tells every
   peer that its part of the version is `ready`, with the ranks' layouts (so any survivor can
   describe a lost node's state);
3. when every position has reported ready, the version is committed here and older versions
   (their parity and the slots' claims) are released. Commit implies that every position has
   its data and parity, so the newest version committed on *any* live manager is complete on
   all of them: that is the version recovery restores.

Every `persist_every`-th committed version is written to the durable tier by the manager at
position 0, in a background thread, while training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from stalwart.erasure.layout import ErasureLayout, compute_parity, rebuild_shard
from stalwart.snapshot import shm
from stalwart.snapshot.state import SnapshotCorruptError
from stalwart.snapshot.state import checksums as compute_checksums

logger = logging.getLogger(__name__)


def _verifies(shard, expected: list[tuple]) -> bool:
    """Whether every rank's bytes in a rebuilt `shard` match its checksums; `expected` holds
    (offset, nbytes, layout, checksums) per rank."""
    view = memoryview(shard)
    return all(
        list(compute_checksums(layout, view[offset : offset + nbytes])) == list(sums)
        for offset, nbytes, layout, sums in expected
    )


@dataclass
class RankVersion:
    slot: int
    layout_json: str
    checksums: list[int]
    total_bytes: int


@dataclass
class VersionState:
    local: dict[int, RankVersion] = field(default_factory=dict)  # rank -> this node's copy
    ready_positions: set[int] = field(default_factory=set)
    rank_meta: dict[int, dict] = field(default_factory=dict)  # every rank's layout, from ready()
    parity: dict[str, memoryview] = field(default_factory=dict)  # views of shm regions
    # Parity held as this node's own copy of the version plus the entries where the data
    # member's copy differs (see `_replica_parity`): key -> {"ranges", "patches", "nbytes"}.
    replicas: dict[str, dict] = field(default_factory=dict)
    failed: str | None = None
    encoded: bool = False


class _PeerShards(Mapping):
    """Node shards of one version, fetched from peer managers on first use."""

    def __init__(self, manager: SnapshotManager, version: int, alive: set[int]):
        self._manager = manager
        self._version = version
        self._alive = alive
        self._cache: dict[int, np.ndarray] = {}
        self._regions: list[shm.Region] = []

    def __getitem__(self, position):
        if position not in self._alive:
            raise KeyError(position)
        if position not in self._cache:
            if position == self._manager.position:
                self._cache[position] = self._manager.node_shard(self._version)
            else:
                self._cache[position] = self._fetch(position)
        return self._cache[position]

    def _fetch(self, position) -> np.ndarray:
        """A peer's shard: mapped straight from its shared memory when it lives on this host
        (no copy through the object store), else transferred as raw bytes."""
        peer = self._manager.peers[position]
        host, pieces = ray.get(peer.shard_regions.remote(self._version))
        if host == socket.gethostname():
            try:
                arrays = []
                for name, nbytes in pieces:
                    region = shm.attach_region(name)
                    self._regions.append(region)
                    arrays.append(region.array[:nbytes])
                return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            except FileNotFoundError:
                pass
        return ray.get(peer.node_shard.remote(self._version))

    def close(self) -> None:
        self._cache.clear()
        for region in self._regions:
            region.close()
        self._regions.clear()

    def __contains__(self, position):
        return position in self._alive

    def __iter__(self):
        return iter(sorted(self._alive))

    def __len__(self):
        return len(self._alive)


class SnapshotManager:
    def __init__(
        self,
        *,
        job_id: str,
        position: int,
        positions: list[int],
        ranks: list[int],
        group_size: int,
        parity: int,
        run_dir: str,
        persist_every: int = 0,
        keep: int = 2,
        num_threads: int = 1,
        wait_timeout_s: float = 60.0,
    ):
        configured = os.environ.get(shm.SHM_DIR_ENV)
        if configured:
            shm.check_dir(configured)  # a typo fails here, not as regions on some other disk
        self.job_id = job_id
        self.position = position
        self.positions = list(positions)
        self.ranks = sorted(ranks)
        self.layout = ErasureLayout(self.positions, group_size, parity)
        self.run_dir = Path(run_dir)
        self.persist_every = persist_every
        self.keep = keep
        self.num_threads = num_threads
        self.wait_timeout_s = wait_timeout_s
        self.incarnation = uuid.uuid4().hex[:8]
        self.abandon_floor = 0
        # Bumped by `resume_at` and `reset`: a wait that began before (for a version of the dead
        # attempt) ends then instead of holding its thread for wait_timeout_s.
        self.epoch = 0
        # Set by the controller while it picks the version to restore (`freeze`): versions
        # still become ready but none commits, so a commit cannot release the version chosen.
        self.frozen = False
        self.regions: dict[int, list[shm.Region]] = {}
        self.slot_versions: dict[tuple[int, int], int | None] = {}
        self.versions: dict[int, VersionState] = {}
        self.committed: int | None = None
        self.peers: dict[int, object] = {}
        self.cond = threading.Condition()
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="snapshot-encode")
        self.durable = None
        self.persist_copies: dict[int, dict[int, tuple[np.ndarray, str]]] = {}
        self.persister = ThreadPoolExecutor(1, thread_name_prefix="snapshot-persist")
        self.events: list[dict] = []
        self.encode_s = 0.0
        # Parity buffers of released versions, by size, for the next version to reuse: a fresh
        # gigabyte buffer every step costs more in page faults than the encode itself.
        # Parity lives in shared-memory regions too, so a rebuild on the same host maps it
        # instead of pulling gigabytes through the object store. `_parity_region` maps a
        # fragment buffer (by id) to the region it views; the pool holds spare regions by size.
        self.parity_pool: dict[int, list[shm.Region]] = {}
        self._parity_region: dict[int, shm.Region] = {}
        self._num_parity_regions = 0
        # A standby's slot pairs reserved ahead of a takeover (`reserve`), by size: fresh
        # gigabytes of shared memory cost more to allocate (zeroing, page tables) than to fill.
        self.reserved: dict[int, list[list[shm.Region]]] = {}
        self._reserving = None  # the Future of the reservation in progress
        self.reserved_ranks: set[int] = set()  # ranks whose slots came from a reservation

    # -- wiring ----------------------------------------------------------------------------

    def set_peers(self, peers: dict[int, object]) -> None:
        self.peers = {int(k): v for k, v in peers.items()}

    def assume_position(self, position: int, positions: list[int], ranks: list[int]) -> None:
        """A standby manager (started on a spare node before any loss) takes a lost position.

        Nothing is allocated before this: slots come with the first `register` or `rebuild`."""
        with self.cond:
            if self.regions or self.versions:
                raise RuntimeError("assume_position is for a standby manager that holds nothing")
            self.position = position
            self.positions = list(positions)
            self.ranks = sorted(ranks)
            self.layout = ErasureLayout(self.positions, self.layout.group_size, self.layout.parity)

    def reserve(self, sizes: list[int]) -> None:
        """On a standby manager: allocate a pair of slots for each of `sizes` (bytes per rank)
        now, in the background, so that taking over a lost position costs a copy instead of
        an allocation. `register` (and so `rebuild`) uses a pair of exactly the right size and
        renames it; the rest is freed once the ranks are registered. A new call replaces the
        reservation."""
        with self.cond:
            if self.position >= 0:
                return  # already serving a position: reservations are for standbys
            previous = self._reserving

        def allocate():
            if previous is not None:
                previous.result()
            wanted = sorted(int(n) for n in sizes if int(n) > 0)
            with self.cond:
                pool = self.reserved
                self.reserved = {}
            held = sum(len(pairs) * 2 * n for n, pairs in pool.items())
            if not shm.can_reserve(2 * sum(wanted) - held):
                logger.warning(
                    "standby manager: not reserving %d bytes of slots, the host would keep less "
                    "than %.0f%% of its memory available; a takeover allocates them instead",
                    2 * sum(wanted),
                    100 * shm.RESERVE_HEADROOM_FRACTION,
                )
                wanted = []
            kept: dict[int, list[list[shm.Region]]] = {}
            try:
                for nbytes in wanted:
                    pairs = pool.get(nbytes)
                    if pairs:
                        kept.setdefault(nbytes, []).append(pairs.pop())
                        continue
                    name = f"stalwart-{self.job_id}-standby-{self.incarnation}-"
                    name += uuid.uuid4().hex[:6]
                    pair = []
                    kept.setdefault(nbytes, []).append(pair)
                    for slot in range(2):
                        pair.append(shm.create_region(f"{name}-s{slot}", nbytes))
            except BaseException:
                _free_pairs(kept)  # a full /dev/shm, say: hold nothing half-made
                raise
            finally:
                _free_pairs(pool)
            with self.cond:
                if self.position >= 0 and self.regions:
                    _free_pairs(kept)  # taken over meanwhile without them
                else:
                    self.reserved = kept

        self._reserving = self.persister.submit(allocate)

    def _await_reservation(self) -> None:
        """Wait for a reservation in progress; call without holding `cond` (it takes it)."""
        reserving = self._reserving
        if reserving is None:
            return
        try:
            reserving.result()
        except Exception as error:  # out of memory, say: allocate on demand instead
            logger.warning("standby slot reservation failed: %r", error)
        if self._reserving is reserving:
            self._reserving = None

    def _take_reserved(self, nbytes: int) -> list[shm.Region] | None:
        """A reserved slot pair of exactly `nbytes`, if one is there."""
        pairs = self.reserved.get(nbytes)
        return pairs.pop() if pairs else None

    def _release_reserved(self) -> None:
        pool, self.reserved = self.reserved, {}
        _free_pairs(pool)

    def ping(self) -> dict:
        return {"position": self.position, "committed": self.committed, "pid": _pid()}

    def shm_info(self) -> dict:
        """What backs this node's regions (`shm.describe_dir`)."""
        return shm.describe_dir()

    def stall(self, seconds: float) -> None:
        """Answer nothing for `seconds` (fault drills): hold the interpreter in a busy loop with
        a switch interval longer than the stall, so no other call of this actor runs, as in a
        manager starved of CPU or stuck page-faulting gigabytes."""
        previous = sys.getswitchinterval()
        sys.setswitchinterval(seconds + 1.0)
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                pass
        finally:
            sys.setswitchinterval(previous)

    def region_prefix(self) -> str:
        return f"stalwart-{self.job_id}-p{self.position}-{self.incarnation}"

    # -- trainer side ----------------------------------------------------------------------

    def register(self, rank: int, total_bytes: int) -> list[str]:
        """Two slots for `rank`, sized for its state; re-registering keeps existing slots."""
        self._await_reservation()
        with self.cond:
            existing = self.regions.get(rank)
            if existing and existing[0].nbytes == total_bytes:
                return [region.name for region in existing]
            if existing and self.committed is not None:
                raise ValueError(
                    f"rank {rank} re-registered with {total_bytes} bytes of state, but its committed "
                    f"snapshot has {existing[0].nbytes}: the model or optimizer shape changed"
                )
            names = [f"{self.region_prefix()}-r{rank}-s{slot}" for slot in range(2)]
            regions = self._take_reserved(total_bytes)
            if regions is not None:
                for region, name in zip(regions, names):
                    region.rename(name)
                self.reserved_ranks.add(rank)
            else:
                regions = [shm.create_region(name, total_bytes) for name in names]
            self.regions[rank] = regions
            if self.reserved and all(r in self.regions for r in self.ranks):
                self._release_reserved()
            for slot in range(2):
                self.slot_versions[(rank, slot)] = None
            return [region.name for region in regions]

    def acquire(self, rank: int, version: int) -> int:
        """The slot `rank` may write `version` into: never the one holding the committed version.

        Waits while the other slot still holds an older version that is being encoded or
        committed (its peers may still be reading it)."""
        deadline = time.monotonic() + self.wait_timeout_s
        with self.cond:
            while True:
                committed_slot = self._slot_of(rank, self.committed)
                slot = 1 - committed_slot if committed_slot is not None else self._free_slot(rank)
                held = self.slot_versions[(rank, slot)]
                in_flight = held is not None and held != version and self._in_flight(held)
                if not in_flight:
                    self.slot_versions[(rank, slot)] = version
                    self.versions.setdefault(version, VersionState())
                    return slot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"rank {rank}: version {held} was not committed within "
                        f"{self.wait_timeout_s:.0f} s; a peer is probably gone"
                    )
                self.cond.wait(min(remaining, 1.0))

    def publish(
        self, rank: int, version: int, slot: int, layout_json: str, checksums: list[int]
    ) -> None:
        """A rank finished copying `version` into `slot`: verify it, encode when the node is complete."""
        # The agent hashed the bytes as they lie in this node's shared memory; hashing them a
        # second time here would only re-read the same memory. Every restore verifies them.
        layout = json.loads(layout_json)
        if len(checksums) != len(layout["entries"]):
            raise SnapshotCorruptError(
                f"rank {rank} version {version}: {len(checksums)} checksums for "
                f"{len(layout['entries'])} entries"
            )
        with self.cond:
            state = self.versions.setdefault(version, VersionState())
            if version < self.abandon_floor:
                state.failed = "abandoned: older than a replaced peer's first version"
            state.local[rank] = RankVersion(
                slot, layout_json, list(checksums), layout["total_bytes"]
            )
            complete = set(state.local) == set(self.ranks)
            self.cond.notify_all()
        if complete and version >= self.abandon_floor:
            self.encoder.submit(self._encode_and_announce, version)

    # -- erasure coding and commit ---------------------------------------------------------

    def node_shard(self, version: int) -> np.ndarray:
        """This node's data for `version`: its ranks' slots, concatenated in rank order.

        A peer encoding its parity may ask before this node's ranks have published the
        version; the call waits for them (bounded by the manager's wait timeout)."""
        state = self._wait_complete(version)
        with self.cond:
            pieces = [
                self.regions[rank][state.local[rank].slot].array[: state.local[rank].total_bytes]
                for rank in self.ranks
            ]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _wait_complete(self, version: int) -> VersionState:
        """`version`'s state once every local rank has published it (bounded wait)."""

        def complete() -> bool:
            state = self.versions.get(version)
            return state is not None and set(state.local) == set(self.ranks)

        def never() -> bool:  # a replacement manager never receives versions below its floor
            return version < self.abandon_floor and not complete()

        with self.cond:
            epoch = self.epoch

            def abandoned() -> bool:  # a recovery restarted the job meanwhile
                return self.epoch != epoch

            if not self.cond.wait_for(
                lambda: complete() or never() or abandoned(), self.wait_timeout_s
            ):
                raise KeyError(
                    f"position {self.position} has no complete copy of version {version}"
                )
            if abandoned():
                # A peer still encoding a version of the dead attempt (waiting for this copy)
                # would otherwise hold its encoder until the timeout, and no new version of
                # the restarted job could commit meanwhile.
                raise KeyError(
                    f"position {self.position}: version {version} belongs to an attempt a "
                    "recovery abandoned"
                )
            if never():
                raise KeyError(
                    f"position {self.position} never received version {version}: it was "
                    f"restarted and its first version is {self.abandon_floor}"
                )
            return self.versions[version]

    def local_meta(self, version: int) -> list[tuple[int, str, list[int], int]]:
        """[(rank, layout json, checksums, bytes)] of this node's copy of `version`, in rank
        order (the node shard's order); waits for the copy like `node_shard`."""
        state = self._wait_complete(version)
        with self.cond:
            return [
                (rank, meta.layout_json, list(meta.checksums), meta.total_bytes)
                for rank, meta in sorted(state.local.items())
            ]

    def shard_ranges(self, version: int, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        """Copies of byte ranges (offset, length) of this node's shard of `version`; a range
        lies inside one rank's part (as `_replica_parity` asks for whole entries)."""
        state = self._wait_complete(version)
        with self.cond:
            bases, base = [], 0
            for rank in self.ranks:
                bases.append((base, rank))
                base += state.local[rank].total_bytes
            pieces = []
            for offset, length in ranges:
                start, rank = max((b, r) for b, r in bases if b <= offset)
                meta = state.local[rank]
                if offset - start + length > meta.total_bytes:
                    raise ValueError(f"range ({offset}, {length}) crosses rank {rank}'s part")
                array = self.regions[rank][meta.slot].array
                pieces.append(array[offset - start : offset - start + length].copy())
            return pieces

    def shard_regions(self, version: int) -> tuple[str, list[tuple[str, int]]]:
        """(host name, [(region name, bytes)] in rank order) of this node's copy of `version`."""
        self.node_shard(version)  # waits until the copy is complete
        with self.cond:
            state = self.versions[version]
            pieces = [
                (self.regions[rank][state.local[rank].slot].name, state.local[rank].total_bytes)
                for rank in self.ranks
            ]
        return socket.gethostname(), pieces

    def _rank_meta(self, state: VersionState) -> dict[int, dict]:
        return {
            rank: {
                "position": self.position,
                "layout_json": meta.layout_json,
                "checksums": meta.checksums,
                "total_bytes": meta.total_bytes,
            }
            for rank, meta in state.local.items()
        }

    def _superseded(self, version: int, state: VersionState) -> bool:
        """`state` is no longer `version`'s: a recovery (`resume_at`, `reset`) dropped it while
        it was encoded, and the same number may already belong to the next attempt."""
        with self.cond:
            if self.versions.get(version) is state:
                return False
            self._recycle(state)  # parity written into it after it was dropped
            return True

    def _encode_and_announce(self, version: int) -> None:
        started = time.perf_counter()
        state = None
        try:
            with self.cond:
                state = self.versions[version]
            self._encode(version, state)
            if self._superseded(version, state):
                return  # the dead attempt's version: announcing it would mix the attempts
            state.encoded = True
            self.encode_s = time.perf_counter() - started
            meta = self._rank_meta(state)
            for position, peer in self.peers.items():
                if position == self.position:
                    continue
                peer.ready.remote(version, self.position, meta)
            self.ready(version, self.position, meta)
        except Exception as error:  # recorded; the version simply never commits
            if state is not None and self._superseded(version, state):
                return  # a dropped version failing says nothing of the next attempt's
            with self.cond:
                self.versions.setdefault(version, VersionState()).failed = repr(error)
                self.events.append({"version": version, "error": repr(error)})
                self.cond.notify_all()

    def _encode(self, version: int, state: VersionState) -> None:
        """The parity this position holds for `version`: replica parity where the data members'
        copies are (mostly) the same bytes as this node's own, else erasure-coded fragments."""
        if not self.layout.protected:
            return
        replicas = self._replica_parity(version, state)
        if replicas is not None:
            state.replicas = replicas
            return
        shards = _PeerShards(self, version, set(self.positions))
        try:
            state.parity = compute_parity(
                self.layout,
                self.position,
                shards,
                version=version,
                num_threads=self.num_threads,
                allocate=self._allocate_parity,
            )
        finally:
            shards.close()

    def _replica_parity(self, version: int, state: VersionState) -> dict[str, dict] | None:
        """Parity of a stripe with one data member (k = 1: the parity piece *is* that member's
        shard) kept as a reference to this node's own copy of the version plus the entries
        where the member's copy differs. Data-parallel replicas hold the same parameters and
        optimizer state, so only their rank-private entries (RNG, data position) differ: the
        holder copies kilobytes instead of the whole shard, and holds no parity buffer.

        The entries compared are those whose checksums differ; equal checksums are taken as
        equal bytes, and a rebuild verifies the result against the member's own checksums, so
        a collision could only make a rebuild fail its check, never restore wrong bytes. The
        reference is safe for the version's lifetime: the slot holding a version is reused
        only after a newer version commits, when this parity is released too. None: not
        applicable (k > 1, different layouts, or mostly different bytes, as FSDP shards)."""
        replicas = {}
        with self.cond:
            mine = [(rank, state.local[rank]) for rank in self.ranks]
        for assignment in self.layout.parity_assignments(self.position):
            if len(assignment.sources) != 1:
                return None
            ((member, _chunk),) = assignment.sources
            theirs = self._call_peer(member, "local_meta", version)
            if len(theirs) != len(mine):
                return None
            ranges, base = [], 0
            for (_, meta), (_, their_layout, their_sums, their_bytes) in zip(mine, theirs):
                if their_bytes != meta.total_bytes:
                    return None
                entries = json.loads(meta.layout_json)["entries"]
                their_entries = json.loads(their_layout)["entries"]
                if [(e["offset"], e["nbytes"]) for e in entries] != [
                    (e["offset"], e["nbytes"]) for e in their_entries
                ]:
                    return None
                for entry, own, other in zip(entries, meta.checksums, their_sums):
                    if own != other and entry["nbytes"]:
                        ranges.append((base + entry["offset"], entry["nbytes"]))
                base += meta.total_bytes
            if 2 * sum(length for _, length in ranges) > base:
                return None
            patches = self._call_peer(member, "shard_ranges", version, ranges) if ranges else []
            replicas[assignment.key] = {"ranges": ranges, "patches": patches, "nbytes": base}
        return replicas

    def replica_parity(self, version: int) -> dict[str, dict]:
        """This position's replica parity of `version` (see `_replica_parity`)."""
        with self.cond:
            state = self.versions.get(version)
            if state is None or not state.encoded:
                raise KeyError(f"position {self.position} holds no parity for version {version}")
            return dict(state.replicas)

    def ready(self, version: int, position: int, rank_meta: dict) -> None:
        with self.cond:
            state = self.versions.setdefault(version, VersionState())
            state.ready_positions.add(position)
            state.rank_meta.update({int(rank): meta for rank, meta in rank_meta.items()})
            if (
                not self.frozen
                and state.ready_positions >= set(self.positions)
                and (self.committed is None or version > self.committed)
            ):
                self._commit(version)

    def _commit(self, version: int) -> None:
        self.committed = version
        for old in [v for v in self.versions if v < version]:
            self._recycle(self.versions.pop(old))
        for key, held in self.slot_versions.items():
            if held is not None and held < version:
                self.slot_versions[key] = None
        self.cond.notify_all()
        if self.persist_every and version % self.persist_every == 0:
            # Copy out now: the slots are reused once a newer version commits, long before a
            # slow disk write of this one could finish.
            state = self.versions[version]
            self.persist_copies[version] = {
                rank: (
                    self.regions[rank][meta.slot].array[: meta.total_bytes].copy(),
                    meta.layout_json,
                )
                for rank, meta in state.local.items()
            }
            for old in [v for v in self.persist_copies if v < version]:
                del self.persist_copies[old]
            if self.position == 0:
                self.persister.submit(self._persist, version, dict(state.rank_meta))

    def _parity_fragments_per_version(self) -> int:
        return max(1, len(self.layout.parity_assignments(self.position)))

    def _allocate_parity(self, nbytes: int) -> memoryview:
        with self.cond:
            pool = self.parity_pool.get(nbytes)
            if pool:
                region = pool.pop()
            else:
                self._num_parity_regions += 1
                region = shm.create_region(
                    f"{self.region_prefix()}-parity{self._num_parity_regions}", nbytes
                )
            self._parity_region[id(region.buffer)] = region
            return region.buffer

    def _recycle(self, state: VersionState) -> None:
        """Keep a released version's parity regions for the next version to encode into.

        At most one spare per fragment this position holds: the committed version and the one
        being encoded are all that is ever live, so a deeper pool would only hold memory.
        """
        for fragment in state.parity.values():
            region = self._parity_region.pop(id(fragment), None)
            if region is None:
                continue
            pool = self.parity_pool.setdefault(region.nbytes, [])
            if len(pool) < self._parity_fragments_per_version():
                pool.append(region)
            else:
                region.close()
                region.unlink()
        state.parity = {}
        state.replicas = {}

    def _in_flight(self, version: int) -> bool:
        state = self.versions.get(version)
        return (
            state is not None
            and state.failed is None
            and (self.committed is None or version > self.committed)
        )

    def _slot_of(self, rank: int, version: int | None) -> int | None:
        if version is None:
            return None
        for slot in range(2):
            if self.slot_versions.get((rank, slot)) == version:
                return slot
        state = self.versions.get(version)
        if state is not None and rank in state.local:
            return state.local[rank].slot
        return None

    def _free_slot(self, rank: int) -> int:
        for slot in range(2):
            if self.slot_versions[(rank, slot)] is None:
                return slot
        held = [self.slot_versions[(rank, slot)] for slot in range(2)]
        return int(np.argmin(held))

    def abandon_below(self, floor: int) -> None:
        """Versions older than `floor` can never commit: a replaced manager (this one, or a
        peer) never receives them. Waiters for them (`node_shard`, `acquire`) wake up now."""
        with self.cond:
            self.abandon_floor = max(self.abandon_floor, floor)
            for version, state in self.versions.items():
                if version < floor and (self.committed is None or version > self.committed):
                    state.failed = "abandoned: older than a replaced peer's first version"
            self.cond.notify_all()

    def freeze(self) -> dict:
        """Commit nothing until `resume_at`; returns the status. A recovery reads the committed
        versions after freezing every manager, so none of them moves on (releasing the version
        the controller is about to restore) while it decides."""
        with self.cond:
            self.frozen = True
        return self.status()

    def resume_at(self, version: int) -> None:
        """The job restarts after `version`: versions above it that never committed belong to
        the dead attempt (they will be published afresh), and no floor applies any more.
        `version` itself commits here if a frozen commit held it back (the controller chose
        it because another manager had committed it, so every position was ready)."""
        with self.cond:
            self.frozen = False
            self.abandon_floor = 0
            self.epoch += 1
            if (
                version in self.versions
                and (self.committed is None or version > self.committed)
                and set(self.versions[version].local) >= set(self.ranks)
            ):
                self._commit(version)
            stale = [
                v
                for v in self.versions
                if v > version and (self.committed is None or v > self.committed)
            ]
            for v in stale:
                self._recycle(self.versions.pop(v))
            for key, held in self.slot_versions.items():
                if held in stale:
                    self.slot_versions[key] = None
            self.cond.notify_all()

    def reset(self) -> None:
        """Forget every version (the job restarts from the durable tier at an older step)."""
        with self.cond:
            self.epoch += 1
            for state in self.versions.values():
                self._recycle(state)
            self.versions.clear()
            self.committed = None
            for key in self.slot_versions:
                self.slot_versions[key] = None
            self.cond.notify_all()

    # -- queries for recovery --------------------------------------------------------------

    def status(self) -> dict:
        with self.cond:
            return {
                "position": self.position,
                "committed": self.committed,
                "versions": sorted(self.versions),
                "events": list(self.events),
                "encode_s": self.encode_s,
            }

    def slot_sizes(self) -> dict[int, int]:
        """Bytes of each local rank's slots (what a standby reserves to take this place)."""
        with self.cond:
            return {rank: regions[0].nbytes for rank, regions in self.regions.items()}

    def version_meta(self, version: int) -> dict[int, dict]:
        """Every rank's layout for a committed (or locally complete) version."""
        with self.cond:
            state = self.versions.get(version)
            if state is None:
                raise KeyError(f"position {self.position} holds no metadata for version {version}")
            meta = dict(state.rank_meta)
            meta.update(self._rank_meta(state))
            return meta

    def slot_for(self, rank: int, version: int) -> tuple[str, str, list[int]]:
        """(region name, layout json, checksums) of `rank`'s copy of `version` on this node."""
        with self.cond:
            state = self.versions.get(version)
            if state is None or rank not in state.local:
                raise KeyError(
                    f"position {self.position} holds no copy of rank {rank} version {version}"
                )
            meta = state.local[rank]
            return self.regions[rank][meta.slot].name, meta.layout_json, meta.checksums

    def parity_fragments(self, version: int) -> dict[str, np.ndarray]:
        """This position's parity of `version` as raw bytes (for a peer on another host)."""
        with self.cond:
            state = self.versions.get(version)
            if state is None or not state.encoded:
                raise KeyError(f"position {self.position} holds no parity for version {version}")
            return {
                key: np.frombuffer(fragment, np.uint8) for key, fragment in state.parity.items()
            }

    def parity_regions(self, version: int) -> tuple[str, dict[str, tuple[str, int]]]:
        """(host name, {key: (region name, bytes)}) of this position's parity of `version`."""
        with self.cond:
            state = self.versions.get(version)
            if state is None or not state.encoded:
                raise KeyError(f"position {self.position} holds no parity for version {version}")
            regions = {}
            for key, fragment in state.parity.items():
                region = self._parity_region.get(id(fragment))
                if region is None:
                    return socket.gethostname(), {}
                regions[key] = (region.name, len(fragment))
            return socket.gethostname(), regions

    def rank_shard(self, rank: int, version: int) -> np.ndarray:
        with self.cond:
            meta = self.versions[version].local[rank]
            return self.regions[rank][meta.slot].array[: meta.total_bytes]

    def corrupt(self, rank: int, version: int, offset: int = 0) -> None:
        """Fault injection: flip one byte of a rank's copy of a version in memory."""
        with self.cond:
            meta = self.versions[version].local[rank]
            array = self.regions[rank][meta.slot].array
            array[offset % meta.total_bytes] ^= 0xFF

    def verify_version(self, version: int) -> bool:
        """Whether every local rank's copy of `version` still matches its checksums."""
        return all(self.verify(rank, version) for rank in self.ranks)

    def verify(self, rank: int, version: int) -> bool:
        with self.cond:
            meta = self.versions[version].local[rank]
            buffer = self.regions[rank][meta.slot].buffer
        return list(compute_checksums(json.loads(meta.layout_json), buffer)) == meta.checksums

    # -- rebuilding a lost node --------------------------------------------------------------

    def _surviving_parity(self, version: int, alive: set[int]) -> tuple[dict, list[shm.Region]]:
        """Every live peer's parity of `version`: mapped from its shared memory on this host,
        else transferred as raw bytes. A peer without parity only narrows the choice."""
        fragments: dict = {}
        attached: list[shm.Region] = []
        for position in alive:
            peer = self.peers[position]
            try:
                host, regions = ray.get(peer.parity_regions.remote(version))
                if host == socket.gethostname() and regions:
                    for key, (name, nbytes) in regions.items():
                        region = shm.attach_region(name)
                        attached.append(region)
                        fragments[key] = region.array[:nbytes]
                    continue
                fragments.update(ray.get(peer.parity_fragments.remote(version)))
            except Exception:
                continue
        return fragments, attached

    def _rebuild_from_replica(
        self, version: int, alive: set[int], shard_nbytes: int, out, expected: list[tuple]
    ) -> memoryview | bytearray | None:
        """This position's shard from a survivor's replica parity of it: the survivor's own
        copy with the differing entries patched in, verified against `expected` ((offset,
        nbytes, layout, checksums) per rank). A holder whose copy does not verify (corrupted in
        its memory) is passed over for the next one. None when no survivor holds a replica;
        SnapshotCorruptError when some do and none verifies."""
        refused = []
        for _, stripe in self.layout.data_placement(self.position):
            if stripe.num_data != 1:
                return None
            for parity_index, holder in enumerate(stripe.parity_holders):
                if holder not in alive:
                    continue
                try:
                    replicas = ray.get(self.peers[holder].replica_parity.remote(version))
                except Exception:
                    continue
                replica = replicas.get(stripe.parity_key(parity_index))
                if replica is None or replica["nbytes"] != shard_nbytes:
                    continue
                shards = _PeerShards(self, version, alive)
                try:
                    base = shards[holder]
                    shard = out if out is not None else bytearray(shard_nbytes)
                    target = np.frombuffer(shard, np.uint8)
                    target[:] = base[:shard_nbytes]
                    for (offset, length), patch in zip(replica["ranges"], replica["patches"]):
                        target[offset : offset + length] = patch
                finally:
                    shards.close()
                if _verifies(shard, expected):
                    return shard
                refused.append(holder)
                logger.warning(
                    "position %d: the replica of version %d held by position %d does not "
                    "verify; trying the next holder",
                    self.position,
                    version,
                    holder,
                )
        if refused:
            raise SnapshotCorruptError(
                f"position {self.position}: version {version} rebuilt from the replicas held by "
                f"positions {refused} does not verify (their copies are corrupt)"
            )
        return None

    def rebuild(self, version: int, lost_positions: list[int], rank_meta: dict[int, dict]) -> dict:
        """Rebuild this (replacement) node's ranks for `version` from the group's survivors.

        `rank_meta` is the version's metadata from a survivor (`version_meta`). The rebuilt
        bytes land in fresh slots here and are verified against the recorded checksums."""
        started = time.perf_counter()
        mine = sorted(int(r) for r, m in rank_meta.items() if m["position"] == self.position)
        if sorted(mine) != self.ranks:
            raise ValueError(
                f"position {self.position} expected ranks {self.ranks}, metadata has {mine}"
            )
        shard_nbytes = sum(rank_meta[rank]["total_bytes"] for rank in mine)
        alive = set(self.positions) - set(lost_positions)
        out = None
        self._await_reservation()
        allocated = time.perf_counter()
        if len(mine) == 1:
            # One rank per node: decode straight into its slot, no intermediate gigabyte buffer.
            with self.cond:
                self.register(mine[0], shard_nbytes)
                out = self.regions[mine[0]][0].buffer[:shard_nbytes]
        allocated = time.perf_counter() - allocated
        expected, offset = [], 0
        for rank in mine:
            meta = rank_meta[rank]
            layout = json.loads(meta["layout_json"])
            expected.append((offset, meta["total_bytes"], layout, list(meta["checksums"])))
            offset += meta["total_bytes"]
        shard = self._rebuild_from_replica(version, alive, shard_nbytes, out, expected)
        if shard is None:
            surviving_parity, attached = self._surviving_parity(version, alive)
            try:
                shard = rebuild_shard(
                    self.layout,
                    self.position,
                    shard_nbytes,
                    _PeerShards(self, version, alive),
                    surviving_parity,
                    version=version,
                    out=out,
                )
            finally:
                surviving_parity.clear()
                for region in attached:
                    region.close()
            if not _verifies(shard, expected):
                raise SnapshotCorruptError(
                    f"ranks {mine} of version {version} rebuilt from parity do not verify"
                )
        view = memoryview(shard)
        offset = 0
        state = VersionState(encoded=False)
        with self.cond:
            for rank in mine:
                meta = rank_meta[rank]
                self.register(rank, meta["total_bytes"])
                region = self.regions[rank][0]
                if out is None:
                    region.buffer[: meta["total_bytes"]] = view[
                        offset : offset + meta["total_bytes"]
                    ]
                offset += meta["total_bytes"]
                state.local[rank] = RankVersion(
                    0, meta["layout_json"], list(meta["checksums"]), meta["total_bytes"]
                )
                self.slot_versions[(rank, 0)] = version
            state.rank_meta = {int(r): m for r, m in rank_meta.items()}
            state.ready_positions = set(self.positions)
            self.versions[version] = state
            self.committed = version
        # Recompute the parity this position holds, so the group is protected again.
        self._encode(version, state)
        state.encoded = True
        return {
            "position": self.position,
            "bytes": shard_nbytes,
            "rebuild_s": time.perf_counter() - started,
            "allocate_s": allocated,
            "reserved_slots": all(rank in self.reserved_ranks for rank in mine),
        }

    # -- durable tier ------------------------------------------------------------------------

    def take_persist_copy(self, version: int) -> dict[int, tuple[np.ndarray, str]]:
        """Hand over (and forget) this node's copy of a persist version; waits for its commit."""
        with self.cond:
            if not self.cond.wait_for(lambda: version in self.persist_copies, self.wait_timeout_s):
                raise TimeoutError(f"position {self.position} never committed version {version}")
            return self.persist_copies.pop(version)

    def _persist(self, version: int, rank_meta: dict[int, dict]) -> None:
        from stalwart.snapshot.persist import DurableWriter

        try:
            copies = self.take_persist_copy(version)
            for position in sorted({meta["position"] for meta in rank_meta.values()}):
                if position != self.position:
                    copies.update(self._call_peer(position, "take_persist_copy", version))
            shards = {
                f"rank{rank:05d}": (array, json.loads(layout_json))
                for rank, (array, layout_json) in sorted(copies.items())
            }
            if self.durable is None:
                self.durable = DurableWriter(self.run_dir, keep=self.keep)
            self.durable.submit(version, shards, {"version": version, "num_ranks": len(shards)})
        except Exception as error:
            with self.cond:
                self.events.append({"version": version, "persist_error": repr(error)})

    def _call_peer(self, position: int, method: str, *args):
        """Call `method` on the manager at `position`; its answer is waited for in short rounds
        (this manager's encoder and persister threads call their peers this way). A peer
        that has been replaced (its node lost: the controller wired a new manager in), or has
        not answered within wait_timeout_s, ends the wait with an error. A plain `ray.get` on a
        lost node's manager can hold the calling thread for minutes: the persister (every
        later durable write, and a recovery's `settle_durable`) or the encoder (every later
        version)."""
        peer = self.peers[position]
        ref = getattr(peer, method).remote(*args)
        deadline = time.monotonic() + self.wait_timeout_s
        while True:
            ready, _ = ray.wait([ref], timeout=0.2)
            if ready:
                return ray.get(ready[0])
            current = self.peers.get(position)
            if current is None or _actor_id(current) != _actor_id(peer):
                raise RuntimeError(f"the manager at position {position} was replaced")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the manager at position {position} did not answer within "
                    f"{self.wait_timeout_s:.0f} s"
                )

    def flush_durable(self, timeout_s: float = 600.0) -> None:
        """Wait for every durable write submitted so far (the end of a run); TimeoutError when
        they do not finish within `timeout_s`."""
        if not self.settle_durable(timeout_s):
            raise TimeoutError(f"durable writes did not finish within {timeout_s:.0f} s")

    def settle_durable(self, timeout_s: float) -> bool:
        """Finish the durable writes already underway, within `timeout_s`: a recovery about to
        choose a checkpoint must not have one land (and prune older ones) under its choice.
        True when none is left running."""
        deadline = time.monotonic() + timeout_s
        try:
            self.persister.submit(lambda: None).result(timeout_s)
            if self.durable is not None:
                self.durable.flush(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return False
        return True

    def shutdown(self) -> None:
        self.encoder.shutdown(wait=False, cancel_futures=True)
        self._await_reservation()
        self._release_reserved()
        if self.durable is not None:
            self.durable.close()
        for regions in self.regions.values():
            for region in regions:
                region.close()
                region.unlink()
        self.regions.clear()
        parity = list(self._parity_region.values()) + [
            region for pool in self.parity_pool.values() for region in pool
        ]
        for state in self.versions.values():
            state.parity = {}
        self._parity_region.clear()
        self.parity_pool.clear()
        for region in parity:
            region.close()
            region.unlink()


def _free_pairs(pool: dict[int, list[list[shm.Region]]]) -> None:
    for pairs in pool.values():
        for pair in pairs:
            for region in pair:
                region.close()
                region.unlink()


def _pid() -> int:
    import os

    return os.getpid()


RemoteSnapshotManager = ray.remote(num_cpus=0, max_concurrency=32)(SnapshotManager)


def _actor_id(handle) -> object:
    """Which actor a handle calls (handles to one actor compare unequal as objects)."""
    return getattr(handle, "_actor_id", handle)
