"""`--device cuda`: real steps on a GPU, measured the ways only a GPU can be.

Per run (after the model, optimizer and batch exist — their build transients are not part
of a training step):

1. burn-in steps (allocator warm, kernels/JIT/compile done), then timed steps: a
   `torch.cuda.synchronize()` before and after each, `perf_counter` in between
   (nanoGPT bench.py). Step time = median.
2. one *peaks* step: at every phase boundary (forward / backward / optimizer) the peak
   counters are read and reset (`max_memory_allocated` / `max_memory_reserved`,
   `reset_peak_memory_stats`), and the allocator's history is recorded for it
   (`torch.cuda.memory._record_memory_history` + `_dump_snapshot`, the pickle
   pytorch.org/memory_viz opens).
3. one *category* step under the dispatch-mode tracker (`profiler.cpu.TimelineTracker`):
   allocated bytes by category and the timeline (tracked bytes are the tensors' sizes; the
   allocator rounds them up to 512 B blocks and caches freed blocks — that gap is what
   reserved − allocated shows).

Run-wide peaks (`peak_allocated_bytes`, `peak_reserved_bytes`) cover every step after the
build. NVML (nvidia-ml-py, import name `pynvml`) is sampled in a thread every few ms for
device-used memory: that includes the CUDA context, cuBLAS workspaces and anything outside
torch's allocator, which torch cannot see.

Only torch APIs present in torch 2.4+ are used (the GPU machines run torch 2.11).
"""
from __future__ import annotations

import threading
import time
from typing import Any

from profiler.cpu import timed_steps, tracked_step

__all__ = ["cuda_environment", "NvmlSampler", "run_cuda", "gpu_preset_for"]


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # package missing, no driver, no GPU
        return None


def _nvml_handle(nv, torch_index: int = 0):
    """NVML handle of torch's device `torch_index` (matched by PCI bus id when torch exposes it)."""
    try:
        import torch

        props = torch.cuda.get_device_properties(torch_index)
        bus = getattr(props, "pci_bus_id", None)
        if bus is not None:
            dom = getattr(props, "pci_domain_id", 0)
            dev = getattr(props, "pci_device_id", 0)
            return nv.nvmlDeviceGetHandleByPciBusId(f"{dom:08x}:{bus:02x}:{dev:02x}.0".encode())
    except Exception:
        pass
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    idx = torch_index
    if visible and visible.split(",")[0].strip().isdigit():
        idx = int(visible.split(",")[torch_index].strip())
    return nv.nvmlDeviceGetHandleByIndex(idx)


def nvml_used_bytes() -> int | None:
    """Device-used bytes of GPU 0 now (before torch initialises CUDA: other processes' use)."""
    nv = _nvml()
    if nv is None:
        return None
    try:
        import os

        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        idx = int(visible.split(",")[0]) if visible and visible.split(",")[0].strip().isdigit() else 0
        return int(nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(idx)).used)
    except Exception:
        return None


