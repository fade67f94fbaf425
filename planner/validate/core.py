"""The objects every suite produces: one `Comparison` per (case, metric), one `SuiteResult`
per suite, and the statistics the tolerances are checked against.

Relative error is signed, `(predicted - measured) / measured`: positive = the planner
over-predicts (safe side for memory), negative = it under-predicts. Medians and maxima are
taken over the absolute value.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

GiB = 2**30

# suite status words (what the table prints)
PASS, FAIL, NO_ROWS, ERROR, NO_TOLERANCE = "PASS", "FAIL", "NO ROWS", "ERROR", "NO TOLERANCE"


@dataclass(frozen=True)
class Comparison:
    """One measured number next to the planner's prediction of it."""

    case: str
    """Case id (fake / cpu: tables/validate_cases.yaml; gpu: run id; published: row id)."""
    suite: str
    """fake | cpu | gpu | published."""
    metric: str
    """parameters | gradients | optimizer | activations | peak | peak_allocated | peak_reserved |
    memory | throughput ... (the tolerance key)."""
    measured: float
    predicted: float
    unit: str = "bytes"
    """"bytes" (shown in GiB) or e.g. "tokens/s"."""
    source: str = ""
    """Where the measurement comes from (oracle, file, publication)."""
    note: str = ""

    @property
    def rel_error(self) -> float:
        if self.measured == 0:
            return 0.0 if self.predicted == 0 else float("inf")
        return (self.predicted - self.measured) / self.measured

    def to_json(self) -> dict[str, Any]:
        return {"case": self.case, "suite": self.suite, "metric": self.metric, "measured": self.measured,
                "predicted": self.predicted, "unit": self.unit, "rel_error": _finite(self.rel_error),
                "source": self.source, "note": self.note}


def _finite(x: float) -> float | None:
    return None if x != x or x in (float("inf"), float("-inf")) else x


@dataclass(frozen=True)
class Stat:
    """Median / max absolute relative error of one group of comparisons vs its tolerance."""

    suite: str
    metric: str
    """A metric name, or "all" for the whole suite."""
    n: int
    median: float
    max: float
    tol_median: float | None
    tol_max: float | None
    worst_case: str = ""

    @property
    def ok(self) -> bool:
        if self.tol_median is None or self.tol_max is None:
            return False
        return self.median <= self.tol_median and self.max <= self.tol_max

    def to_json(self) -> dict[str, Any]:
        return {"suite": self.suite, "metric": self.metric, "n": self.n, "median": _finite(self.median),
                "max": _finite(self.max), "tolerance_median": self.tol_median, "tolerance_max": self.tol_max,
                "ok": self.ok, "worst_case": self.worst_case}


@dataclass
class SuiteResult:
    """Everything one suite produced."""

    name: str
    rows: list[Comparison] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """Cases that could not be measured or predicted ("case: reason"); any error fails the suite."""
    excluded: list[tuple[str, str]] = field(default_factory=list)
    """(case / row id, why it is not compared)."""
    messages: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per case (measurement + prediction)."""
    seconds: float = 0.0
    stats: list[Stat] = field(default_factory=list)
    status: str = NO_ROWS

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 2),
                "stats": [s.to_json() for s in self.stats], "errors": list(self.errors),
                "excluded": [{"id": i, "why": w} for i, w in self.excluded], "messages": list(self.messages),
                "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
                "rows": [r.to_json() for r in self.rows]}


def abs_errors(rows: list[Comparison]) -> list[float]:
    return [abs(r.rel_error) for r in rows]


def summarise(rows: list[Comparison]) -> tuple[float, float, str]:
    """(median |err|, max |err|, case of the max)."""
    errs = abs_errors(rows)
    if not errs:
        return 0.0, 0.0, ""
    worst = max(rows, key=lambda r: abs(r.rel_error))
    return statistics.median(errs), max(errs), f"{worst.case} ({worst.metric})"


def metrics_in_order(rows: list[Comparison]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r.metric not in seen:
            seen.append(r.metric)
    return seen
