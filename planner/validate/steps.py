"""Suites `fake` and `cpu`: one training step measured by the tracker, next to the planner.

fake — `profiler.fake.fake_step`: a real HF step of a full-size model under FakeTensorMode
       (exact allocated bytes of the HF code path on CPU kernels, nothing allocated).
cpu  — the same step on real CPU tensors of small models (`profiler.fake.cpu_step`, the
       same `PhaseMemTracker`); on a tiny model both agree to the byte (tests/test_fake.py).

What is compared (measured ← tracker phase peaks, predicted ← `MemoryEstimate`):

=============  ==========================================  =====================================
metric         measured                                    predicted
=============  ==========================================  =====================================
parameters     "parameter" bytes (all weights, adapters)   parameters
gradients      largest "gradient" bytes over the phases    gradients
               (all `.grad` alive at the optimizer step)
optimizer      "optimizer" bytes carried into forward      optimizer + master_weights
               (steady-state states, not step scratch)
activations    "activation" bytes at the forward peak      forward-phase peak − the states alive in
               (saved tensors + loss transients)           forward (see `predicted_forward_activations`)
peak           max over phases of the tracked total        peak_allocated
=============  ==========================================  =====================================

A case may skip a metric (`skip: {metric: reason}` in tables/validate_cases.yaml) when the
oracle is known to misreport it; the skipped metric is listed as excluded with the reason.

Torch is imported only when a case runs (inside profiler.fake).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

from planner.validate.cases import StepCase, step_cases
from planner.validate.core import Comparison, SuiteResult

STEP_METRICS = ("parameters", "gradients", "optimizer", "activations", "peak")

SOURCES = {
    "fake": "profiler.fake.fake_step (FakeTensorMode + PhaseMemTracker)",
    "cpu": "profiler.fake.cpu_step (real CPU tensors + PhaseMemTracker)",
}


def measured_metrics(result: Any) -> dict[str, float]:
    """The five measured numbers of a `FakeStepResult` (bytes)."""
    phases = result.phase_peaks
    fwd = phases.get("forward", {})
    return {
        "parameters": max(p.get("parameter", 0) for p in phases.values()),
        "gradients": max(p.get("gradient", 0) for p in phases.values()),
        "optimizer": fwd.get("optimizer", 0),
        "activations": fwd.get("activation", 0),
        "peak": result.peak_bytes,
    }


def predicted_forward_activations(est: Any) -> float:
    """Activation-category bytes at the forward peak, as the memory model sees them.

    The forward peak is at the loss: every layer's saved tensors plus the logits / CE
    transient of the forward pass. When the estimate reports per-phase peaks, that is the
    forward phase peak minus what else is alive in forward (weights, optimizer states,
    fp32 master weights, framework buffers, and gradients — zero in forward with one
    micro-batch per step); otherwise activations + logits.
    """
    fwd = (getattr(est, "phase_peaks", None) or {}).get("forward")
    if fwd:
        return fwd - (est.parameters + est.optimizer + est.master_weights + est.buffers)
    return est.activations + est.logits


def predicted_metrics(est: Any) -> dict[str, float]:
    return {
        "parameters": est.parameters,
        "gradients": est.gradients,
        "optimizer": est.optimizer + est.master_weights,
        "activations": predicted_forward_activations(est),
        "peak": est.peak_allocated,
    }


def _oracle(suite: str) -> Callable[..., Any]:
    from profiler import fake

    return fake.fake_step if suite == "fake" else fake.cpu_step


def _estimate(case: StepCase) -> Any:
    from planner.memory import estimate_memory

    return estimate_memory(case.spec(), case.train_config())


def run_case(case: StepCase) -> tuple[list[Comparison], float]:
    """Measure and predict one case: (comparisons, seconds)."""
    t0 = time.perf_counter()
    est = _estimate(case)  # first: a planner error should not wait for the oracle
    result = _oracle(case.suite)(case.hf_config(), **case.oracle_kwargs())
    meas, pred = measured_metrics(result), predicted_metrics(est)
    rows = [Comparison(case=case.id, suite=case.suite, metric=m, measured=float(meas[m]), predicted=float(pred[m]),
                       unit="bytes", source=SOURCES[case.suite], note=case.note)
            for m in STEP_METRICS if m not in case.skip]
    return rows, time.perf_counter() - t0


def run_suite(suite: str, selection: str, *, case_filter: str | None = None, cases_file: str | None = None,
              progress: Callable[[str], None] | None = None) -> SuiteResult:
    res = SuiteResult(name=suite)
    t0 = time.perf_counter()
    cases = step_cases(suite, selection, cases_file)
    if case_filter:
        cases = [c for c in cases if case_filter.lower() in c.id.lower()]
    n = len(cases)
    for i, case in enumerate(cases, 1):
        if progress:
            progress(f"[{suite} {i}/{n}] {case.id}")
        try:
            rows, secs = run_case(case)
        except Exception as exc:  # one broken case is reported, the others still run
            res.errors.append(f"{case.id}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            continue
        res.rows.extend(rows)
        res.excluded.extend((f"{case.id} / {m}", why) for m, why in case.skip.items())
        res.timings[case.id] = secs
        if progress:
            progress(f"    {secs:5.1f} s")
    res.seconds = time.perf_counter() - t0
    if not cases:
        res.messages.append("no cases selected")
    return res


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
