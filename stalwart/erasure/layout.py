"""Which node holds which parity fragment, and how a lost node's shard is rebuilt.

Nodes form groups; inside a group of ``g`` nodes with ``m`` parity (``k = g - m``), every
node's shard is cut into ``k`` chunks and the group has ``g`` stripes, RAID-6 style with
rotating parity:

* stripe ``s`` has parity holders at group positions ``s, s+1, ..., s+m-1`` (mod ``g``);
  holder ``j`` keeps parity piece ``j`` of the stripe;
* its ``k`` data members are the positions ``s+m, ..., s+m+k-1`` (mod ``g``); the ``t``-th
  of them contributes its chunk ``t``.

So each node is a data member of ``k`` stripes (once per chunk) and a parity holder in ``m``
stripes; it keeps its own full shard plus ``m`` parity chunks, a memory overhead of
``m / (g - m)`` of a shard. A stripe loses one member per lost node, so any ``m`` node losses
in a group leave every stripe at least ``k`` members: always recoverable.

Shard sizes may differ between nodes: node ``i``'s chunk is ``ceil(S_i / k)`` bytes (its last
chunk shorter) and every stripe is zero-padded to its longest chunk. Padding is virtual for
the data (shards are never copied to pad them, except a short chunk while it is encoded);
only the parity pieces have the stripe's full length.

Grouping rule for ``N`` nodes (given order is kept; nodes that are close in the order, e.g.
in the same rack, should be listed apart by the caller if they fail together):

* ``N == 1``: one group without parity (``protected`` is False and ``reason`` says why).
* ``N >= g``: ``N // g`` groups with sizes as equal as possible (each between ``g`` and
  ``2g - 1``), so no group pays more than the configured overhead ``m / (g - m)`` and each
  tolerates ``m`` losses.
* ``1 < N < g``: one group of ``N`` nodes with parity ``min(m, N - 1)``; its overhead is
  higher than configured (with ``m >= N - 1`` every node holds full copies of the others).
  ``reason`` says so.

Everything here is pure computation over buffers -- no Ray, no I/O; the snapshot manager
moves the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import xxhash

from stalwart.erasure.codec import (
    Buffer,
    NotEnoughFragments,
    byte_view,
    decode_stripe,
    encode_parity,
)

NodeId = Hashable


def parity_key(group: int, stripe: int, parity_index: int) -> str:
    """Stable, JSON-friendly name of one parity fragment, e.g. ``"g0/s3/p1"``."""
    return f"g{group}/s{stripe}/p{parity_index}"


def stripe_tag(group: int, stripe: int, version: int) -> int:
    """64-bit identity stored in a stripe's parity fragments: a fragment from another
    stripe or another snapshot version fails verification instead of decoding garbage."""
    return xxhash.xxh3_64_intdigest(f"g{group}/s{stripe}@v{version}".encode())


@dataclass(frozen=True)
class Group:
    index: int
    node_ids: tuple[NodeId, ...]
    parity: int  # parity pieces per stripe actually used in this group

    @property
    def size(self) -> int:
        return len(self.node_ids)

    @property
    def num_data(self) -> int:
        return self.size - self.parity

    @property
    def memory_overhead(self) -> float:
        """Parity bytes held per node as a fraction of its shard (equal shard sizes)."""
        return self.parity / self.num_data


@dataclass(frozen=True)
class Stripe:
    group: int
    index: int
    # (node, chunk index) of each data member, in stripe order.
    data_members: tuple[tuple[NodeId, int], ...]
    # parity_holders[j] keeps parity piece j.
    parity_holders: tuple[NodeId, ...]

    @property
    def num_data(self) -> int:
        return len(self.data_members)

    @property
    def parity(self) -> int:
        return len(self.parity_holders)

    def parity_key(self, parity_index: int) -> str:
        return parity_key(self.group, self.index, parity_index)


@dataclass(frozen=True)
class ParityAssignment:
    """One parity fragment a node computes and holds, and the data chunks it is made from."""

    key: str
    group: int
    stripe: int
    parity_index: int
    sources: tuple[tuple[NodeId, int], ...]  # (node, chunk index) in stripe order


@dataclass(frozen=True)
class ChunkRebuild:
    """How one chunk of a lost node is rebuilt: any ``num_needed`` of the listed sources."""

    node_id: NodeId
    chunk_index: int
    group: int
    stripe: int
    num_needed: int
    surviving_data: tuple[tuple[NodeId, int], ...]  # (node, chunk index)
    surviving_parity: tuple[tuple[NodeId, str], ...]  # (holder node, parity key)


@dataclass(frozen=True)
class RecoveryPlan:
    recoverable = True
    lost_node_ids: tuple[NodeId, ...]
    chunks: dict[NodeId, list[ChunkRebuild]]
    # Parity the lost nodes held; their replacements recompute it with compute_parity once
    # every shard of the group is back.
    parity_to_recompute: dict[NodeId, list[ParityAssignment]]


@dataclass(frozen=True)
class GroupLoss:
    group: int
    lost_node_ids: tuple[NodeId, ...]
    num_lost: int
    parity: int


@dataclass(frozen=True)
class Unrecoverable:
    recoverable = False
    lost_node_ids: tuple[NodeId, ...]
    groups: tuple[GroupLoss, ...]
    reason: str = field(default="")


class ErasureLayout:
    """Placement of data chunks and parity fragments over ``node_ids``.

    ``group_size`` (g) and ``parity`` (m) follow ``ErasureConfig``; ``parity=0`` (or
    ``group_size=1``, which forces it) disables coding: every node is its own unprotected group.
    """

    def __init__(self, node_ids: Sequence[NodeId], group_size: int, parity: int):
        node_ids = tuple(node_ids)
        if not node_ids:
            raise ValueError("node_ids is empty: an erasure layout needs at least one node")
        if len(set(node_ids)) != len(node_ids):
            duplicates = sorted({str(n) for n in node_ids if node_ids.count(n) > 1})
            raise ValueError(f"node_ids has duplicates {duplicates}; each node must appear once")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r} is invalid: it must be an integer >= 1")
        if not isinstance(parity, int) or not (0 <= parity < group_size):
            raise ValueError(
                f"parity={parity!r} is invalid for group_size={group_size}: "
                f"it must satisfy 0 <= parity < group_size"
            )
        self.node_ids = node_ids
        self.group_size = group_size
        self.parity = parity
        self.groups: tuple[Group, ...] = self._form_groups()
        self._group_of: dict[NodeId, Group] = {
            node: group for group in self.groups for node in group.node_ids
        }
        self._stripes: dict[int, tuple[Stripe, ...]] = {
            group.index: tuple(self._stripe(group, s) for s in range(self._num_stripes(group)))
            for group in self.groups
        }
        self.reason = self._explain()

    # ---- structure -------------------------------------------------------------------

    def _form_groups(self) -> tuple[Group, ...]:
        num_nodes = len(self.node_ids)
        if num_nodes == 1 or self.parity == 0:
            if num_nodes == 1:
                return (Group(0, self.node_ids, 0),)
            return tuple(Group(i, (node,), 0) for i, node in enumerate(self.node_ids))
        if num_nodes < self.group_size:
            return (Group(0, self.node_ids, min(self.parity, num_nodes - 1)),)
        num_groups = num_nodes // self.group_size
        base_size, num_larger = divmod(num_nodes, num_groups)
        groups = []
        start = 0
        for index in range(num_groups):
            size = base_size + (1 if index < num_larger else 0)
            groups.append(Group(index, self.node_ids[start : start + size], self.parity))
            start += size
        return tuple(groups)

    def _explain(self) -> str:
        if self.parity == 0:
            return "parity=0: erasure coding disabled, a lost node's shard is not recoverable from peers"
        if len(self.node_ids) == 1:
            return "single node: no peer can hold parity, only the durable tier survives its loss"
        group = self.groups[0]
        if len(self.groups) == 1 and group.size < self.group_size:
            return (
                f"{group.size} nodes < group_size={self.group_size}: one group with parity "
                f"{group.parity} (memory overhead {group.memory_overhead:.2f} of a shard "
                f"instead of {self.parity / (self.group_size - self.parity):.2f})"
            )
        return ""

    @property
    def protected(self) -> bool:
        """True when every node's shard survives the loss of that node."""
        return all(group.parity > 0 for group in self.groups)

    @staticmethod
    def _num_stripes(group: Group) -> int:
        return group.size if group.parity > 0 else 0

    @staticmethod
    def _stripe(group: Group, index: int) -> Stripe:
        size, m = group.size, group.parity
        members = group.node_ids
        parity_holders = tuple(members[(index + j) % size] for j in range(m))
        data_members = tuple((members[(index + m + t) % size], t) for t in range(size - m))
        return Stripe(group.index, index, data_members, parity_holders)

    def group_of(self, node_id: NodeId) -> Group:
        try:
            return self._group_of[node_id]
        except KeyError:
            raise ValueError(f"node {node_id!r} is not part of this layout") from None

    def stripes(self, group_index: int) -> tuple[Stripe, ...]:
        return self._stripes[group_index]

    def stripe(self, group_index: int, stripe_index: int) -> Stripe:
        return self._stripes[group_index][stripe_index]

    def num_chunks(self, node_id: NodeId) -> int:
        """How many chunks this node's shard is cut into (k of its group; 1 if unprotected)."""
        group = self.group_of(node_id)
        return group.num_data if group.parity > 0 else 1

    def chunk_bounds(self, node_id: NodeId, shard_nbytes: int, chunk_index: int) -> tuple[int, int]:
        """Byte range [start, stop) of chunk ``chunk_index`` inside a shard of that size."""
        num_chunks = self.num_chunks(node_id)
        chunk_nbytes = -(-shard_nbytes // num_chunks)
        start = min(chunk_index * chunk_nbytes, shard_nbytes)
        return start, min(start + chunk_nbytes, shard_nbytes)

    def parity_assignments(self, node_id: NodeId) -> list[ParityAssignment]:
        """The parity fragments ``node_id`` computes and holds (``m`` of them)."""
        group = self.group_of(node_id)
        assignments = []
        for stripe in self._stripes[group.index]:
            for parity_index, holder in enumerate(stripe.parity_holders):
                if holder == node_id:
                    assignments.append(
                        ParityAssignment(
                            stripe.parity_key(parity_index),
                            group.index,
                            stripe.index,
                            parity_index,
                            stripe.data_members,
                        )
                    )
        return assignments

    def data_placement(self, node_id: NodeId) -> list[tuple[int, Stripe]]:
        """(chunk index, stripe) for every chunk of ``node_id`` that parity protects."""
        group = self.group_of(node_id)
        return [
            (chunk_index, stripe)
            for stripe in self._stripes[group.index]
            for node, chunk_index in stripe.data_members
            if node == node_id
        ]

    def holder_of(self, key: str) -> NodeId:
        for group in self.groups:
            for stripe in self._stripes[group.index]:
                for parity_index, holder in enumerate(stripe.parity_holders):
                    if stripe.parity_key(parity_index) == key:
                        return holder
        raise ValueError(f"parity key {key!r} does not exist in this layout")

    # ---- recovery planning -----------------------------------------------------------

    def recovery_plan(self, lost_node_ids: Sequence[NodeId]) -> RecoveryPlan | Unrecoverable:
        """Which surviving chunks and parity fragments rebuild each lost node's chunks."""
        lost = tuple(dict.fromkeys(lost_node_ids))
        for node in lost:
            self.group_of(node)
        lost_set = set(lost)
        failed_groups = []
        for group in self.groups:
            group_lost = tuple(node for node in group.node_ids if node in lost_set)
            if len(group_lost) > group.parity:
                failed_groups.append(
                    GroupLoss(group.index, group_lost, len(group_lost), group.parity)
                )
        if failed_groups:
            reason = "; ".join(
                f"group {loss.group} lost {loss.num_lost} nodes {list(loss.lost_node_ids)} "
                f"but has parity {loss.parity}"
                for loss in failed_groups
            )
            return Unrecoverable(lost, tuple(failed_groups), reason)

        chunks: dict[NodeId, list[ChunkRebuild]] = {}
        parity_to_recompute: dict[NodeId, list[ParityAssignment]] = {}
        for node in lost:
            rebuilds = []
            for chunk_index, stripe in self.data_placement(node):
                rebuilds.append(
                    ChunkRebuild(
                        node_id=node,
                        chunk_index=chunk_index,
                        group=stripe.group,
                        stripe=stripe.index,
                        num_needed=stripe.num_data,
                        surviving_data=tuple(
                            member for member in stripe.data_members if member[0] not in lost_set
                        ),
                        surviving_parity=tuple(
                            (holder, stripe.parity_key(j))
                            for j, holder in enumerate(stripe.parity_holders)
                            if holder not in lost_set
                        ),
                    )
                )
            chunks[node] = rebuilds
            parity_to_recompute[node] = self.parity_assignments(node)
        return RecoveryPlan(lost, chunks, parity_to_recompute)

    def describe(self) -> dict:
        """JSON-able picture of the layout (for logs and docs)."""
        return {
            "group_size": self.group_size,
            "parity": self.parity,
            "protected": self.protected,
            "reason": self.reason,
            "groups": [
                {
                    "index": group.index,
                    "node_ids": list(group.node_ids),
                    "parity": group.parity,
                    "memory_overhead": group.memory_overhead if group.parity else 0.0,
                    "stripes": [
                        {
                            "index": stripe.index,
                            "data": [f"{node}:c{chunk}" for node, chunk in stripe.data_members],
                            "parity": {
                                stripe.parity_key(j): holder
                                for j, holder in enumerate(stripe.parity_holders)
                            },
                        }
                        for stripe in self._stripes[group.index]
                    ],
                }
                for group in self.groups
            ],
        }

    def __repr__(self) -> str:
        sizes = [group.size for group in self.groups]
        return (
            f"ErasureLayout(num_nodes={len(self.node_ids)}, group_size={self.group_size}, "
            f"parity={self.parity}, group_sizes={sizes})"
        )


# ---- byte-level helpers the snapshot manager calls --------------------------------------


def _chunk_view(
    layout: ErasureLayout, node_id: NodeId, shard: Buffer, chunk_index: int
) -> memoryview:
    view = byte_view(shard)
    start, stop = layout.chunk_bounds(node_id, len(view), chunk_index)
    return view[start:stop]


def _shard_of(shards_by_node: Mapping[NodeId, Buffer], node_id: NodeId, purpose: str) -> Buffer:
    try:
        return shards_by_node[node_id]
    except KeyError:
        raise ValueError(
            f"shards_by_node has no shard for node {node_id!r}, which {purpose}; "
            f"pass the shard of every data member of the node's stripes"
        ) from None


def compute_stripe_parity(
    layout: ErasureLayout,
    group_index: int,
    stripe_index: int,
    shards_by_node: Mapping[NodeId, Buffer],
    *,
    version: int = 0,
    parity_indices: Sequence[int] | None = None,
    num_threads: int = 1,
    allocate: Callable[[int], bytearray | memoryview] | None = None,
) -> dict[str, bytearray]:
    """Parity fragments of one stripe, keyed by :func:`parity_key` (``allocate``: see
    :func:`encode_parity`)."""
    stripe = layout.stripe(group_index, stripe_index)
    if parity_indices is None:
        parity_indices = list(range(stripe.parity))
    chunks = [
        _chunk_view(
            layout,
            node,
            _shard_of(
                shards_by_node, node, f"is a data member of stripe g{group_index}/s{stripe_index}"
            ),
            chunk_index,
        )
        for node, chunk_index in stripe.data_members
    ]
    fragments = encode_parity(
        chunks,
        stripe.parity,
        tag=stripe_tag(group_index, stripe_index, version),
        parity_indices=parity_indices,
        num_threads=num_threads,
        allocate=allocate,
    )
    return {stripe.parity_key(j): fragment for j, fragment in zip(parity_indices, fragments)}


def compute_parity(
    layout: ErasureLayout,
    node_id: NodeId,
    shards_by_node: Mapping[NodeId, Buffer],
    *,
    version: int = 0,
    num_threads: int = 1,
    allocate: Callable[[int], bytearray | memoryview] | None = None,
) -> dict[str, bytearray]:
    """The parity fragments ``node_id`` holds (headers and checksums included).

    ``shards_by_node`` must hold the shards of the data members of the node's stripes
    (other entries are ignored). ``version`` is the snapshot version; it is stamped into
    every fragment so fragments of different versions are never mixed at rebuild time.
    """
    result: dict[str, bytearray] = {}
    for assignment in layout.parity_assignments(node_id):
        result.update(
            compute_stripe_parity(
                layout,
                assignment.group,
                assignment.stripe,
                shards_by_node,
                version=version,
                parity_indices=[assignment.parity_index],
                num_threads=num_threads,
                allocate=allocate,
            )
        )
    return result


def rebuild_shards(
    layout: ErasureLayout,
    lost_shard_nbytes: Mapping[NodeId, int],
    surviving_shards: Mapping[NodeId, Buffer],
    surviving_parity: Mapping[str, Buffer],
    *,
    version: int = 0,
    out: Mapping[NodeId, Buffer] | None = None,
) -> dict[NodeId, Buffer]:
    """Rebuild the shards of several lost nodes, decoding each stripe once.

    ``lost_shard_nbytes`` maps each lost node to its shard length. A node missing from
    ``surviving_shards`` counts as lost too (its chunks are not used); a surviving chunk or
    parity fragment that fails its checksum counts as lost and the next survivor is tried.
    ``out`` optionally gives a writable buffer per lost node (e.g. the manager's shared
    memory) to rebuild into; otherwise ``bytearray``s are allocated. Raises
    :class:`NotEnoughFragments` naming the stripe when too few members verify.
    """
    for node, nbytes in lost_shard_nbytes.items():
        layout.group_of(node)
        if not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"shard_nbytes={nbytes!r} for node {node!r} must be an integer >= 0")
        if layout.group_of(node).parity == 0:
            raise NotEnoughFragments(
                0, 1, where=f"node {node!r}: its group has no parity ({layout.reason})"
            )
    targets: dict[NodeId, memoryview] = {}
    results: dict[NodeId, Buffer] = {}
    for node, nbytes in lost_shard_nbytes.items():
        buffer = out[node] if out is not None and node in out else bytearray(nbytes)
        view = byte_view(buffer)
        if view.readonly or len(view) != nbytes:
            raise ValueError(
                f"out[{node!r}] must be a writable buffer of exactly {nbytes} bytes, "
                f"got {len(view)} bytes (readonly={view.readonly})"
            )
        targets[node] = view
        results[node] = buffer

    lost = set(lost_shard_nbytes)
    stripes_needed: dict[tuple[int, int], Stripe] = {}
    for node in lost:
        for _, stripe in layout.data_placement(node):
            stripes_needed[(stripe.group, stripe.index)] = stripe

    for (group_index, stripe_index), stripe in sorted(stripes_needed.items()):
        data_chunks: list[Buffer | None] = []
        for node, chunk_index in stripe.data_members:
            if node in lost or node not in surviving_shards:
                data_chunks.append(None)
            else:
                data_chunks.append(_chunk_view(layout, node, surviving_shards[node], chunk_index))
        parity_fragments = [
            surviving_parity.get(stripe.parity_key(j)) for j in range(stripe.parity)
        ]
        try:
            decoded = decode_stripe(
                data_chunks, parity_fragments, tag=stripe_tag(group_index, stripe_index, version)
            )
        except NotEnoughFragments as error:
            raise NotEnoughFragments(
                error.num_valid,
                error.num_needed,
                error.rejected,
                where=f"stripe g{group_index}/s{stripe_index} (version {version})",
            ) from None
        for (node, chunk_index), chunk in zip(stripe.data_members, decoded):
            if node not in lost:
                continue
            start, stop = layout.chunk_bounds(node, len(targets[node]), chunk_index)
            if len(chunk) != stop - start:
                raise ValueError(
                    f"shard_nbytes={len(targets[node])} for node {node!r} disagrees with the "
                    f"parity of stripe g{group_index}/s{stripe_index}, which records chunk "
                    f"{chunk_index} as {len(chunk)} bytes (expected {stop - start}); pass the "
                    f"lost shard's true length"
                )
            targets[node][start:stop] = chunk
    return results


def rebuild_shard(
    layout: ErasureLayout,
    lost_node_id: NodeId,
    shard_nbytes: int,
    surviving_shards: Mapping[NodeId, Buffer],
    surviving_parity: Mapping[str, Buffer],
    *,
    version: int = 0,
    out: Buffer | None = None,
) -> Buffer:
    """The lost node's shard, rebuilt byte-identically from its group's survivors.

    Returns a ``bytearray`` of ``shard_nbytes`` bytes, or ``out`` filled in place.
    """
    return rebuild_shards(
        layout,
        {lost_node_id: shard_nbytes},
        surviving_shards,
        surviving_parity,
        version=version,
        out=None if out is None else {lost_node_id: out},
    )[lost_node_id]
