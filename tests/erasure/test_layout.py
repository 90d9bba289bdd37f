"""Rotating-parity layout: any m losses per group are rebuilt byte-identically, m+1 are not."""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stalwart.config import ConfigError, ErasureConfig, load_config
from stalwart.erasure.codec import NotEnoughFragments
from stalwart.erasure.layout import (
    ErasureLayout,
    RecoveryPlan,
    Unrecoverable,
    compute_parity,
    rebuild_shard,
    rebuild_shards,
)

GROUP_SHAPES = [(g, m) for g in range(2, 9) for m in (1, 2) if m < g]


def _random_shards(rng, node_ids, max_nbytes=700):
    # Unequal sizes, including empty shards and shards shorter than k.
    sizes = rng.integers(0, max_nbytes, len(node_ids))
    sizes[rng.integers(0, len(node_ids))] = int(rng.integers(0, 3))
    return {
        node: rng.integers(0, 256, int(size), dtype=np.uint8) for node, size in zip(node_ids, sizes)
    }


def _all_parity(layout, shards, version=0):
    parity = {}
    for node in layout.node_ids:
        held = compute_parity(layout, node, shards, version=version)
        assert set(held) == {a.key for a in layout.parity_assignments(node)}
        parity.update(held)
    return parity


def _survivors(layout, shards, parity, lost):
    surviving_shards = {n: s for n, s in shards.items() if n not in lost}
    surviving_parity = {k: f for k, f in parity.items() if layout.holder_of(k) not in lost}
    return surviving_shards, surviving_parity


@pytest.mark.parametrize("group_size, parity", GROUP_SHAPES)
def test_structure_each_node_holds_m_parity_and_k_chunks(group_size, parity):
    nodes = [f"node{i}" for i in range(group_size)]
    layout = ErasureLayout(nodes, group_size, parity)
    (group,) = layout.groups
    k = group_size - parity
    assert group.memory_overhead == pytest.approx(parity / k)
    for node in nodes:
        assert len(layout.parity_assignments(node)) == parity
        assert sorted(c for c, _ in layout.data_placement(node)) == list(range(k))
    for stripe in layout.stripes(0):
        data_nodes = [n for n, _ in stripe.data_members]
        assert len(set(data_nodes)) == k and len(set(stripe.parity_holders)) == parity
        assert not set(data_nodes) & set(stripe.parity_holders)
    # Parity rotates: every node is a holder in exactly m of the g stripes.
    holders = [h for s in layout.stripes(0) for h in s.parity_holders]
    assert all(holders.count(node) == parity for node in nodes)


@pytest.mark.parametrize("group_size, parity", GROUP_SHAPES)
def test_every_loss_set_up_to_m_is_rebuilt_byte_identically(group_size, parity):
    rng = np.random.default_rng(group_size * 7 + parity)
    nodes = list(range(group_size))
    layout = ErasureLayout(nodes, group_size, parity)
    shards = _random_shards(rng, nodes)
    all_parity = _all_parity(layout, shards, version=3)
    for num_lost in range(1, parity + 1):
        for lost in itertools.combinations(nodes, num_lost):
            plan = layout.recovery_plan(lost)
            assert isinstance(plan, RecoveryPlan) and plan.recoverable
            surviving_shards, surviving_parity = _survivors(layout, shards, all_parity, lost)
            rebuilt = rebuild_shards(
                layout,
                {n: len(shards[n]) for n in lost},
                surviving_shards,
                surviving_parity,
                version=3,
            )
            for node in lost:
                assert bytes(rebuilt[node]) == shards[node].tobytes(), (lost, node)


