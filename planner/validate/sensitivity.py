"""How much each calibration constant moves the error.

For every constant the planner reads from a calibration table, the suites' predictions are
recomputed (no re-measurement: the measured numbers of this run are reused) with the
constant at a *reference* value, and the median / max |error| of each affected suite and
metric is shown next to the one with the table's value:

- memory constants (tables/calibration.yaml `memory:`): reference 0 for the additive
  terms (CUDA context, cuBLAS workspace, NCCL, fragmentation): "what if the term did not
  exist" — the size of its contribution to each suite's error;
- throughput constants fitted by tables/fit_mfu.py (tables/throughput_fit.csv): reference
  1.0 for the compile speed-up, the nccl-tests prior for the collective efficiency; and the
  MFU table (tables/mfu.csv) against one global MFU (geometric mean of its cells): what the
  per-(GPU class, method, sequence bucket) fit buys over a single constant.

Constants that move no suite of this run are listed once with "no effect".
"""
from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Callable, Iterator

from planner.validate.core import Comparison, summarise

# --------------------------------------------------------------------------- re-prediction


def _repredict(report: Any, cases_file: str | None) -> dict[str, list[Comparison]]:
    """Every suite's rows with predictions recomputed under the current (patched) constants."""
    out: dict[str, list[Comparison]] = {}
    for suite in report.suites:
        if not suite.rows:
            continue
        if suite.name in ("fake", "cpu"):
            from planner.validate import steps
            from planner.validate.cases import step_cases

            by_id = {c.id: c for c in step_cases(suite.name, "full", cases_file)}
            cache: dict[str, dict[str, float]] = {}
            rows = []
            for r in suite.rows:
                if r.case not in cache:
                    cache[r.case] = steps.predicted_metrics(steps._estimate(by_id[r.case]))
                rows.append(_with(r, cache[r.case][r.metric]))
            out[suite.name] = rows
        else:
            from planner.validate import run_suite

            fresh = {(r.case, r.metric): r.predicted for r in run_suite(suite.name, report.selection,
                                                                         cases_file=cases_file).rows}
            out[suite.name] = [_with(r, fresh.get((r.case, r.metric), r.predicted)) for r in suite.rows]
    return out


def _with(r: Comparison, predicted: float) -> Comparison:
    return Comparison(r.case, r.suite, r.metric, r.measured, float(predicted), r.unit, r.source, r.note)


def _effects(report: Any, alt: dict[str, list[Comparison]]) -> list[dict[str, Any]]:
    effects = []
    for suite in report.suites:
        if suite.name not in alt:
            continue
        for metric in dict.fromkeys(r.metric for r in suite.rows):
            base = [r for r in suite.rows if r.metric == metric]
            other = [r for r in alt[suite.name] if r.metric == metric]
            m0, x0, _ = summarise(base)
            m1, x1, _ = summarise(other)
            if abs(m1 - m0) > 1e-4 or abs(x1 - x0) > 1e-4 or \
                    any(abs(a.predicted - b.predicted) > 1e-6 * max(1.0, abs(a.predicted)) for a, b in zip(base, other)):
                effects.append({"suite": suite.name, "metric": metric, "median": m0, "max": x0,
                                "median_ref": m1, "max_ref": x1})
    return effects


# --------------------------------------------------------------------------- patching


@contextlib.contextmanager
def _memory_calibration(changes: dict[str, Any]) -> Iterator[None]:
    """planner.memory.overhead.memory_calibration() returning a modified copy."""
    import copy

    from planner.memory import overhead

    orig = overhead.memory_calibration
    data = copy.deepcopy(orig())
    for key, value in changes.items():
        data[key] = value
    patched = lambda: data  # noqa: E731
    swapped = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("planner.") and getattr(mod, "memory_calibration", None) is orig:
            setattr(mod, "memory_calibration", patched)
            swapped.append(mod)
    try:
        yield
    finally:
        for mod in swapped:
            setattr(mod, "memory_calibration", orig)


