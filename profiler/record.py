"""Append measured rows to `tables/measured/<device>.csv` — atomically, with provenance.

One row per profiled configuration. A row names its run (tables/README.md): device name,
GPU preset, driver, CUDA, torch / transformers / peft / deepspeed / bitsandbytes versions,
UTC date, host, and the exact command line. Configuration columns use TrainConfig's field
names (what `TrainConfig.from_mapping` and `tuneplan validate --suite gpu` read); measured
memory is in bytes (`peak_allocated_bytes`, `peak_reserved_bytes`, `nvml_peak_bytes`).

Writing: under an exclusive lock (a lock file in the temp directory), the existing rows are read, the new row
appended (new columns are added at the end; old rows get them empty), everything is
written to a temporary file in the same directory, fsync'ed, and `os.replace`d over the
original — a reader never sees a half-written table, and concurrent writers never lose a
row. `TUNEPLAN_MEASURED_DIR` redirects the directory (tests).
"""
from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

__all__ = ["append_row", "append_measurement", "row_from_measurement", "measured_dir", "file_key", "COLUMNS"]

CONFIG_FIELDS = ("method", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "double_quant",
                 "freeze_trainable_layers", "precision", "optimizer", "zero", "offload", "micro_batch", "grad_accum",
                 "seq_len", "packing", "checkpointing", "attention", "chunked_ce", "compile", "gpus", "nodes")

COLUMNS = (
    "id", "date_utc", "device", "gpu", "gpu_name", "driver", "cuda_version", "torch", "transformers", "peft",
    "deepspeed", "bitsandbytes", "python", "host", "model", "params", "trainable_params",
    *CONFIG_FIELDS,
    "status", "message",
    "peak_allocated_bytes", "peak_reserved_bytes", "nvml_peak_bytes", "nvml_baseline_bytes",
    "forward_peak_allocated_bytes", "backward_peak_allocated_bytes", "optimizer_peak_allocated_bytes",
    "forward_peak_reserved_bytes", "backward_peak_reserved_bytes", "optimizer_peak_reserved_bytes",
    "tracked_peak_bytes", "tracked_peak_phase", "parameter_bytes", "gradient_bytes", "optimizer_bytes",
    "activation_bytes", "quant_state_bytes", "alloc_retries",
    "step_time_s", "tokens_per_step", "tokens_per_s", "mfu", "hfu", "peak_rss_bytes",
    "predicted_peak_allocated_bytes", "predicted_peak_reserved_bytes", "predicted_peak_device_bytes",
    "predicted_tokens_per_s", "out_dir", "command",
)


def measured_dir(directory: str | os.PathLike | None = None) -> Path:
    if directory is not None:
        return Path(directory)
    env = os.environ.get("TUNEPLAN_MEASURED_DIR")
    if env:
        return Path(env)
    from planner.model import TABLES

    return TABLES / "measured"


def file_key(m: dict[str, Any]) -> str:
    """CSV file stem for a run: the GPU preset on cuda (h100-80gb), else cpu / fake."""
    dev = m.get("device", "unknown")
    if dev == "cuda":
        env = m.get("environment") or {}
        g = env.get("gpu") or env.get("device_name") or "cuda"
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(g).lower())
    return str(dev)


def _v(x: Any) -> Any:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, (list, tuple)):
        return ",".join(map(str, x))
    if isinstance(x, float):
        return f"{x:.6g}"
    return x


