"""What the caching allocator does not show, and the gap between allocated and reserved.

Constants come from `tables/calibration.yaml` (`memory:` section). Each carries a `source`;
"prior, not yet measured" marks a value seeded from public knowledge that a GPU session
must replace with a fitted one (NVML total − torch reserved, measured per GPU model).

 1. CUDA context: created by the first CUDA call, outside torch's allocator; NVML shows it,
    torch.cuda.memory_reserved() does not.
 2. cuBLAS/cuBLASLt workspaces: allocated through the caching allocator in recent PyTorch,
    so they appear in *reserved*; counted here with the context because the fake oracle
    never sees them.
 3. NCCL: communicator buffers, only when world_size > 1 (plus per extra node).
 4. Fragmentation: reserved − allocated at the peak, as a fraction of peak_allocated,
    per method (LoRA fragments more: many small fp32 tensors, per-layer casts).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from planner.config import TrainConfig
from planner.errors import PlanError
from planner.model import TABLES

CALIBRATION = TABLES / "calibration.yaml"


@lru_cache(maxsize=1)
def memory_calibration() -> dict[str, Any]:
    import yaml  # light; the planner never imports torch

    try:
        data = yaml.safe_load(CALIBRATION.read_text()) or {}
    except OSError as exc:
        raise PlanError(f"{CALIBRATION}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise PlanError(f"{CALIBRATION}: malformed YAML ({exc})") from None
    mem = data.get("memory")
    if not isinstance(mem, dict):
        raise PlanError(f"{CALIBRATION}: no 'memory:' section")
    return mem


def calibration_value(key: str, bound: str = "value") -> Any:
    entry = memory_calibration()[key]
    if isinstance(entry, dict):
        return entry.get(bound, entry.get("value"))
    return entry


@dataclass(frozen=True)
class Overhead:
    cuda_context: int
    cublas_workspace: int
    nccl: int
    low: int
    high: int

    @property
    def total(self) -> int:
        return self.cuda_context + self.cublas_workspace + self.nccl


def estimate_overhead(cfg: TrainConfig) -> Overhead:
    return _overhead(cfg.world_size, cfg.nodes)


@lru_cache(maxsize=64)
def _overhead(world_size: int, nodes: int) -> Overhead:
    def three(key: str) -> tuple[int, int, int]:
        return (int(calibration_value(key)), int(calibration_value(key, "low")), int(calibration_value(key, "high")))

    ctx, ctx_lo, ctx_hi = three("cuda_context_bytes")                 # 1.
    cub, cub_lo, cub_hi = three("cublas_workspace_bytes")             # 2.
    nccl = nccl_lo = nccl_hi = 0
    if world_size > 1:                                                # 3.
        nccl, nccl_lo, nccl_hi = three("nccl_bytes_per_gpu")
        extra = int(calibration_value("nccl_extra_bytes_per_extra_node")) * (nodes - 1)
        nccl, nccl_lo, nccl_hi = nccl + extra, nccl_lo + extra, nccl_hi + extra
    return Overhead(cuda_context=ctx, cublas_workspace=cub, nccl=nccl,
                    low=ctx_lo + cub_lo + nccl_lo, high=ctx_hi + cub_hi + nccl_hi)


def fragmentation_fraction(cfg: TrainConfig, bound: str = "value") -> float:
    """4. (reserved − allocated) / allocated at the peak."""
    return _fragmentation(cfg.method.value, bound)


@lru_cache(maxsize=64)
def _fragmentation(method: str, bound: str) -> float:
    table = memory_calibration()["fragmentation_fraction"]
    if not isinstance(table, dict):  # a single number for every method
        return float(table)
    entry = table.get(method, table.get("full", table))
    if not isinstance(entry, dict):
        return float(entry)
    return float(entry.get(bound, entry.get("value", 0.0)))
