"""A multi-rank RL learner runs as a worker group of the JobController: two data-parallel ranks
on two nodes of a real embedded Ray cluster (plus a spare node), each node with its snapshot
manager, erasure-coded across the nodes. A killed rank, a killed manager and a lost node are
recovered by the controller, and with ``rl.max_staleness: 0`` every run ends on the weights of
the undisturbed one."""

import pytest
from test_rl_durable import config_for

from stalwart.config import config_from_dict

pytestmark = pytest.mark.slow

STEPS = 6


def group_config(run_dir, faults=()):
    tree = config_for(run_dir, steps=STEPS, faults=faults).to_dict()
    tree["parallel"] = {"world_size": 2}
    tree["cluster"] = {"num_nodes": 2, "workers_per_node": 1, "cpus_per_worker": 1}
    tree["snapshot"]["erasure"] = {"group_size": 2, "parity": 1}
    return config_from_dict(tree)


def run(cluster, config, **options):
    from stalwart.launch.rl_driver import run_pipeline

    return run_pipeline(config, evaluate=False, log=print, cluster=cluster, **options)


def learner_recovery(record):
    """The one learner recovery of a run (a rollout actor on a lost node is replaced too)."""
    (recovery,) = [r for r in record["recoveries"] if r["kind"] == "learner"]
    return recovery


@pytest.fixture(scope="module")
def cluster():
    from stalwart.launch.cluster import connect

    # Two nodes for the learner, three spares: the tests below lose three nodes in all.
    handle = connect(num_nodes=5, cpus_per_node=1)
    yield handle
    handle.shutdown()


@pytest.fixture(scope="module")
def clean(cluster, tmp_path_factory):
    return run(cluster, group_config(tmp_path_factory.mktemp("clean")))


def test_undisturbed_group_run(clean):
    assert clean["learner_ranks"] == 2
    assert clean["num_learner_steps"] == STEPS
    assert clean["recoveries"] == []
    assert clean["snapshot_committed_version"] == STEPS
    assert {step["learner_ranks"] for step in clean["steps"]} == {2.0}


def test_killed_rank_is_recovered_by_the_controller_from_memory(cluster, clean, tmp_path):
    faults = [{"kind": "kill_worker", "step": 3, "rank": 1}]
    config = group_config(tmp_path, faults)
    config.cluster.standby_workers = True  # each node keeps a learner process built, waiting
    record = run(cluster, config)
    recovery = learner_recovery(record)
    assert recovery["source"] == "memory"
    assert recovery["failure"] == "process"
    assert 1 in recovery["ranks"]
    # The newest version committed on both nodes: the one before the failed step's, or, if
    # its snapshot was still in flight, the one before that; or the failed step's own, if the
    # step finished before the kill landed.
    assert 2 <= recovery["restored_version"] <= 4
    assert recovery["replayed_steps"] >= 1
    assert recovery["standby_ranks"] == 2  # both ranks of the new group were standbys
    assert record["num_learner_steps"] == STEPS
    assert record["final_weights_xxh64"] == clean["final_weights_xxh64"]


def test_killed_manager_is_restarted_and_the_run_goes_on(cluster, clean, tmp_path):
    faults = [{"kind": "kill_manager", "step": 2, "node": 0}]
    record = run(cluster, group_config(tmp_path, faults))
    assert [r["position"] for r in record["manager_restarts"]] == [0]
    assert record["recoveries"] == []
    assert record["final_weights_xxh64"] == clean["final_weights_xxh64"]
    # The replacement was re-filled: the last version committed on both nodes.
    assert record["snapshot_committed_version"] == STEPS


def test_rank_killed_in_the_warm_up_restarts_the_group_from_its_initial_weights(
    cluster, clean, tmp_path
):
    """Nothing is snapshotted before the supervised warm-up ends: a rank killed during it
    restarts the whole group from the seeded initial weights, and the run ends as the
    undisturbed one does."""
    record = run(cluster, group_config(tmp_path), kill_learner_in_warmup=1)
    assert [r["failure"] for r in record["warmup_restarts"]] == ["process"]
    assert record["recoveries"] == []
    assert record["num_learner_steps"] == STEPS
    assert record["final_weights_xxh64"] == clean["final_weights_xxh64"]
    assert clean["warmup_restarts"] == []


def test_stopped_group_run_resumes_from_its_durable_checkpoint(cluster, clean, tmp_path):
    config = group_config(tmp_path)
    config.trainer.max_steps = 4
    first = run(cluster, config)
    assert first["num_learner_steps"] == 4
    record = run(cluster, group_config(tmp_path), resume_step=4)
    assert record["resumed_from"] == 4
    assert record["num_learner_steps"] == STEPS - 4
    assert record["final_weights_xxh64"] == clean["final_weights_xxh64"]


def test_bad_fault_rank_or_elastic_fails_before_the_run(cluster, tmp_path):
    faults = [{"kind": "kill_worker", "step": 2, "rank": 2}]
    with pytest.raises(ValueError, match="names rank 2.*parallel.world_size 2"):
        run(cluster, group_config(tmp_path, faults))
    config = group_config(tmp_path)
    config.cluster.elastic = True
    with pytest.raises(ValueError, match="cluster.elastic: true is not supported"):
        run(cluster, config)


def test_both_nodes_lost_fall_back_to_the_durable_tier(cluster, clean, tmp_path):
    """More losses than parity: the controller restarts the group on two spares from the
    newest durable checkpoint, the driver rewinds the pipeline to it, and the lost steps are
    trained again (bit for bit, with k = 0). Removes two nodes of the module's cluster."""
    faults = [
        {"kind": "kill_node", "step": 5, "node": 0},
        {"kind": "kill_node", "step": 5, "node": 1},
    ]
    record = run(cluster, group_config(tmp_path, faults))
    recovery = learner_recovery(record)
    assert recovery["failure"] == "node"
    assert recovery["source"] == "durable"
    assert recovery["restored_version"] == 4
    assert recovery["steps_lost"] >= 1
    assert record["num_learner_steps"] == STEPS
    assert record["final_weights_xxh64"] == clean["final_weights_xxh64"]


def test_lost_node_is_rebuilt_from_parity_on_the_spare(cluster, clean, tmp_path):
    """Runs last: it removes a node of the module's cluster."""
    faults = [{"kind": "kill_node", "step": 4, "node": 1}]
    record = run(cluster, group_config(tmp_path, faults))
    recovery = learner_recovery(record)
    assert recovery["failure"] == "node"
    assert recovery["source"] == "erasure"
    assert 2 <= recovery["restored_version"] <= 4
    assert record["num_learner_steps"] == STEPS
    assert record["final_weights_xxh64"] == clean["final_weights_xxh64"]