def row_from_measurement(m: dict[str, Any]) -> dict[str, Any]:
    env = m.get("environment") or {}
    vers = env.get("versions") or {}
    cfg = m.get("config") or {}
    meas = m.get("measured") or {}
    summ = meas.get("summary") or {}
    mem = meas.get("memory") or {}
    cpp = meas.get("cuda_phase_peaks") or {}
    pred = m.get("predicted") or {}
    pgb = pred.get("per_gpu_bytes") or {}
    build = m.get("build") or {}
    run = m.get("run") or {}
    row: dict[str, Any] = {
        "id": Path(str(run.get("out_dir", ""))).name or None, "date_utc": run.get("date_utc"),
        "device": m.get("device"), "gpu": env.get("gpu"), "gpu_name": env.get("device_name"),
        "driver": env.get("driver"), "cuda_version": env.get("cuda_version"),
        "torch": vers.get("torch"), "transformers": vers.get("transformers"), "peft": vers.get("peft"),
        "deepspeed": vers.get("deepspeed"), "bitsandbytes": vers.get("bitsandbytes"), "python": vers.get("python"),
        "host": env.get("hostname"), "model": (m.get("model") or {}).get("name"),
        "params": build.get("total_params") or (m.get("model") or {}).get("params"),
        "trainable_params": build.get("trainable_params"),
        "status": m.get("status"), "message": m.get("message"),
        "peak_allocated_bytes": meas.get("peak_allocated_bytes") if m.get("device") == "cuda" else summ.get("peak_allocated"),
        "peak_reserved_bytes": meas.get("peak_reserved_bytes"),
        "nvml_peak_bytes": (meas["nvml_peak_bytes"] - (meas.get("nvml_baseline_bytes") or 0))
        if meas.get("nvml_peak_bytes") is not None else None,
        "nvml_baseline_bytes": meas.get("nvml_baseline_bytes"),
        "tracked_peak_bytes": mem.get("peak_bytes"), "tracked_peak_phase": mem.get("peak_phase"),
        "parameter_bytes": summ.get("parameters"), "gradient_bytes": summ.get("gradients"),
        "optimizer_bytes": summ.get("optimizer"), "activation_bytes": summ.get("activations"),
        "quant_state_bytes": build.get("quant_state_bytes"), "alloc_retries": meas.get("alloc_retries"),
        "step_time_s": meas.get("step_time_s"), "tokens_per_step": meas.get("tokens_per_step"),
        "tokens_per_s": meas.get("tokens_per_s"), "mfu": meas.get("mfu"), "hfu": meas.get("hfu"),
        "peak_rss_bytes": meas.get("peak_rss_bytes"),
        "predicted_peak_allocated_bytes": pgb.get("peak_allocated"),
        "predicted_peak_reserved_bytes": pgb.get("peak_reserved"),
        "predicted_peak_device_bytes": pgb.get("peak_device"),
        "predicted_tokens_per_s": (pred.get("throughput") or {}).get("tokens_per_s"),
        "out_dir": run.get("out_dir"), "command": run.get("command"),
    }
    for ph in ("forward", "backward", "optimizer"):
        row[f"{ph}_peak_allocated_bytes"] = (cpp.get(ph) or {}).get("allocated")
        row[f"{ph}_peak_reserved_bytes"] = (cpp.get(ph) or {}).get("reserved")
    for f in CONFIG_FIELDS:
        row[f] = cfg.get(f)
    return {k: _v(v) for k, v in row.items()}


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock for `path`, held on a file in the temp dir (nothing left beside the CSV)."""
    import fcntl
    import hashlib

    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    lock = Path(tempfile.gettempdir()) / f"tuneplan-{key}.lock"
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def append_rows(path: str | os.PathLike, rows: Iterable[dict[str, Any]], columns: Iterable[str] = COLUMNS) -> Path:
    """Append `rows` to the CSV at `path` atomically (temp file + os.replace, under a lock)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    with _locked(path):
        old: list[dict[str, str]] = []
        header: list[str] = []
        if path.exists() and path.stat().st_size:
            with path.open(newline="") as fh:
                r = csv.DictReader(fh)
                header = list(r.fieldnames or [])
                old = list(r)
        for col in list(columns) + [k for row in rows for k in row]:
            if col not in header:
                header.append(col)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
                w.writeheader()
                for row in old + rows:
                    w.writerow({k: row.get(k, "") for k in header})
                fh.flush()
                os.fsync(fh.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a table is an ordinary file
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return path


def append_row(device_key: str, row: dict[str, Any], measured_dir_: str | os.PathLike | None = None) -> Path:
    return append_rows(measured_dir(measured_dir_) / f"{device_key}.csv", [row])


def append_measurement(m: dict[str, Any], *, measured_dir: str | os.PathLike | None = None) -> Path:
    """Append the row of one measurements.json to tables/measured/<device>.csv."""
    return append_row(file_key(m), row_from_measurement(m), measured_dir)
