"""Fit tuneplan's calibration constants over whole suites (never per row) and report how
much each one moves the error.

    python tables/fit_calibration.py            # fit, print the report, write nothing
    python tables/fit_calibration.py --write    # also write the fitted values to the tables

What is fitted, and over which suite:
  1. throughput (published suite): the MFU table per (GPU class, method, sequence
     bucket), the collective efficiency and the torch.compile speed-up — by
     tables/fit_mfu.py, which this script drives (`--check` unless --write).
  2. memory (gpu suite, tables/measured/*.csv rows recorded on GPUs):
     - fragmentation_fraction per method = median over that method's rows of
       (measured reserved − measured allocated) / measured allocated; low / high = the
       smallest / largest row. Measured against measured, so errors of the activation
       model do not leak into the allocator constant.
     - cuda_context_bytes = median over single-GPU rows of (NVML used − torch reserved)
       − cublas_workspace_bytes (the workspace is modelled separately); low / high = range.
     - nccl_bytes_per_gpu = median over multi-GPU rows of (NVML used − reserved) − context
       − workspace.
     Needs ≥ 3 rows per constant; otherwise the prior stays and the report says so.
  The fake and cpu suites compare allocated bytes, which no calibration constant touches:
  nothing is fitted on them.

Then the report: for every constant, the median / max |error| of each suite it affects
with the fitted value against the value currently in the table (and, via `tuneplan
validate`, against its neutral reference).
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TABLES = Path(__file__).resolve().parent
CALIBRATION = TABLES / "calibration.yaml"
MIN_ROWS = 3


# ------------------------------------------------------------------------------ memory fits
def fit_memory(directory: Path | None = None) -> tuple[dict[str, dict], list[str]]:
    """{constant: new entry} from the gpu suite's rows, and a log of what was (not) fitted."""
    from planner.memory.overhead import calibration_value
    from planner.validate.gpu import gpu_rows

    log: list[str] = []
    rows = [g for g in gpu_rows(directory) if g.status in ("ok", "done", "success", "passed", "")]
    if not rows:
        return {}, ["memory: no GPU rows in tables/measured/: cuda_context, cuBLAS, NCCL and fragmentation "
                    "stay priors"]
    out: dict[str, dict] = {}
    # fragmentation per method
    frag: dict[str, list[float]] = {}
    for g in rows:
        a, r = g.measured.get("peak_allocated"), g.measured.get("peak_reserved")
        if a and r:
            method = (g.row.get("method") or "full").strip().lower()
            frag.setdefault(method, []).append((r - a) / a)
    fitted = {}
    for method, vals in sorted(frag.items()):
        if len(vals) < MIN_ROWS:
            log.append(f"memory: fragmentation_fraction.{method}: {len(vals)} row(s) < {MIN_ROWS}, prior kept")
            continue
        fitted[method] = {"value": round(statistics.median(vals), 4), "low": round(min(vals), 4),
                          "high": round(max(vals), 4), "n": len(vals)}
        log.append(f"memory: fragmentation_fraction.{method} = {fitted[method]['value']:.3f} "
                   f"(median of {len(vals)} rows, range {min(vals):.3f}-{max(vals):.3f})")
    if fitted:
        out["fragmentation_fraction"] = fitted
    # context (single GPU) and NCCL (multi GPU)
    cublas = int(calibration_value("cublas_workspace_bytes"))
    single, multi = [], []
    for g in rows:
        d, r = g.measured.get("peak_device"), g.measured.get("peak_reserved")
        if not (d and r):
            continue
        world = int(float(g.row.get("gpus") or 1)) * int(float(g.row.get("nodes") or 1))
        (single if world == 1 else multi).append(d - r)
    if len(single) >= MIN_ROWS:
        ctx = [x - cublas for x in single]
        out["cuda_context_bytes"] = {"value": int(statistics.median(ctx)), "low": int(min(ctx)),
                                     "high": int(max(ctx)), "n": len(ctx)}
        log.append(f"memory: cuda_context_bytes = {statistics.median(ctx) / 2**20:.0f} MiB (median of {len(ctx)} rows)")
    else:
        log.append(f"memory: cuda_context_bytes: {len(single)} single-GPU row(s) with NVML + reserved < {MIN_ROWS}, "
                   "prior kept")
    if len(multi) >= MIN_ROWS:
        ctx = out.get("cuda_context_bytes", {}).get("value", int(calibration_value("cuda_context_bytes")))
        nccl = [x - cublas - ctx for x in multi]
        out["nccl_bytes_per_gpu"] = {"value": int(statistics.median(nccl)), "low": int(min(nccl)),
                                     "high": int(max(nccl)), "n": len(nccl)}
        log.append(f"memory: nccl_bytes_per_gpu = {statistics.median(nccl) / 2**20:.0f} MiB (median of {len(nccl)} rows)")
    else:
        log.append(f"memory: nccl_bytes_per_gpu: {len(multi)} multi-GPU row(s) < {MIN_ROWS}, prior kept")
    return out, log


