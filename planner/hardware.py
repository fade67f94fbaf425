"""GPU specifications from `tables/gpus.csv` (datasheet figures, each row cites its source)."""
from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass
from functools import lru_cache

from planner.errors import PlanError
from planner.model import TABLES

DEFAULT_GPU = "h100-80gb"


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator model, as the planner needs it."""

    name: str
    """tuneplan's key, e.g. "h100-80gb"."""
    vendor_name: str
    memory_bytes: int
    """Total device memory as the driver reports it (what NVML calls total)."""
    bf16_tflops: float
    """Dense bf16 tensor-core peak, TFLOP/s (no sparsity); 0 where the card has no bf16 (V100)."""
    fp16_tflops: float
    fp8_tflops: float | None
    hbm_bandwidth_gbps: float
    """Device memory bandwidth, GB/s."""
    intra_node_link: str
    """"nvlink" or "pcie"."""
    intra_node_bandwidth_gbps: float
    """Per-GPU, per-direction bandwidth to peers in the node, GB/s."""
    inter_node_bandwidth_gbps: float
    """Per-GPU, per-direction network bandwidth between nodes (typical), GB/s."""
    pcie_bandwidth_gbps: float
    """Host link per direction, GB/s (CPU offload traffic)."""
    supports_flash_attn: bool
    source: str

    @property
    def supports_bf16(self) -> bool:
        return self.bf16_tflops > 0

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30

    def peak_tflops(self, precision: str) -> float:
        """Dense tensor-core peak for a precision regime ("bf16-mixed", "fp16-mixed", "fp32", ...)."""
        if precision.startswith("fp16") or not self.supports_bf16:
            return self.fp16_tflops
        if precision == "fp32":
            # fp32 matmuls run as TF32 on tensor cores by default only if enabled; PyTorch
            # defaults to full fp32 for matmuls, about 1/2 of bf16 on Ampere+ via TF32 is optimistic:
            # use bf16/ 2 as the upper bound of what fp32 training reaches.
            return (self.bf16_tflops or self.fp16_tflops) / 2
        return self.bf16_tflops


def _float(v: str | None) -> float | None:
    v = (v or "").strip()
    return float(v) if v else None


@lru_cache(maxsize=1)
def gpu_table() -> dict[str, GPUSpec]:
    out: dict[str, GPUSpec] = {}
    with (TABLES / "gpus.csv").open() as fh:
        for r in csv.DictReader(fh):
            name = r["name"].strip().lower()
            out[name] = GPUSpec(
                name=name, vendor_name=r["vendor_name"].strip(), memory_bytes=int(float(r["memory_bytes"])),
                bf16_tflops=_float(r["bf16_dense_tflops"]) or 0.0, fp16_tflops=float(r["fp16_dense_tflops"]),
                fp8_tflops=_float(r.get("fp8_dense_tflops")), hbm_bandwidth_gbps=float(r["hbm_bandwidth_gbps"]),
                intra_node_link=r["intra_node_link"].strip().lower(),
                intra_node_bandwidth_gbps=float(r["intra_node_bandwidth_gbps"]),
                inter_node_bandwidth_gbps=float(r["inter_node_bandwidth_gbps"]),
                pcie_bandwidth_gbps=float(r["pcie_bandwidth_gbps"]),
                supports_flash_attn=r["supports_flash_attn"].strip().lower() in ("1", "true", "yes"),
                source=r["source"].strip(),
            )
    return out


def get_gpu(name: str | None) -> GPUSpec:
    key = (name or DEFAULT_GPU).strip().lower()
    table = gpu_table()
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, list(table), n=3, cutoff=0.3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise PlanError(f"unknown GPU {name!r} (known: {', '.join(sorted(table))}){hint}")
