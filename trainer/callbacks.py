"""Trainer callbacks: metrics.jsonl, a rich progress bar on stderr, loss.png.

metrics.jsonl — one JSON object per line, written by the global rank-0 process only:

    {"step": 12, "epoch": 0.4, "loss": 5.81, "lr": 4.9e-4, "grad_norm": 1.7,
     "tokens": 3840, "tokens_per_s": 2210.5, "step_time_s": 0.29,
     "peak_mem_bytes": 912345088, "peak_mem_kind": "cpu_rss"}          # a training log
    {"step": 20, "epoch": 0.7, "eval_loss": 5.2}                         # an evaluation

- `loss`, `grad_norm`, `lr` are what HF Trainer logs each `logging_steps` (1 by default here);
  `loss` is the mean over the optimizer step's micro-batches.
- `tokens` = non-padding input tokens of that step over all ranks (Trainer's
  `num_input_tokens_seen` difference); `tokens_per_s` = tokens / time spent inside the
  training steps since the previous log (evaluation and checkpoint saving excluded).
- `peak_mem_bytes`: on CUDA `torch.cuda.max_memory_reserved()` of this rank (with
  `peak_allocated_bytes` = `max_memory_allocated()`); on CPU the process's peak resident set
  size (`ru_maxrss`), which includes the Python interpreter and libraries.

On resume the file is cut back to the rows of steps up to the checkpoint, so an
interrupted + resumed run leaves the same file as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback


def peak_memory() -> dict:
    """This process's peak memory so far (CUDA allocator or CPU RSS)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_mem_bytes": int(torch.cuda.max_memory_reserved()),
                "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
                "peak_mem_kind": "cuda_reserved"}
    import resource

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_mem_bytes": int(rss_kib) * 1024, "peak_mem_kind": "cpu_rss"}


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a kill
                continue
    return rows


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsCallback(TrainerCallback):
    """Write metrics.jsonl; keep per-step timing for tokens/s and the final summary."""

    def __init__(self, path):
        self.path = Path(path)
        self._fh = None
        self._t_step = None
        self._time_since_log = 0.0
        self._tokens_at_log = 0
        self.step_times: list[float] = []
        self.rows: list[dict] = []
        self.train_time = 0.0
        self.train_tokens = 0

    # ---------------------------------------------------------------- lifecycle
    def on_train_begin(self, args, state, control, **kw):
        self._tokens_at_log = state.num_input_tokens_seen or 0
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= state.global_step] if state.global_step else []
        with self.path.open("w") as fh:
            for r in keep:
                fh.write(json.dumps(r) + "\n")
        self.rows = keep
        self._fh = self.path.open("a", buffering=1)

    def on_step_begin(self, args, state, control, **kw):
        self._t_step = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self._t_step is not None:
            dt = time.perf_counter() - self._t_step
            self.step_times.append(dt)
            self._time_since_log += dt
            self.train_time += dt
            self._t_step = None

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        row: dict = {"step": state.global_step}
        if state.epoch is not None:
            row["epoch"] = round(float(state.epoch), 4)
        if "loss" in logs:
            tokens = (state.num_input_tokens_seen or 0) - self._tokens_at_log
            self._tokens_at_log = state.num_input_tokens_seen or 0
            self.train_tokens += tokens
            row.update(loss=_finite(logs["loss"]), lr=logs.get("learning_rate"),
                       grad_norm=_finite(logs.get("grad_norm")), tokens=int(tokens),
                       tokens_per_s=(tokens / self._time_since_log) if self._time_since_log > 0 else None,
                       step_time_s=self._time_since_log)
            row.update(peak_memory())
            self._time_since_log = 0.0
        elif "eval_loss" in logs:
            row["eval_loss"] = _finite(logs["eval_loss"])
        else:
            return
        if state.is_world_process_zero:
            self.rows.append(row)
            if self._fh is not None:
                self._fh.write(json.dumps(row) + "\n")

    def on_train_end(self, args, state, control, **kw):
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class RichProgressCallback(TrainerCallback):
    """A rich progress bar on stderr: step, loss, eval loss, tokens/s, ETA (rank 0 only).

    When stderr is not a terminal (CI logs) it prints one plain line every ~5% of the run.
    """

    def __init__(self, metrics: MetricsCallback | None = None):
        self.metrics = metrics
        self.progress = None
        self.task = None
        self._loss = None
        self._eval = None
        self._tps = None
        self._every = 1
        self._console = None

    def on_train_begin(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._console = Console(stderr=True)
        self._every = max(1, state.max_steps // 20)
        if self._console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self._console, transient=False, refresh_per_second=4)
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                               stats="")

    def _stats(self) -> str:
        parts = []
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4f}")
        if self._eval is not None:
            parts.append(f"eval {self._eval:.4f}")
        if self._tps is not None:
            parts.append(f"{self._tps:,.0f} tok/s")
        return "  ".join(parts)

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero:
            return
        logs = logs or {}
        if "loss" in logs:
            self._loss = logs["loss"]
            if self.metrics is not None and self.metrics.rows and self.metrics.rows[-1].get("tokens_per_s"):
                self._tps = self.metrics.rows[-1]["tokens_per_s"]
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step, stats=self._stats())
            elif self._console is not None and (state.global_step % self._every == 0
                                                or state.global_step in (1, state.max_steps)):
                eta = ""
                if self.metrics is not None and self.metrics.step_times:
                    recent = self.metrics.step_times[-20:]
                    eta = f"  ETA {sum(recent) / len(recent) * (state.max_steps - state.global_step):.0f}s"
                self._console.print(f"step {state.global_step}/{state.max_steps}  {self._stats()}{eta}",
                                    highlight=False)
        if "eval_loss" in logs:
            self._eval = logs["eval_loss"]
            if self.progress is None and self._console is not None:
                self._console.print(f"step {state.global_step}: eval_loss {self._eval:.4f}", highlight=False)

    def on_step_end(self, args, state, control, **kw):
        if state.is_world_process_zero and self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, stats=self._stats())

    def on_train_end(self, args, state, control, **kw):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, stats=self._stats())
            self.progress.stop()
            self.progress = None


def plot_loss(metrics_path, png_path, title: str = "") -> Path | None:
    """loss.png: training loss (and eval loss) against the optimizer step."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        if len(train) >= 30:  # noisy per-step losses: raw faintly, a moving average on top
            ax.plot(steps, losses, lw=0.8, alpha=0.3, color="C0")
            w = max(5, len(train) // 25)
            avg = [sum(losses[max(0, i - w + 1): i + 1]) / len(losses[max(0, i - w + 1): i + 1])
                   for i in range(len(losses))]
            ax.plot(steps, avg, lw=1.8, color="C0", label=f"train loss ({w}-step mean)")
        else:
            ax.plot(steps, losses, lw=1.2, color="C0", label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", color="C1", label="eval loss", lw=1.5, ms=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "tuneplan train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


class LossPlotCallback(TrainerCallback):
    def __init__(self, metrics_path, png_path, title: str = ""):
        self.metrics_path, self.png_path, self.title = metrics_path, png_path, title

    def on_train_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_loss(self.metrics_path, self.png_path, self.title)


def strip_default_printers(trainer) -> None:
    """HF adds a PrinterCallback (dicts on stdout) or a tqdm bar; we have our own on stderr."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)


def is_tty() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
