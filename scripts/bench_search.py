"""Benchmark the recommender: `python scripts/bench_search.py [--repeat N]`.

Times planner.search.search (memory model + throughput model for every candidate; no I/O,
no start-up) for the issue-3 case `--model 70b --gpus 8 --nodes 8` and the README case
`--model 7b --gpus 8`, after one warm-up call (table reads, lru caches), best of N
(nanoGPT bench.py style: burn-in, then timed repeats).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.hardware import get_gpu  # noqa: E402
from planner.model import load_model  # noqa: E402
from planner.search import search  # noqa: E402

CASES = [("70b", {"gpus": 8, "nodes": 8}, "h100-80gb"), ("7b", {"gpus": 8}, "h100-80gb"),
         ("8b", {"gpus": 1}, "rtx4090-24gb")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"{'case':28} {'evaluated':>9} {'fitting':>7} {'best s':>7} {'median s':>8} {'us/cand':>8}")
    for name, fixed, gpu in CASES:
        m, g = load_model(name), get_gpu(gpu)
        search(m, fixed, g)  # burn-in
        times, r = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            r = search(m, fixed, g)
            times.append(time.perf_counter() - t0)
        label = f"{name} " + " ".join(f"--{k} {v}" for k, v in fixed.items()) + f" {gpu}"
        print(f"{label:28} {r.evaluated:9d} {r.fitting:7d} {min(times):7.3f} {statistics.median(times):8.3f} "
              f"{min(times) / r.evaluated * 1e6:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
