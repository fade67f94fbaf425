"""Suite `gpu`: rows of tables/measured/*.csv recorded on real GPUs by `profile run --record`.

Each row carries its configuration (tuneplan / HF field names, read by
`TrainConfig.from_mapping`), the model, the GPU and what the run measured. Compared:
peak_allocated (torch.cuda.max_memory_allocated), peak_reserved (max_memory_reserved),
peak_device (NVML used) and throughput (tokens/s) where the row has them. Rows whose run
ended in OOM or failed are listed as excluded, with the planner's fits / does-not-fit verdict.

Empty until a GPU session records rows: the suite then reports NO ROWS (never PASS).
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from planner.model import TABLES
from planner.validate.core import Comparison, GiB, SuiteResult

MEASURED_DIR = TABLES / "measured"

# metric -> accepted column names (bytes, or GiB when the name ends in _gib)
MEMORY_COLUMNS = {
    "peak_allocated": ("peak_allocated_bytes", "peak_allocated", "max_memory_allocated", "peak_allocated_gib"),
    "peak_reserved": ("peak_reserved_bytes", "peak_reserved", "max_memory_reserved", "peak_reserved_gib"),
    "peak_device": ("nvml_peak_bytes", "nvml_used_bytes", "peak_device_bytes", "peak_device", "nvml_used_gib",
                    "peak_device_gib"),
}
TPS_COLUMNS = ("tokens_per_s", "tokens_per_s_per_gpu")
_NOT_GPU = {"cpu", "fake", "cpu-fake", "meta"}
_OK = {"ok", "done", "success", "passed", ""}


def _num(v: Any) -> float | None:
    try:
        x = float(str(v).strip())
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def _is_gpu_row(row: dict[str, str]) -> bool:
    dev = ""
    for k in ("device", "device_kind", "backend"):
        if (row.get(k) or "").strip():
            dev = row[k].strip().lower()
            break
    if dev in _NOT_GPU:
        return False
    return dev.startswith("cuda") or dev.startswith("nvidia") or "gpu" in dev or \
        (not dev and bool((row.get("gpu_name") or row.get("cuda_version") or "").strip()))


def _gpu_name(row: dict[str, str]) -> str | None:
    from planner.hardware import gpu_table

    table = gpu_table()
    for key in ("gpu", "gpu_type", "gpu_preset"):
        v = (row.get(key) or "").strip().lower()
        if v in table:
            return v
    vendor = (row.get("gpu_name") or row.get("device_name") or "").strip().lower()
    if not vendor:
        return None
    for name, spec in table.items():
        if vendor == spec.vendor_name.lower():
            return name
    for name in table:  # "NVIDIA H100 80GB HBM3" -> h100-80gb
        stem, mem = name.split("-")[0], name.split("-")[-1].replace("gb", "")
        if stem in vendor.replace(" ", "").replace("-", "") and mem in vendor:
            return name
    return None


@dataclass
class GpuRow:
    id: str
    source: str
    row: dict[str, str]
    status: str
    measured: dict[str, float] = field(default_factory=dict)
    """metric -> measured value (bytes, tokens/s)."""
    tps_column: str | None = None


def measured_files(directory: Path | None = None) -> list[Path]:
    d = directory or MEASURED_DIR
    return sorted(p for p in d.glob("*.csv") if p.name != "fake_reference.csv") if d.is_dir() else []


def gpu_rows(directory: Path | None = None) -> Iterator[GpuRow]:
    for path in measured_files(directory):
        with path.open(newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh)):
                if not _is_gpu_row(row):
                    continue
                rid = (row.get("id") or row.get("run_id") or "").strip() or f"{path.stem}#{i + 1}"
                try:
                    src = str(path.relative_to(TABLES.parent))
                except ValueError:
                    src = str(path)
                g = GpuRow(rid, src, row, (row.get("status") or "ok").strip().lower())
                for metric, cols in MEMORY_COLUMNS.items():
                    for col in cols:
                        v = _num(row.get(col))
                        if v is not None:
                            g.measured[metric] = v * GiB if col.endswith("_gib") else v
                            break
                for col in TPS_COLUMNS:
                    v = _num(row.get(col))
                    if v is not None:
                        g.measured["throughput"], g.tps_column = v, col
                        break
                yield g


def _typed(row: dict[str, str]) -> dict[str, Any]:
    """CSV strings -> Python values for TrainConfig.from_mapping (empty cells dropped)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k is None or v is None or not str(v).strip():
            continue
        t = str(v).strip()
        if t.lower() in ("true", "false"):
            out[k] = t.lower() == "true"
            continue
        try:
            out[k] = int(t)
            continue
        except ValueError:
            pass
        try:
            out[k] = float(t)
        except ValueError:
            out[k] = t
    return out


def predict_row(g: GpuRow) -> tuple[Any, Any, Any, Any]:
    """(spec, cfg, gpu, MemoryEstimate) of a recorded row."""
    from planner.config import TrainConfig
    from planner.hardware import get_gpu
    from planner.memory import estimate_memory
    from planner.model import load_model

    spec = load_model(g.row["model"])
    cfg = TrainConfig.from_mapping(_typed(g.row))
    name = _gpu_name(g.row)
    gpu = get_gpu(name) if name else None
    return spec, cfg, gpu, estimate_memory(spec, cfg, gpu)


def run_suite(*, case_filter: str | None = None, directory: Path | None = None, **_: Any) -> SuiteResult:
    res = SuiteResult(name="gpu")
    t0 = time.perf_counter()
    n = 0
    for g in gpu_rows(directory):
        n += 1
        if case_filter and case_filter.lower() not in g.id.lower():
            continue
        try:
            spec, cfg, gpu, est = predict_row(g)
        except Exception as exc:
            res.errors.append(f"{g.id}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            continue
        if g.status not in _OK:
            res.excluded.append((g.id, f"run status {g.status!r}; planner says "
                                       f"{'fits' if est.fits else 'does not fit'}"))
            continue
        for metric in MEMORY_COLUMNS:
            if metric in g.measured:
                res.rows.append(Comparison(g.id, "gpu", metric, g.measured[metric], float(getattr(est, metric)),
                                           "bytes", g.source))
        if "throughput" in g.measured and gpu is not None:
            try:
                from planner.throughput import estimate_throughput
                tp = estimate_throughput(spec, cfg, gpu, est)
            except Exception as exc:
                res.errors.append(f"{g.id}: throughput: {type(exc).__name__}: {exc}")
                continue
            pred = tp.tokens_per_s if g.tps_column == "tokens_per_s" else tp.tokens_per_s_per_gpu
            res.rows.append(Comparison(g.id, "gpu", "throughput", g.measured["throughput"], float(pred),
                                       "tokens/s", g.source))
    if n == 0:
        res.messages.append("no rows: tables/measured/ has no run recorded on a GPU yet "
                            "(`tuneplan profile run --device cuda --record` on a GPU session fills it)")
    res.seconds = time.perf_counter() - t0
    return res
