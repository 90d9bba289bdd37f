"""A frozen manager commits nothing until the controller resumes it (no Ray needed)."""

from stalwart.snapshot.manager import SnapshotManager


def _manager(job_id="freeze", parity=0):
    return SnapshotManager(
        job_id=job_id,
        position=0,
        positions=[0, 1],
        ranks=[0],
        group_size=2,
        parity=parity,
        run_dir="/tmp/unused",
    )


def test_ready_versions_do_not_commit_while_frozen():
    manager = _manager()
    try:
        manager.ready(1, 0, {})
        manager.ready(1, 1, {})
        assert manager.committed == 1
        assert manager.freeze()["committed"] == 1
        # A version whose last ready message lands after the freeze must not commit (and so
        # must not release version 1, which the controller may be restoring).
        manager.ready(2, 0, {})
        manager.ready(2, 1, {})
        assert manager.committed == 1 and 1 in manager.versions
        manager.resume_at(1)
        assert not manager.frozen
        manager.ready(3, 0, {})
        manager.ready(3, 1, {})
        assert manager.committed == 3
    finally:
        manager.shutdown()


def test_a_dropped_versions_late_encode_leaves_the_next_attempts_version_alone(monkeypatch):
    """A recovery drops the dead attempt's uncommitted versions while one is still encoding.
    The new attempt publishes the same version number again. When the stale encode then fails
    (its peers dropped their copies too), it must not mark the new version failed, and it
    must not announce it either."""
    import json
    import threading
    import time

    from stalwart.snapshot import manager as manager_module

    release = threading.Event()
    calls = []

    def parity(layout, position, shards, *, version, **kwargs):
        calls.append(version)
        if len(calls) == 1:  # the dead attempt's encode: still running at the recovery
            assert release.wait(10)
            raise KeyError("position 1 has no complete copy of version 4")
        return {}

    monkeypatch.setattr(manager_module, "compute_parity", parity)
    # Erasure-coded fragments, not replica parity (which would ask peers this test lacks).
    monkeypatch.setattr(
        manager_module.SnapshotManager, "_replica_parity", lambda self, version, state: None
    )
    manager = _manager("stale", parity=1)
    layout = json.dumps({"entries": [], "total_bytes": 0})
    try:
        manager.ready(2, 0, {})
        manager.ready(2, 1, {})
        manager.publish(0, 4, 0, layout, [])  # the dead attempt's version 4 starts encoding
        deadline = time.monotonic() + 10
        while not calls:
            assert time.monotonic() < deadline, "the first encode never started"
            release.wait(0.01)
        manager.resume_at(2)  # the recovery restores version 2 and drops 4
        manager.publish(0, 4, 1, layout, [])  # the new attempt's version 4
        release.set()
        manager.encoder.submit(lambda: None).result(10)  # both encodes finished
        assert calls == [4, 4]
        assert manager.versions[4].failed is None
        assert not [e for e in manager.events if e.get("version") == 4]
        assert manager.versions[4].ready_positions == {0}  # announced once, by the new encode
        manager.ready(4, 1, {})
        assert manager.committed == 4
    finally:
        manager.shutdown()


def test_a_wait_for_a_version_of_the_dead_attempt_ends_at_the_recovery():
    """A peer encoding a version the killed rank never published waits here for this node's
    copy. The recovery's `resume_at` must end that wait at once: for wait_timeout_s the peer's
    encoder would otherwise hold every version of the restarted job back from committing."""
    import threading
    import time

    import pytest

    manager = _manager(job_id="epoch")
    manager.wait_timeout_s = 30.0
    outcome = {}

    def wait_for_version_4():
        started = time.monotonic()
        try:
            manager.local_meta(4)
        except KeyError as error:
            outcome["error"] = str(error)
        outcome["waited_s"] = time.monotonic() - started

    try:
        waiter = threading.Thread(target=wait_for_version_4)
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive()  # version 4 is not here: the wait goes on
        manager.resume_at(2)
        waiter.join(5.0)
        assert not waiter.is_alive()
        assert "abandoned" in outcome["error"] and outcome["waited_s"] < 5.0, outcome
        with pytest.raises(KeyError, match="no complete copy"):  # a new wait runs its course
            manager.wait_timeout_s = 0.2
            manager.local_meta(4)
    finally:
        manager.shutdown()


class _SilentPeer:
    """A manager on a lost node: calls are sent and never answered."""

    def __init__(self, name: str):
        self._actor_id = name
        peer = self

        class _Method:
            def remote(self, *args):
                return ("call", peer._actor_id, args)

        self.take_persist_copy = _Method()


def _silent_ray(monkeypatch):
    import time
    import types

    from stalwart.snapshot import manager as manager_module

    def wait(refs, timeout=None, **_):
        time.sleep(timeout or 0)
        return [], list(refs)

    def get(_ref, **_):
        raise AssertionError("nothing is ever ready")

    monkeypatch.setattr(manager_module, "ray", types.SimpleNamespace(wait=wait, get=get))


def _persist_in_background(manager):
    import threading

    import numpy as np

    manager.persist_copies[5] = {0: (np.zeros(4, dtype=np.uint8), "{}")}
    rank_meta = {0: {"position": 0}, 1: {"position": 1}}
    thread = threading.Thread(target=manager._persist, args=(5, rank_meta), daemon=True)
    thread.start()
    return thread


def test_a_durable_write_waiting_on_a_replaced_peer_gives_up(monkeypatch):
    """A durable write gathers every position's copy of its version. When the node of one of
    them is lost mid-gather, the controller wires a replacement manager in; the write then
    gives up at once instead of holding the persister thread (and with it every later durable
    write and the recovery's `settle_durable`, which waited 60 s and then stopped the surviving
    manager)."""
    import time

    _silent_ray(monkeypatch)
    manager = _manager()
    try:
        manager.set_peers({1: _SilentPeer("lost")})
        thread = _persist_in_background(manager)
        time.sleep(0.5)
        assert thread.is_alive(), "the write waits for the peer while it is the current one"
        manager.set_peers({1: _SilentPeer("replacement")})
        thread.join(2.0)
        assert not thread.is_alive()
        errors = [event["persist_error"] for event in manager.events if "persist_error" in event]
        assert errors and "replaced" in errors[0], manager.events
        started = time.monotonic()
        assert manager.settle_durable(5.0)
        assert time.monotonic() - started < 1.0
    finally:
        manager.shutdown()


def test_a_durable_write_waiting_on_a_silent_peer_gives_up_after_the_wait_timeout(monkeypatch):
    _silent_ray(monkeypatch)
    manager = _manager()
    manager.wait_timeout_s = 0.5
    try:
        manager.set_peers({1: _SilentPeer("silent")})
        thread = _persist_in_background(manager)
        thread.join(3.0)
        assert not thread.is_alive()
        errors = [event["persist_error"] for event in manager.events if "persist_error" in event]
        assert errors and "did not answer" in errors[0], manager.events
    finally:
        manager.shutdown()
