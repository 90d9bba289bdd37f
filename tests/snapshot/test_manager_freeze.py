"""A frozen manager commits nothing until the controller resumes it (no Ray needed)."""

from stalwart.snapshot.manager import SnapshotManager


def _manager():
    return SnapshotManager(
        job_id="freeze",
        position=0,
        positions=[0, 1],
        ranks=[0],
        group_size=2,
        parity=0,
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
