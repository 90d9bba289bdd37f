"""SnapshotManagers on a real 5-node Ray cluster: commit protocol and rebuilding a lost node.

Each of 4 active nodes' managers receives a random "state" for several versions; a node is
removed with `Cluster.remove_node`; a manager on the spare node rebuilds the lost node's shard
from the other managers' data and parity, and the rebuilt bytes equal what was lost.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from stalwart.erasure.layout import ErasureLayout
from stalwart.launch.cluster import connect
from stalwart.snapshot import shm
from stalwart.snapshot.manager import RemoteSnapshotManager
from stalwart.snapshot.state import checksums, copy_into, layout_tree

pytestmark = pytest.mark.timeout(300)

NUM_NODES = 4


def _manager(job_id, node_id, position, parity, num_nodes=NUM_NODES):
    return RemoteSnapshotManager.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    ).remote(
        job_id=job_id,
        position=position,
        positions=list(range(num_nodes)),
        ranks=[position],
        group_size=num_nodes,
        parity=parity,
        run_dir="/tmp/unused",
        wait_timeout_s=30,
    )


def _wait_committed(managers, version, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        statuses = ray.get([m.status.remote() for m in managers.values()])
        if all(s["committed"] == version for s in statuses):
            return
        time.sleep(0.05)
    raise AssertionError(f"version {version} not committed everywhere: {statuses}")


def _publish(managers, regions, trees, version):
    """Every position's rank copies its tree in as `version` (registering slots on first use)
    and publishes it; returns once the version committed everywhere."""
    for p, tree in trees.items():
        tensors, layout = layout_tree(tree)
        if p not in regions:
            names = ray.get(managers[p].register.remote(p, layout.total_bytes))
            regions[p] = [shm.attach_region(name) for name in names]
        slot = ray.get(managers[p].acquire.remote(p, version))
        copy_into(tensors, layout, regions[p][slot].buffer)
        sums = checksums(layout, regions[p][slot].buffer)
        ray.get(managers[p].publish.remote(p, version, slot, layout.to_json(), sums))
    _wait_committed(managers, version)


def _tear_down(cluster, managers, regions, job_id):
    for region_list in regions.values():
        for region in region_list:
            region.close()
    for handle in managers.values():
        try:
            ray.get(handle.shutdown.remote(), timeout=10)
        except Exception:
            pass
    cluster.shutdown()
    shm.remove_regions(f"stalwart-{job_id}-")


@pytest.mark.parametrize("parity", [1, 2])
def test_lost_node_is_rebuilt_byte_identically_on_the_spare(parity):
    cluster = connect(num_nodes=NUM_NODES, num_spare_nodes=1, cpus_per_node=1)
    job_id = f"mgrtest{parity}"
    managers: dict = {}
    regions: dict = {}
    try:
        nodes = cluster.alive_nodes()
        managers = {p: _manager(job_id, nodes[p].node_id, p, parity) for p in range(NUM_NODES)}
        ray.get([m.set_peers.remote(managers) for m in managers.values()])
        generator = torch.Generator().manual_seed(parity)
        # Unequal sizes per node, like uneven FSDP shards.
        trees = {
            p: {"weights": torch.randn(1000 + 337 * p, generator=generator), "step": 0}
            for p in range(NUM_NODES)
        }
        for version in (1, 2, 3):
            for tree in trees.values():
                tree["weights"].add_(1.0)
                tree["step"] = version
            _publish(managers, regions, trees, version)
        # Parity is served from shared memory to peers on this host, the same bytes as the
        # raw transfer a peer on another host gets.
        survivor = managers[NUM_NODES - 1]
        host, named = ray.get(survivor.parity_regions.remote(3))
        raw = ray.get(survivor.parity_fragments.remote(3))
        assert named and set(named) == set(raw)
        for key, (name, nbytes) in named.items():
            mapped = shm.attach_region(name)
            try:
                assert np.array_equal(mapped.array[:nbytes], raw[key])
            finally:
                mapped.close()
        lost = list(range(parity))  # parity losses in the one group: still recoverable
        expected = {p: ray.get(managers[p].rank_shard.remote(p, 3)).copy() for p in lost}
        meta = ray.get(managers[NUM_NODES - 1].version_meta.remote(3))
        for p in lost:
            cluster.remove_node(nodes[p].node_id)
        spare = nodes[NUM_NODES]
        # One spare here: the second replacement (parity 2) shares it, as two processes would.
        # The replacements are standby managers, started before they know their position.
        # A standby reserves slots ahead of the loss: the first replacement's size matches
        # and its slots are used (renamed); the second's does not, so it allocates on demand
        # and the unused reservation is freed.
        sizes = {p: int(expected[p].nbytes) for p in lost}
        for p in lost:
            managers[p] = _manager(job_id, spare.node_id, -1, parity)
            ray.get(managers[p].reserve.remote([sizes[p] + 8 * p]))
            ray.get(managers[p].assume_position.remote(p, list(range(NUM_NODES)), [p]))
        with pytest.raises(ray.exceptions.RayTaskError, match="holds nothing"):
            ray.get(survivor.assume_position.remote(0, list(range(NUM_NODES)), [0]))
        ray.get([m.set_peers.remote(managers) for m in managers.values()])
        reports = ray.get([managers[p].rebuild.remote(3, lost, meta) for p in lost])
        for p in lost:
            rebuilt = ray.get(managers[p].rank_shard.remote(p, 3))
            assert np.array_equal(rebuilt, expected[p]), f"position {p} rebuilt differently"
            assert ray.get(managers[p].verify_version.remote(3))
        assert all(report["bytes"] > 0 for report in reports)
        assert [report["reserved_slots"] for report in reports] == [p == 0 for p in lost]
        standby_prefix = f"stalwart-{job_id}-standby-"
        assert not [f for f in shm.shm_dir().iterdir() if f.name.startswith(standby_prefix)]
        # The rebuilt managers hold parity again and take part in the next version.
        for p in lost:
            for region in regions.pop(p):
                region.close()
        _publish(managers, regions, trees, 4)
    finally:
        _tear_down(cluster, managers, regions, job_id)


@pytest.mark.parametrize("same_weights", [True, False], ids=["replicas", "shards"])
def test_replica_parity_holds_only_what_differs_and_rebuilds_exactly(same_weights):
    """k = 1 (3 nodes, parity 2): each parity piece is a whole peer shard. Data-parallel
    replicas (same weights, private RNG-like entries) keep it as a reference to the holder's own
    copy plus the differing entries; shards that differ throughout get real fragments. Either
    way two lost nodes are rebuilt byte-identically and the group goes on committing."""
    num_nodes = 3
    cluster = connect(num_nodes=num_nodes, num_spare_nodes=1, cpus_per_node=1)
    job_id = f"mgrreplica{int(same_weights)}"
    managers: dict = {}
    regions: dict = {}

    try:
        nodes = cluster.alive_nodes()
        managers = {
            p: _manager(job_id, nodes[p].node_id, p, 2, num_nodes) for p in range(num_nodes)
        }
        ray.get([m.set_peers.remote(managers) for m in managers.values()])
        generator = torch.Generator().manual_seed(7)
        weights = torch.randn(20_000, generator=generator)
        trees = {
            p: {
                "weights": weights.clone()
                if same_weights
                else torch.randn(20_000, generator=generator),
                "rng": torch.randint(0, 255, (64,), dtype=torch.uint8, generator=generator),
                "step": 0,
            }
            for p in range(num_nodes)
        }
        for version in (1, 2):
            for tree in trees.values():
                tree["weights"].add_(1.0)
                tree["step"] = version
            _publish(managers, regions, trees, version)
        held = ray.get(managers[0].replica_parity.remote(2))
        fragments = ray.get(managers[0].parity_fragments.remote(2))
        if same_weights:
            assert len(held) == 2 and not fragments
            for replica in held.values():
                # Only the private entry differs between the replicas.
                assert [length for _, length in replica["ranges"]] == [64]
        else:
            assert not held and len(fragments) == 2
        lost = [0, 1]
        expected = {p: ray.get(managers[p].rank_shard.remote(p, 2)).copy() for p in lost}
        meta = ray.get(managers[2].version_meta.remote(2))
        if same_weights:
            # Position 0 alone rebuilt while positions 1 and 2 both hold a replica of it: the
            # first holder's copy is corrupt, so the rebuild passes it over for the second.
            [(_, stripe)] = ErasureLayout(list(range(num_nodes)), num_nodes, 2).data_placement(0)
            first, _second = stripe.parity_holders
            probe = _manager(job_id, nodes[num_nodes].node_id, -1, 2, num_nodes)
            ray.get(probe.assume_position.remote(0, list(range(num_nodes)), [0]))
            ray.get(probe.set_peers.remote({**managers, 0: probe}))
            ray.get(managers[first].corrupt.remote(first, 2, 100))
            ray.get(probe.rebuild.remote(2, [0], meta))
            assert np.array_equal(ray.get(probe.rank_shard.remote(0, 2)), expected[0])
            ray.get(managers[first].corrupt.remote(first, 2, 100))  # flipped back
            ray.get(probe.shutdown.remote())
            ray.kill(probe)
        for p in lost:
            cluster.remove_node(nodes[p].node_id)
        spare = nodes[num_nodes]
        for p in lost:
            managers[p] = _manager(job_id, spare.node_id, -1, 2, num_nodes)
            ray.get(managers[p].assume_position.remote(p, list(range(num_nodes)), [p]))
        ray.get([m.set_peers.remote(managers) for m in managers.values()])
        if same_weights:
            # The survivor's own copy is the base of its replica parity: a flipped byte there
            # fails the rebuilt ranks' checksums; the rebuild refuses, it restores nothing wrong.
            ray.get(managers[2].corrupt.remote(2, 2, 100))
            with pytest.raises(ray.exceptions.RayTaskError, match="does not verify"):
                ray.get(managers[0].rebuild.remote(2, lost, meta))
            ray.get(managers[2].corrupt.remote(2, 2, 100))  # flipped back
        ray.get([managers[p].rebuild.remote(2, lost, meta) for p in lost])
        for p in lost:
            assert np.array_equal(ray.get(managers[p].rank_shard.remote(p, 2)), expected[p])
            assert ray.get(managers[p].verify_version.remote(2))
        for p in lost:
            for region in regions.pop(p):
                region.close()
        for tree in trees.values():
            tree["weights"].add_(1.0)
            tree["step"] = 3
        _publish(managers, regions, trees, 3)
        assert bool(ray.get(managers[0].replica_parity.remote(3))) == same_weights
    finally:
        _tear_down(cluster, managers, regions, job_id)
