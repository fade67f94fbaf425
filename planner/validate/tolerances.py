"""Tolerances (tables/tolerances.yaml) and the pass/fail decision of each suite.

A suite passes when every metric it compared, and the suite as a whole ("all"), has a
median and a max absolute relative error at or under its tolerance. A metric without a
tolerance fails (an unchecked number must not pass silently); a suite with no rows is
"NO ROWS", never "PASS"; a suite with a case that could not run is "ERROR".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from planner.errors import PlanError
from planner.model import TABLES
from planner.validate.core import (ERROR, FAIL, NO_ROWS, NO_TOLERANCE, PASS, Stat, SuiteResult,
                                   metrics_in_order, summarise)

TOLERANCES_FILE = TABLES / "tolerances.yaml"


def load_tolerances(path: str | Path | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{suite: {metric or "all": {"median": f, "max": f}}}."""
    import yaml

    p = Path(path) if path else TOLERANCES_FILE
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except OSError as exc:
        raise PlanError(f"{p}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise PlanError(f"{p}: malformed YAML ({' '.join(str(exc).split())})") from None
    out: dict[str, dict[str, dict[str, float]]] = {}
    for suite, metrics in data.items():
        if suite.startswith("_") or not isinstance(metrics, dict):
            continue
        out[suite] = {}
        for metric, tol in metrics.items():
            if metric.startswith("_"):
                continue
            if not isinstance(tol, dict) or "median" not in tol or "max" not in tol:
                raise PlanError(f"{p}: {suite}.{metric} needs 'median' and 'max' (fractions)")
            out[suite][metric] = {"median": float(tol["median"]), "max": float(tol["max"])}
    return out


def _tol(tols: dict[str, Any], suite: str, metric: str) -> tuple[float | None, float | None]:
    t = tols.get(suite, {}).get(metric)
    return (t["median"], t["max"]) if t else (None, None)


def judge(result: SuiteResult, tols: dict[str, Any]) -> SuiteResult:
    """Fill `result.stats` and `result.status`."""
    rows = result.rows
    stats: list[Stat] = []
    for metric in metrics_in_order(rows):
        group = [r for r in rows if r.metric == metric]
        med, mx, worst = summarise(group)
        stats.append(Stat(result.name, metric, len(group), med, mx, *_tol(tols, result.name, metric), worst))
    if rows:
        med, mx, worst = summarise(rows)
        stats.append(Stat(result.name, "all", len(rows), med, mx, *_tol(tols, result.name, "all"), worst))
    result.stats = stats
    if result.errors:
        result.status = ERROR
    elif not rows:
        result.status = NO_ROWS
    elif any(s.tol_median is None for s in stats):
        result.status = NO_TOLERANCE
    elif all(s.ok for s in stats):
        result.status = PASS
    else:
        result.status = FAIL
    return result


def failing(status: str) -> bool:
    """Statuses that make `validate` exit 1 (NO ROWS is reported, but is not a failure)."""
    return status in (FAIL, ERROR, NO_TOLERANCE)