def write_memory(fits: dict[str, dict], source: str) -> None:
    """Edit calibration.yaml in place (comments kept): the value/low/high of each fitted entry."""
    text = CALIBRATION.read_text()
    for key, entry in fits.items():
        if key == "fragmentation_fraction":
            for method, e in entry.items():
                pat = re.compile(rf"^(\s+{re.escape(method)}:\s*)\{{[^}}]*\}}", re.M)
                block_start = text.index("fragmentation_fraction:")
                m = pat.search(text, block_start)
                if m:
                    text = text[:m.start()] + f"{m.group(1)}{{value: {e['value']}, low: {e['low']}, high: {e['high']}}}" \
                        + text[m.end():]
            continue
        start = text.index(f"  {key}:")
        for field in ("value", "low", "high"):
            pat = re.compile(rf"^(\s+{field}:\s*)(\S+)", re.M)
            m = pat.search(text, start)
            if m and m.start() < text.find("\n  ", text.index("\n", start) + 1) + 10_000:
                text = text[:m.start()] + f"{m.group(1)}{entry[field]}" + text[m.end():]
    text = text.rstrip() + f"\n# fitted by tables/fit_calibration.py --write: {source}\n"
    CALIBRATION.write_text(text)


# ------------------------------------------------------------------------------ report
def _suite_errors(names: tuple[str, ...]) -> dict[tuple[str, str], tuple[float, float, int]]:
    from planner.validate import run

    rep = run("full", ",".join(names), sensitivity=False)
    return {(s.suite, s.metric): (s.median, s.max, s.n) for r in rep.suites for s in r.stats}


def _print_delta(title: str, before: dict, after: dict) -> None:
    print(title)
    keys = sorted(set(before) | set(after))
    if not keys:
        print("  (no rows)")
    for k in keys:
        b, a = before.get(k), after.get(k)
        fmt = lambda x: "—" if x is None else f"median {x[0]:6.1%} max {x[1]:6.1%} (n={x[2]})"  # noqa: E731
        print(f"  {k[0]:>10s}/{k[1]:<16s} before: {fmt(b)}   after: {fmt(a)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="write fitted values into the tables")
    ap.add_argument("--skip-throughput", action="store_true", help="do not run tables/fit_mfu.py")
    args = ap.parse_args(argv)

    before = _suite_errors(("gpu", "published"))

    # 1. throughput: tables/fit_mfu.py over the published suite
    if not args.skip_throughput:
        from tables import fit_mfu
        print("== throughput: tables/fit_mfu.py" + ("" if args.write else " --check"))
        fit_mfu.main([] if args.write else ["--check"])
        if args.write:
            from planner import throughput
            for fn in ("mfu_table", "priors", "_cell", "_param_sets_cached"):
                f = getattr(throughput, fn, None)
                if hasattr(f, "cache_clear"):
                    f.cache_clear()

    # 2. memory: the gpu suite
    print("== memory: gpu suite (tables/measured/)")
    fits, log = fit_memory()
    for line in log:
        print("  " + line)
    if fits and args.write:
        from planner.memory import overhead
        write_memory(fits, "gpu suite rows in tables/measured/")
        overhead.memory_calibration.cache_clear()
    elif fits:
        print("  (not written: pass --write)")

    after = _suite_errors(("gpu", "published")) if args.write else before
    _print_delta("== error of the suites the constants touch (before → after this fit)", before, after)
    print("`tuneplan validate` shows, per constant, the error with the table's value vs its neutral reference.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