class NvmlSampler:
    """Device-used memory (NVML) sampled in a background thread; `.peak` in bytes."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak: int | None = None
        self.last: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nv = _nvml()
        self._h = None
        if self._nv is not None:
            try:
                self._h = _nvml_handle(self._nv)
            except Exception:
                self._nv = None

    def read(self) -> int | None:
        if self._nv is None:
            return None
        try:
            used = int(self._nv.nvmlDeviceGetMemoryInfo(self._h).used)
        except Exception:
            return None
        self.last = used
        self.peak = used if self.peak is None else max(self.peak, used)
        return used

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.read()
            time.sleep(self.interval_s)

    def __enter__(self) -> "NvmlSampler":
        if self._nv is not None:
            self.read()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        self.read()


def cuda_environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"device_name": torch.cuda.get_device_name(0), "cuda_version": torch.version.cuda,
                           "device_count": torch.cuda.device_count()}
    props = torch.cuda.get_device_properties(0)
    env["total_memory_bytes"] = int(props.total_memory)
    env["compute_capability"] = f"{props.major}.{props.minor}"
    env["multiprocessors"] = int(props.multi_processor_count)
    nv = _nvml()
    if nv is not None:
        try:
            drv = nv.nvmlSystemGetDriverVersion()
            env["driver"] = drv.decode() if isinstance(drv, bytes) else str(drv)
            h = _nvml_handle(nv)
            env["nvml_total_bytes"] = int(nv.nvmlDeviceGetMemoryInfo(h).total)
        except Exception as exc:  # pragma: no cover - driver oddities
            env["nvml_error"] = str(exc)
    return env


def gpu_preset_for(device_name: str, total_bytes: int | None = None) -> str | None:
    """tables/gpus.csv key of a CUDA device name ("NVIDIA H100 80GB HBM3" -> "h100-80gb")."""
    from planner.hardware import gpu_table

    name = device_name.lower().replace("nvidia", "").replace("geforce", "").strip()
    compact = name.replace(" ", "").replace("-", "")
    best = None
    for key, spec in gpu_table().items():
        stem, mem = key.split("-")[0], key.split("-")[-1].replace("gb", "")
        if stem in compact and (mem + "gb" in compact or mem in compact):
            return key
        if stem in compact and best is None:
            best = key
        if spec.vendor_name.lower().startswith(device_name.lower()):
            return key
    if best and total_bytes:
        # several memory sizes of one GPU (a100-40gb / a100-80gb): the closest memory
        cands = [k for k in gpu_table() if k.split("-")[0] == best.split("-")[0]]
        return min(cands, key=lambda k: abs(gpu_table()[k].memory_bytes - total_bytes))
    return best


def run_cuda(session, *, steps: int, warmup: int, snapshot_path: str | None = None, track_categories: bool = True,
             progress=None) -> dict[str, Any]:
    import torch

    sync = torch.cuda.synchronize
    out: dict[str, Any] = {}
    sync()
    torch.cuda.reset_peak_memory_stats()
    out["allocated_after_build_bytes"] = int(torch.cuda.memory_allocated())
    out["reserved_after_build_bytes"] = int(torch.cuda.memory_reserved())
    with NvmlSampler() as nvml:
        out["nvml_after_build_bytes"] = nvml.last
        if progress:
            progress.stage("burn-in", warmup)
        burn, _ = timed_steps(session, warmup, sync=sync, on_step=lambda i: progress and progress.advance())
        if progress:
            progress.stage("timed steps", steps)
        times, losses = timed_steps(session, steps, sync=sync, on_step=lambda i: progress and progress.advance())

        # -- peaks step: counters read and reset at each phase boundary, allocator history on
        if progress:
            progress.stage("peaks step (allocator)", 1)
        phase_peaks: dict[str, dict[str, int]] = {}
        boundary: dict[str, dict[str, int]] = {}
        state = {"phase": None}

        def on_phase(name):
            sync()
            prev = state["phase"]
            if prev is not None:
                pk = phase_peaks.setdefault(prev, {"allocated": 0, "reserved": 0})
                pk["allocated"] = max(pk["allocated"], int(torch.cuda.max_memory_allocated()))
                pk["reserved"] = max(pk["reserved"], int(torch.cuda.max_memory_reserved()))
            if name is not None and name not in boundary:
                boundary[name] = {"allocated_at_start": int(torch.cuda.memory_allocated()),
                                  "reserved_at_start": int(torch.cuda.memory_reserved())}
            run_peak = (int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved()))
            state["run_peak"] = tuple(max(a, b) for a, b in zip(state.get("run_peak", (0, 0)), run_peak))
            torch.cuda.reset_peak_memory_stats()
            state["phase"] = name

        # the run-wide maxima so far (burn-in + timed steps), before the per-phase resets
        state["run_peak"] = (int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved()))
        recording = False
        if snapshot_path:
            try:
                torch.cuda.memory._record_memory_history(max_entries=200_000)
                recording = True
            except Exception as exc:  # pragma: no cover - older torch
                out["snapshot_error"] = str(exc)
        try:
            torch.cuda.reset_peak_memory_stats()
            session.step(phase=on_phase)
            sync()
        finally:
            if recording:
                try:
                    torch.cuda.memory._dump_snapshot(snapshot_path)
                    out["snapshot"] = snapshot_path
                except Exception as exc:  # pragma: no cover
                    out["snapshot_error"] = str(exc)
                torch.cuda.memory._record_memory_history(enabled=None)
        if progress:
            progress.advance()
        for p in phase_peaks:
            phase_peaks[p].update(boundary.get(p, {}))
        out["cuda_phase_peaks"] = phase_peaks

        # -- category step (dispatch tracker): allocated by category + timeline
        if track_categories:
            if progress:
                progress.stage("category step (tracked)", 1)
            mem = tracked_step(session)
            out["memory"] = mem
            if progress:
                progress.advance()
        sync()
        run_peak = state["run_peak"]
        out["peak_allocated_bytes"] = max(run_peak[0], int(torch.cuda.max_memory_allocated()))
        out["peak_reserved_bytes"] = max(run_peak[1], int(torch.cuda.max_memory_reserved()))
    stats = torch.cuda.memory_stats()
    out.update(burn_in_seconds=burn, step_seconds=times, losses=losses,
               nvml_peak_bytes=nvml.peak, alloc_retries=int(stats.get("num_alloc_retries", 0)),
               cuda_ooms=int(stats.get("num_ooms", 0)))
    out["peak_phase_allocator"] = (max(phase_peaks, key=lambda p: phase_peaks[p]["allocated"])
                                   if phase_peaks else None)
    return out


def oom_state() -> dict[str, Any]:
    """What the allocator saw up to an OOM (for the OOM row)."""
    try:
        import torch

        return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
                "nvml_peak_bytes": nvml_used_bytes()}
    except Exception:  # pragma: no cover
        return {}

