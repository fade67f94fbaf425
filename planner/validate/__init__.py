"""`tuneplan validate`: the planner's accuracy as numbers CI computes on every submission.

Four suites, each a source of measurements that shares no code with the formulas:

- fake       full-scale fake-tensor steps (profiler.fake), run now, every time;
- cpu        real CPU steps of small models, same tracker;
- gpu        rows recorded on real GPUs in tables/measured/ (NO ROWS until a GPU session);
- published  rows of tables/published.csv whose configuration is known well enough.

`run()` returns a `Report`; the exit code is 1 when any suite fails its tolerance
(tables/tolerances.yaml) or cannot run a case, 0 otherwise. Nothing here imports torch
until a fake / cpu case runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from planner.errors import PlanError
from planner.validate.core import Comparison, Stat, SuiteResult
from planner.validate.tolerances import failing, judge, load_tolerances

SUITES = ("fake", "cpu", "gpu", "published")
SELECTIONS = ("quick", "full")


@dataclass
class Report:
    selection: str
    suites: list[SuiteResult]
    seconds: float
    sensitivity: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if any(failing(s.status) for s in self.suites) else 0

    @property
    def verdict(self) -> str:
        """FAIL if any suite fails; PASS if at least one suite passed; NO ROWS if none had rows."""
        if self.exit_code:
            return "FAIL"
        return "PASS" if any(s.status == "PASS" for s in self.suites) else "NO ROWS"

    @property
    def rows(self) -> list[Comparison]:
        return [r for s in self.suites for r in s.rows]

    def to_json(self) -> dict[str, Any]:
        return {"selection": self.selection, "exit_code": self.exit_code, "verdict": self.verdict,
                "seconds": round(self.seconds, 2),
                "suites": {s.name: s.to_json() for s in self.suites},
                "sensitivity": self.sensitivity}


def parse_only(only: str | None) -> tuple[str, ...]:
    if not only:
        return SUITES
    names = tuple(x.strip().lower() for x in only.split(",") if x.strip())
    bad = [n for n in names if n not in SUITES]
    if bad:
        raise PlanError(f"--only: unknown suite {', '.join(bad)} (choose from {', '.join(SUITES)})")
    return names


def run_suite(name: str, selection: str, *, case_filter: str | None = None, cases_file: str | None = None,
              progress: Callable[[str], None] | None = None) -> SuiteResult:
    if name in ("fake", "cpu"):
        from planner.validate import steps
        return steps.run_suite(name, selection, case_filter=case_filter, cases_file=cases_file, progress=progress)
    if name == "gpu":
        from planner.validate import gpu
        return gpu.run_suite(case_filter=case_filter)
    if name == "published":
        from planner.validate import published
        return published.run_suite(case_filter=case_filter, cases_file=cases_file)
    raise PlanError(f"unknown suite {name!r}")


def run(selection: str = "quick", only: str | None = None, *, case_filter: str | None = None,
        cases_file: str | None = None, tolerances_file: str | None = None, sensitivity: bool = True,
        progress: Callable[[str], None] | None = None) -> Report:
    if selection not in SELECTIONS:
        raise PlanError(f"--suite must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    names = parse_only(only)
    tols = load_tolerances(tolerances_file)
    t0 = time.perf_counter()
    results: list[SuiteResult] = []
    # cheap suites first: a broken planner shows in seconds, before the fake steps run
    for name in sorted(names, key=lambda n: ("published", "gpu", "cpu", "fake").index(n)):
        t = time.perf_counter()
        try:
            res = run_suite(name, selection, case_filter=case_filter, cases_file=cases_file, progress=progress)
        except PlanError:
            raise
        except Exception as exc:  # a suite that cannot run at all is an ERROR, not a crash
            res = SuiteResult(name=name, errors=[f"suite failed: {type(exc).__name__}: {exc}"])
        res.seconds = res.seconds or (time.perf_counter() - t)
        results.append(judge(res, tols))
    results.sort(key=lambda r: SUITES.index(r.name))
    report = Report(selection, results, time.perf_counter() - t0)
    if sensitivity:
        from planner.validate.sensitivity import constant_effects
        try:
            report.sensitivity = constant_effects(report, tols, cases_file=cases_file)
        except Exception as exc:  # informative only: never changes the verdict
            report.sensitivity = [{"constant": "(sensitivity failed)", "error": f"{type(exc).__name__}: {exc}"}]
    return report


__all__ = ["run", "Report", "SUITES", "SELECTIONS", "Comparison", "Stat", "SuiteResult"]