def _zero_entry(entry: Any) -> Any:
    if isinstance(entry, dict):
        if "value" in entry:
            return {**entry, "value": 0, "low": 0, "high": 0}
        return {k: _zero_entry(v) if isinstance(v, dict) else v for k, v in entry.items()}
    return 0


def _fmt_entry(entry: Any) -> str:
    if isinstance(entry, dict):
        if "value" in entry:
            v = entry["value"]
            return f"{v / 2**20:.0f} MiB" if isinstance(v, int) and v >= 2**20 else str(v)
        parts = [f"{k} {_fmt_entry(v)}" for k, v in entry.items() if isinstance(v, dict) and "value" in v]
        return ", ".join(parts)
    return str(entry)


@contextlib.contextmanager
def _throughput_params(overrides: dict[str, float] | None = None, mfu: float | None = None) -> Iterator[None]:
    """planner.throughput.estimate_throughput with param_overrides / mfu_override forced."""
    from planner import throughput

    orig = throughput.estimate_throughput

    def patched(*args: Any, **kw: Any) -> Any:
        if overrides:
            kw["param_overrides"] = {**dict(kw.get("param_overrides") or {}), **overrides}
        if mfu is not None:
            kw["mfu_override"] = mfu
        return orig(*args, **kw)

    throughput.estimate_throughput = patched
    try:
        yield
    finally:
        throughput.estimate_throughput = orig


# --------------------------------------------------------------------------- constants

MEMORY_ADDITIVE = ("cuda_context_bytes", "cublas_workspace_bytes", "nccl_bytes_per_gpu", "fragmentation_fraction")


def _throughput_fit() -> dict[str, float]:
    import csv

    from planner.model import TABLES

    path = TABLES / "throughput_fit.csv"
    if not path.is_file():
        return {}
    out = {}
    with path.open(newline="") as fh:
        for r in csv.DictReader(fh):
            try:
                out[r["name"].strip()] = float(r["value"])
            except (KeyError, ValueError):
                continue
    return out


def _global_mfu() -> float | None:
    from planner import throughput

    try:
        cells = throughput.mfu_table()
    except Exception:
        return None
    vals = [c.mfu for c in cells.values() if c.mfu > 0] if cells else []
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None


def constant_effects(report: Any, tols: Any = None, *, cases_file: str | None = None) -> list[dict[str, Any]]:
    if not any(s.rows for s in report.suites):
        return []
    items: list[dict[str, Any]] = []

    def measure(name: str, value: str, reference: str, ctx: Callable[[], Any], source: str) -> None:
        try:
            with ctx():
                alt = _repredict(report, cases_file)
            items.append({"constant": name, "value": value, "reference": reference, "source": source,
                          "effects": _effects(report, alt)})
        except Exception as exc:
            items.append({"constant": name, "error": f"{type(exc).__name__}: {exc}"})

    # memory: calibration.yaml additive terms -> 0
    try:
        from planner.memory import overhead
        cal = overhead.memory_calibration()
    except Exception:
        cal = {}
    for key in MEMORY_ADDITIVE:
        if key in cal:
            measure(f"memory.{key}", _fmt_entry(cal[key]), "0",
                    lambda key=key: _memory_calibration({key: _zero_entry(cal[key])}),
                    "tables/calibration.yaml")

    # throughput: fitted globals and the MFU table
    fit = _throughput_fit()
    refs = {"compile_speedup": 1.0, "comm_efficiency": None}
    try:
        from planner.throughput import priors
        p = priors()
        if "nccl_link_efficiency" in p:
            refs["comm_efficiency"] = float(p["nccl_link_efficiency"][0])
    except Exception:
        pass
    for name, ref in refs.items():
        if name in fit and ref is not None:
            measure(f"throughput.{name}", f"{fit[name]:.3g}", f"{ref:.3g}",
                    lambda name=name, ref=ref: _throughput_params({name: ref}), "tables/throughput_fit.csv")
    g = _global_mfu()
    if g:
        measure("throughput.mfu_table", "per (GPU class, method, seq bucket)", f"one MFU {g:.3f}",
                lambda: _throughput_params(mfu=g), "tables/mfu.csv")
    return items
