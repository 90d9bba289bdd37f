"""`python -m stalwart.erasure`: parity-encode throughput of our path vs raw zfec, side by side.

Prints one table row per (k, m, threads) and, with ``--json FILE``, writes the rows as one
JSON object. Both paths encode the same random shards in the same run, alternately.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from stalwart.erasure.codec import measure_encode_throughput


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stalwart.erasure", description=__doc__)
    parser.add_argument("--shard-mib", type=int, default=32, help="size of each shard in MiB")
    parser.add_argument("--num-shards", type=int, default=2)
    parser.add_argument("--codes", default="2:1,4:1,4:2,6:2", help="comma-separated k:m pairs")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts for ours")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_path", help="write the measured rows to this file")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    shard_nbytes = args.shard_mib << 20
    buffers = [rng.integers(0, 256, shard_nbytes, dtype=np.uint8) for _ in range(args.num_shards)]
    codes = [tuple(int(x) for x in pair.split(":")) for pair in args.codes.split(",")]
    thread_counts = [int(x) for x in args.threads.split(",")]

    rows = []
    print(
        f"{args.num_shards} shards x {args.shard_mib} MiB, best of {args.repeats}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'k':>3} {'m':>3} {'threads':>7} {'ours GB/s':>10} {'zfec GB/s':>10} {'ours/zfec':>10}"
        f" {'ours GB/cpu-s':>14} {'zfec GB/cpu-s':>14} {'cpu ratio':>10}"
    )
    for k, m in codes:
        for num_threads in thread_counts:
            row = measure_encode_throughput(
                buffers, k, m, num_repeats=args.repeats, num_threads=num_threads
            )
            rows.append(row)
            print(
                f"{k:>3} {m:>3} {num_threads:>7} {row['ours_bytes_per_s'] / 1e9:>10.3f} "
                f"{row['zfec_bytes_per_s'] / 1e9:>10.3f} {row['fraction_of_zfec']:>10.2f}"
                f" {row['ours_bytes_per_cpu_s'] / 1e9:>14.3f} {row['zfec_bytes_per_cpu_s'] / 1e9:>14.3f}"
                f" {row['cpu_fraction_of_zfec']:>10.2f}"
            )
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump({"shard_mib": args.shard_mib, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