@pytest.mark.parametrize("group_size, parity", GROUP_SHAPES)
def test_every_m_plus_one_loss_set_in_a_group_is_unrecoverable(group_size, parity):
    nodes = list(range(group_size))
    layout = ErasureLayout(nodes, group_size, parity)
    rng = np.random.default_rng(1)
    shards = _random_shards(rng, nodes)
    all_parity = _all_parity(layout, shards)
    for lost in itertools.combinations(nodes, min(parity + 1, group_size)):
        plan = layout.recovery_plan(lost)
        assert isinstance(plan, Unrecoverable) and not plan.recoverable
        (loss,) = plan.groups
        assert (loss.group, loss.num_lost, loss.parity) == (0, parity + 1, parity)
        assert f"lost {parity + 1} nodes" in plan.reason and f"parity {parity}" in plan.reason
    # The bytes agree with the plan: a lost node whose stripes lost m+1 members cannot be rebuilt.
    lost = tuple(nodes[: parity + 1])
    if len(lost) < group_size:
        surviving_shards, surviving_parity = _survivors(layout, shards, all_parity, lost)
        with pytest.raises(NotEnoughFragments, match="stripe g0/s"):
            rebuild_shards(
                layout, {n: len(shards[n]) for n in lost}, surviving_shards, surviving_parity
            )


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_nodes=st.integers(2, 23),
    group_size=st.integers(2, 8),
    parity=st.integers(1, 2),
    seed=st.integers(0, 2**32 - 1),
)
def test_multi_group_clusters_recover_up_to_m_losses_in_every_group(
    num_nodes, group_size, parity, seed
):
    parity = min(parity, group_size - 1)
    rng = np.random.default_rng(seed)
    nodes = [f"n{i}" for i in range(num_nodes)]
    layout = ErasureLayout(nodes, group_size, parity)
    assert sorted(n for g in layout.groups for n in g.node_ids) == sorted(nodes)
    if num_nodes >= group_size:
        assert all(group_size <= g.size < 2 * group_size for g in layout.groups)
        assert all(g.parity == parity for g in layout.groups)
    shards = _random_shards(rng, nodes, max_nbytes=300)
    all_parity = _all_parity(layout, shards)
    lost = []
    for group in layout.groups:
        num_lost = int(rng.integers(0, group.parity + 1))
        lost += list(rng.choice(group.node_ids, num_lost, replace=False))
    plan = layout.recovery_plan(lost)
    assert plan.recoverable
    surviving_shards, surviving_parity = _survivors(layout, shards, all_parity, set(lost))
    for node in lost:
        for chunk in plan.chunks[node]:
            assert len(chunk.surviving_data) + len(chunk.surviving_parity) >= chunk.num_needed
            assert not {n for n, _ in chunk.surviving_data} & set(lost)
        rebuilt = rebuild_shard(layout, node, len(shards[node]), surviving_shards, surviving_parity)
        assert bytes(rebuilt) == shards[node].tobytes()


def test_a_corrupt_fragment_counts_as_lost_and_the_next_survivor_is_used():
    nodes = list("abcdef")
    layout = ErasureLayout(nodes, 6, 2)
    shards = _random_shards(np.random.default_rng(2), nodes)
    shards["a"] = np.arange(800, dtype=np.int64).view(np.uint8)[:5000]
    all_parity = _all_parity(layout, shards)
    surviving_shards, surviving_parity = _survivors(layout, shards, all_parity, {"a"})
    # One lost node plus one corrupt parity fragment in each of its stripes: still m = 2.
    for _, stripe in layout.data_placement("a"):
        key = next(k for j in range(2) if (k := stripe.parity_key(j)) in surviving_parity)
        damaged = bytearray(surviving_parity[key])
        damaged[-1] ^= 0xFF
        surviving_parity[key] = damaged
    rebuilt = rebuild_shard(layout, "a", len(shards["a"]), surviving_shards, surviving_parity)
    assert bytes(rebuilt) == shards["a"].tobytes()
    # A corrupt surviving data chunk also counts as lost: with it, a stripe is one short.
    stripe = layout.data_placement("a")[0][1]
    other_node, other_chunk = next(m for m in stripe.data_members if m[0] != "a")
    start, stop = layout.chunk_bounds(other_node, len(shards[other_node]), other_chunk)
    if stop > start:
        tampered = dict(surviving_shards)
        tampered[other_node] = shards[other_node].copy()
        tampered[other_node][start] ^= 1
        with pytest.raises(NotEnoughFragments, match="xxh3-64 differs"):
            rebuild_shard(layout, "a", len(shards["a"]), tampered, surviving_parity)


