"""Smoke run of bench/snapshot.py: the JSON carries every figure, each of them plausible."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "snapshot.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_snapshot", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_small_run_writes_sane_figures(tmp_path):
    out = tmp_path / "snapshot.json"
    load_bench().main(["--small", "--json", str(out), "--work-dir", str(tmp_path / "work")])
    figures = json.loads(out.read_text())
    for key in (
        "snapshot_overhead_ratio",
        "stall_ratio_vs_torch_save",
        "stall_ratio_vs_dcp_async",
        "restore_speedup_vs_durable",
        "ec_encode_fraction_of_zfec",
    ):
        assert math.isfinite(figures[key]) and figures[key] > 0, (key, figures[key])
    # The tiny model has a few thousand parameters per block and an embedding of 259 x 64.
    assert 10_000 < figures["num_params"] < 1_000_000
    for mode in ("none", "memory", "torch_save", "dcp_async"):
        assert figures["step_s"][mode] > 0
    assert figures["blocking_s"]["none"] == 0.0
    assert figures["blocking_s"]["memory"] > 0 and figures["blocking_s"]["torch_save"] > 0
    # A step with snapshots cannot be cheaper than its own blocking time.
    assert figures["step_s"]["torch_save"] >= figures["blocking_s"]["torch_save"]
    assert figures["restore_memory_s"] > 0 and figures["restore_durable_s"] > 0
    assert figures["durable_files_evicted"] >= 1
    # Each restore sample carries its parts, which add up to no more than its total.
    for kind in ("memory", "durable"):
        for sample in figures["restore_parts_s"][kind]:
            parts = sum(value for key, value in sample.items() if key != "total_s")
            assert 0 < parts <= sample["total_s"] + 1e-6, (kind, sample)
    assert figures["shm"]["path"]
    assert 0 < figures["ec_encode"]["job"]["fraction_of_zfec"] < 10
