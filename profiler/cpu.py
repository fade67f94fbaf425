"""`--device cpu`: real training steps on CPU tensors (tiny and small models).

Wall time: burn-in steps, then timed steps (nanoGPT bench.py style; CPU work is
synchronous, so `perf_counter` around each step is the step time). Memory: one more step
under `TimelineTracker`, a `PhaseMemTracker` (profiler.tracker, a dispatch-mode
`MemTracker`) that also keeps the per-category total after every op — the timeline — and
the categories at the end of each forward. Tracked bytes are what the step's tensors
hold (exact, by category); the process RSS peak is reported beside them (it includes the
Python heap, libraries and the allocator's cache).
"""
from __future__ import annotations

import resource
import time
from typing import Any, Callable

from profiler.step import PHASES, train_step

__all__ = ["TimelineTracker", "run_cpu", "tracked_step", "timed_steps"]


def TimelineTracker(max_points: int = 200_000):  # noqa: N802 - a class factory (torch imported lazily)
    """A `PhaseMemTracker` that also records the per-category bytes after every op."""
    from profiler.tracker import CATEGORIES, PhaseMemTracker, snapshot_to_categories

    class _TimelineTracker(PhaseMemTracker):
        def __init__(self) -> None:
            super().__init__()
            self.categories = list(CATEGORIES)
            self.points: list[tuple] = []  # (phase index, *category bytes)
            self.phase_marks: list[tuple[str, int]] = []  # (phase, first point index)
            self.end_of_forward: dict[str, int] | None = None
            self.max_points = max_points
            self._phase_index = {p: i for i, p in enumerate(PHASES)}
            self._seen_forward = False

        def _sample(self) -> None:
            if len(self.points) >= self.max_points:
                return
            cats = snapshot_to_categories(self._curr_mem_snap)
            self.points.append((self._phase_index.get(self.phase, -1),) + tuple(cats[c] for c in self.categories))

        def set_phase(self, name):  # noqa: ANN001
            if name == "forward" and self._seen_forward:
                self.reset_mod_stats()  # upstream refuses to see the root module forward twice
            if name == "forward":
                self._seen_forward = True
            if name == "backward" and self.end_of_forward is None:
                self.end_of_forward = snapshot_to_categories(self._curr_mem_snap)
            if name != self.phase or not self.phase_marks:
                self.phase_marks.append((name, len(self.points)))
            super().set_phase(name)

        def _record(self, total: int) -> None:
            # PhaseMemTracker calls _record after every op (its peak bookkeeping): sample there
            super()._record(total)
            self._sample()

        def timeline(self) -> dict[str, Any]:
            """JSON-able: categories, points [[x, phase, bytes...]], phase spans."""
            spans = []
            for i, (name, start) in enumerate(self.phase_marks):
                end = self.phase_marks[i + 1][1] if i + 1 < len(self.phase_marks) else len(self.points)
                if name is not None and end > start:
                    spans.append({"phase": name, "start": start, "end": end})
            return {"categories": self.categories, "phases": list(PHASES),
                    "x_label": "tracked operations (one point per op)",
                    "points": [[i, *p] for i, p in enumerate(self.points)], "spans": spans}

    return _TimelineTracker()


def timed_steps(session, n: int, *, sync: Callable[[], None] = lambda: None,
                on_step: Callable[[int], None] = lambda i: None) -> tuple[list[float], list[float]]:
    """Run `n` steps; (seconds per step, loss per step)."""
    times: list[float] = []
    losses: list[float] = []
    for i in range(n):
        sync()
        t0 = time.perf_counter()
        loss = session.step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss) if loss is not None else float("nan"))
        on_step(i)
    return times, losses


def tracked_step(session, *, external: tuple = ()) -> dict[str, Any]:
    """One step under the timeline tracker: phase peaks, end-of-forward categories, timeline."""
    tracker = TimelineTracker()
    tensors = [t for b in session.batches for t in b.values()]
    ext = [session.built.model]
    opt = session.torch_optimizer()
    if opt is not None:
        ext.append(opt)
    tracker.track_external(*ext, *tensors, *external)
    t0 = time.perf_counter()
    with tracker:
        session.step(phase=tracker.set_phase)
    seconds = time.perf_counter() - t0
    peaks = tracker.phase_peaks
    peak_phase = max((p for p in PHASES if p in peaks), key=lambda p: peaks[p]["total"], default=None)
    return {"phase_peaks": peaks, "peak_phase": peak_phase,
            "peak_bytes": peaks[peak_phase]["total"] if peak_phase else 0,
            "end_of_forward": tracker.end_of_forward or {}, "timeline": tracker.timeline(),
            "seconds": seconds}


def run_cpu(session, *, steps: int, warmup: int, progress=None) -> dict[str, Any]:
    """Burn-in, timed steps, then one tracked step. Returns the measured part of measurements.json."""
    out: dict[str, Any] = {}
    if progress:
        progress.stage("burn-in", warmup)
    burn, _ = timed_steps(session, warmup, on_step=lambda i: progress and progress.advance())
    if progress:
        progress.stage("timed steps", steps)
    times, losses = timed_steps(session, steps, on_step=lambda i: progress and progress.advance())
    if progress:
        progress.stage("memory step (tracked)", 1)
    mem = tracked_step(session)
    if progress:
        progress.advance()
    out.update(burn_in_seconds=burn, step_seconds=times, losses=losses, memory=mem,
               peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return out