def test_parity_of_another_version_is_never_used():
    nodes = list(range(4))
    layout = ErasureLayout(nodes, 4, 1)
    shards = _random_shards(np.random.default_rng(3), nodes)
    parity_v1 = _all_parity(layout, shards, version=1)
    surviving_shards, surviving_parity = _survivors(layout, shards, parity_v1, {0})
    with pytest.raises(NotEnoughFragments, match="version 2"):
        rebuild_shard(layout, 0, len(shards[0]), surviving_shards, surviving_parity, version=2)


def test_rebuild_into_a_caller_buffer_and_wrong_length_is_refused():
    nodes = list(range(5))
    layout = ErasureLayout(nodes, 5, 2)
    rng = np.random.default_rng(4)
    shards = {n: rng.integers(0, 256, 1000 + n, dtype=np.uint8) for n in nodes}
    all_parity = _all_parity(layout, shards)
    surviving_shards, surviving_parity = _survivors(layout, shards, all_parity, {2})
    out = np.zeros(1002, dtype=np.uint8)
    result = rebuild_shard(layout, 2, 1002, surviving_shards, surviving_parity, out=out)
    assert result is out and np.array_equal(out, shards[2])
    with pytest.raises(ValueError, match="shard_nbytes=1100 for node 2 disagrees"):
        rebuild_shard(layout, 2, 1100, surviving_shards, surviving_parity)


def test_grouping_rules_for_small_and_uneven_clusters():
    single = ErasureLayout(["only"], 4, 2)
    assert not single.protected and "single node" in single.reason
    assert isinstance(single.recovery_plan(["only"]), Unrecoverable)
    assert single.parity_assignments("only") == []

    small = ErasureLayout(["a", "b", "c"], 6, 2)
    (group,) = small.groups
    assert small.protected and group.parity == 2 and group.memory_overhead == 2.0
    assert "3 nodes < group_size=6" in small.reason

    pair = ErasureLayout(["a", "b"], 4, 2)
    assert pair.groups[0].parity == 1  # at most N - 1 parity: full copies of the peer

    uneven = ErasureLayout(list(range(11)), 4, 1)
    assert [g.size for g in uneven.groups] == [6, 5]

    disabled = ErasureLayout(list(range(3)), 1, 0)
    assert not disabled.protected and "parity=0" in disabled.reason
    assert disabled.recovery_plan([]).recoverable


def test_recovery_plan_names_sources_and_parity_to_recompute():
    layout = ErasureLayout(list("abcd"), 4, 2)
    plan = layout.recovery_plan(["b", "d"])
    assert set(plan.chunks) == {"b", "d"}
    for node in ("b", "d"):
        assert sorted(c.chunk_index for c in plan.chunks[node]) == [0, 1]
        assert [a.key for a in plan.parity_to_recompute[node]] == [
            a.key for a in layout.parity_assignments(node)
        ]
        for chunk in plan.chunks[node]:
            assert all(holder in ("a", "c") for holder, _ in chunk.surviving_parity)


def test_bad_layout_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="parity=4 is invalid for group_size=4"):
        ErasureLayout(list(range(8)), 4, 4)
    with pytest.raises(ValueError, match="duplicates"):
        ErasureLayout(["a", "a"], 2, 1)
    with pytest.raises(ValueError, match="node_ids is empty"):
        ErasureLayout([], 2, 1)
    layout = ErasureLayout(list("abc"), 3, 1)
    with pytest.raises(ValueError, match="not part of this layout"):
        layout.recovery_plan(["z"])
    with pytest.raises(ValueError, match="no shard for node"):
        compute_parity(layout, "a", {"a": b"x"})


def test_erasure_config_validation_names_the_key():
    assert ErasureConfig(group_size=6, parity=2).memory_overhead == pytest.approx(0.5)
    with pytest.raises(ConfigError, match=r"snapshot\.erasure\.parity \(4\) must be smaller"):
        load_config(None, ["snapshot.erasure.group_size=4", "snapshot.erasure.parity=4"])
    with pytest.raises(ConfigError, match=r"snapshot\.erasure\.group_size"):
        load_config(None, ["snapshot.erasure.group_size=17"])
