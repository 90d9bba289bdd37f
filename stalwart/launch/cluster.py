"""Connect to a Ray cluster, or start an embedded one, and name its nodes.

With an address (`--address`, or `RAY_ADDRESS`) we join that cluster. Without one we start an
embedded cluster explicitly (never a bare `ray.init()`, which could join a stale local cluster):
a head node that only hosts the driver's bookkeeping, plus `num_nodes + num_spare_nodes` worker
nodes from `ray.cluster_utils.Cluster`. Every embedded endpoint listens on 127.0.0.1. Removing
one of those nodes is a real node failure: its raylet and every process on it die.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

NODE_RESOURCE = "stalwart_node"


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str
    alive: bool
    num_cpus: float


class ClusterHandle:
    """The Ray cluster a job runs on; `remove_node` exists only for embedded clusters."""

    def __init__(self, cluster=None, embedded_nodes: list | None = None):
        self._cluster = cluster
        self._embedded_nodes = embedded_nodes or []

    @property
    def embedded(self) -> bool:
        return self._cluster is not None

    def nodes(self) -> list[NodeInfo]:
        """Worker-capable nodes in a stable order (embedded: the order they were added)."""
        by_id = {}
        for entry in ray.nodes():
            resources = entry.get("Resources", {})
            if self.embedded and NODE_RESOURCE not in resources and entry["Alive"]:
                continue
            by_id[entry["NodeID"]] = NodeInfo(
                node_id=entry["NodeID"],
                address=entry.get("NodeManagerAddress", "127.0.0.1"),
                alive=bool(entry["Alive"]),
                num_cpus=float(resources.get("CPU", 0.0)),
            )
        if self.embedded:
            ordered = [by_id[n.node_id] for n in self._embedded_nodes if n.node_id in by_id]
            return ordered
        return [node for node in by_id.values() if node.num_cpus > 0]

    def alive_nodes(self) -> list[NodeInfo]:
        return [node for node in self.nodes() if node.alive]

    def remove_node(self, node_id: str) -> None:
        """Kill a simulated node: its raylet, its workers and its snapshot manager."""
        if not self.embedded:
            raise RuntimeError("only nodes of an embedded cluster can be removed")
        for node in self._embedded_nodes:
            if node.node_id == node_id:
                self._cluster.remove_node(node, allow_graceful=False)
                return
        raise ValueError(f"no embedded node {node_id}")

    def add_node(self, num_cpus: float) -> str:
        if not self.embedded:
            raise RuntimeError("only an embedded cluster can grow")
        node = self._cluster.add_node(
            num_cpus=num_cpus, resources={NODE_RESOURCE: 1}, node_ip_address="127.0.0.1"
        )
        self._cluster.wait_for_nodes()
        self._embedded_nodes.append(node)
        return node.node_id

    def shutdown(self) -> None:
        ray.shutdown()
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None


def connect(
    address: str | None = None,
    *,
    num_nodes: int = 1,
    num_spare_nodes: int = 0,
    cpus_per_node: float = 2.0,
    object_store_memory_bytes: int = 512 * 1024**2,
) -> ClusterHandle:
    """Join `address` (or RAY_ADDRESS); without either, start an embedded multi-node cluster."""
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}}
    if address:
        if not ray.is_initialized():
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return ClusterHandle()
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; pass its address instead")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # Keep every endpoint of the embedded cluster on loopback: Ray otherwise rewrites
    # 127.0.0.1 to the machine's outward address when it connects.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # The simulated nodes share one machine's memory: Ray's per-node OOM killer would see the
    # whole machine as one node and kill snapshot managers for memory other processes use.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray_constants.ENABLE_RAY_CLUSTER = False
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "object_store_memory": object_store_memory_bytes,
            # A lost node is noticed within about a second (Ray's default is about 30 s). A
            # check fails on an error (a dead raylet refuses the connection at once) or after
            # health_check_timeout_ms without an answer, and the node is declared dead after
            # 5 failures in a row: a live raylet starved of CPU must stay silent for 5 x 10 s,
            # however short the period.
            "_system_config": {
                "health_check_initial_delay_ms": 1000,
                "health_check_period_ms": 200,
                "health_check_timeout_ms": 10000,
                "health_check_failure_threshold": 5,
            },
        },
    )
    nodes = []
    for _ in range(num_nodes + num_spare_nodes):
        nodes.append(
            cluster.add_node(
                num_cpus=cpus_per_node,
                resources={NODE_RESOURCE: 1},
                node_ip_address="127.0.0.1",
                object_store_memory=object_store_memory_bytes,
            )
        )
    cluster.wait_for_nodes()
    ray.init(
        address=cluster.address,
        runtime_env=runtime_env,
        log_to_driver=True,
        _node_ip_address="127.0.0.1",
    )
    return ClusterHandle(cluster, nodes)
