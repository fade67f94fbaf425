"""Communication buffers of data parallelism: DDP buckets, ZeRO buckets, ZeRO-3 live params.

Sources: deepspeed 0.19.8 `runtime/zero/stage_1_and_2.py` (`setup_buckets`: `buf_0`, and
`buf_1` "double buffers ... when overlap_comm is enabled", each `reduce_bucket_size`
elements of the 16-bit dtype; `grads_in_partition`), `runtime/zero/stage3.py`
(`__ipg_bucket_flat_buffer`, `grad_partitions_flat_buffer`), `runtime/zero/config.py`
defaults (reduce_bucket_size 5e8, stage3_prefetch_bucket_size 5e7, stage3_max_live_parameters
1e9, stage3_param_persistence_threshold 1e5, sub_group_size 1e9; overlap_comm defaults to
True for stage 3 only); transformers `integrations/deepspeed.py` "auto" rules
(reduce_bucket_size = h², stage3_prefetch_bucket_size = 0.9·h², persistence threshold =
10·h); torch DDP `Reducer` (bucket_cap_mb 25; flat bucket tensors covering every trainable
gradient; `gradient_as_bucket_view=False` — accelerate's default — keeps them *besides*
`param.grad`).

 1. ZeRO-1/2: (2 if overlap_comm else 1) × reduce_bucket_size × 2 bytes of ipg buffers,
    alive from the first backward on. With DeepSpeed's own default (5e8) and overlap_comm
    that is 2 GB per GPU — the usual "why does ZeRO-2 use more than the formula" answer.
 2. ZeRO-3: one reduce bucket (reduce_bucket_size × 2 bytes) + the gathered (unsharded)
    16-bit parameters in flight: the module being computed (the largest is embed_tokens /
    lm_head, V·h, or an MoE expert bank) + the prefetch bucket, capped by
    stage3_max_live_parameters; + that module's full 16-bit gradient before reduce-scatter.
    DeepSpeed's estimator counts 4·largest_layer_params (gathered params + grads).
 3. ZeRO-3 parameters below the persistence threshold (norm weights, biases) stay
    unpartitioned on every rank.
 4. DDP (zero 0, world_size > 1): the reducer's flat buckets = one more copy of all
    trainable gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

from planner.config import Method, Offload, TrainConfig
from planner.memory.counts import ParamCounts
from planner.memory.overhead import memory_calibration
from planner.model import ModelSpec


@dataclass(frozen=True)
class DeepSpeedSettings:
    reduce_bucket_size: int
    overlap_comm: bool
    prefetch_bucket_size: int
    param_persistence_threshold: int
    max_live_parameters: int
    sub_group_size: int


def _resolve(value: Any, auto: int) -> int:
    if value is None or value == "auto":
        return int(auto)
    return int(float(value))


def deepspeed_settings(model: ModelSpec, cfg: TrainConfig, ds_config: Mapping[str, Any] | None = None) -> DeepSpeedSettings:
    """Bucket sizes from a ds_config dict (as HF resolves "auto"), else calibration.yaml's defaults."""
    h = model.hidden_size
    if ds_config is not None:
        zo = dict(ds_config.get("zero_optimization") or {})
        overlap = zo.get("overlap_comm")
        overlap = (cfg.zero == 3) if overlap is None else bool(overlap)
        rbs = zo.get("reduce_bucket_size", 5e8)
        pre = zo.get("stage3_prefetch_bucket_size", 5e7)
        per = zo.get("stage3_param_persistence_threshold", 1e5)
        live = zo.get("stage3_max_live_parameters", 1e9)
        sub = zo.get("sub_group_size", 1e9)
    else:
        d = memory_calibration()["deepspeed_defaults"]
        overlap = bool(d.get("overlap_comm", True))
        rbs, pre, per = d.get("reduce_bucket_size"), d.get("stage3_prefetch_bucket_size"), \
            d.get("stage3_param_persistence_threshold")
        live, sub = d.get("stage3_max_live_parameters", 1e9), d.get("sub_group_size", 1e9)
    return DeepSpeedSettings(
        reduce_bucket_size=_resolve(rbs, h * h), overlap_comm=overlap,
        prefetch_bucket_size=_resolve(pre, 0.9 * h * h), param_persistence_threshold=_resolve(per, 10 * h),
        max_live_parameters=_resolve(live, 1e9), sub_group_size=_resolve(sub, 1e9))


@dataclass(frozen=True)
class Buffers:
    persistent: int
    """Alive in every phase once training started (DDP buckets, ZeRO-1/2 ipg buffers, ZeRO-3 persistent params)."""
    fwd_bwd: int
    """Alive during forward/backward only (ZeRO-3 gathered params + their gradient + reduce bucket)."""
    settings: DeepSpeedSettings | None = None
    notes: tuple[str, ...] = ()


@lru_cache(maxsize=256)
def _persistent_small_params(model: ModelSpec, threshold: int) -> int:
    """3. Elements of parameters with numel < threshold (norms, qk-norms, biases)."""
    h = model.hidden_size
    small = [h] * (model.norms_per_layer * model.num_layers + 1)
    if model.qk_norm:
        small += [model.head_dim] * (2 * model.num_layers)
    for lin in model.layer_linears(0):
        if lin.bias:
            small += [lin.out_features] * model.num_layers
    return sum(n for n in small if n < threshold)


def estimate_buffers(model: ModelSpec, cfg: TrainConfig, counts: ParamCounts, grad_full_bytes: int,
                     ds_config: Mapping[str, Any] | None = None) -> Buffers:
    N = cfg.world_size
    if cfg.zero == 0:
        if N > 1:                                                       # 4.
            return Buffers(persistent=grad_full_bytes, fwd_bwd=0,
                           notes=("DDP gradient buckets (gradient_as_bucket_view=False) duplicate the "
                                  f"{grad_full_bytes / 2**30:.2f} GiB of trainable gradients",))
        return Buffers(persistent=0, fwd_bwd=0)
    s = deepspeed_settings(model, cfg, ds_config)
    g = 2  # 16-bit gradient / parameter element
    notes: list[str] = []
    if cfg.zero in (1, 2):                                              # 1.
        n_buf = 2 if s.overlap_comm else 1
        # with no trainable tensor large enough the bucket is still allocated at full size.
        ipg = n_buf * s.reduce_bucket_size * g
        if ipg > 2**30:
            notes.append(f"ZeRO-{cfg.zero} reduce buckets take {ipg / 2**30:.1f} GiB "
                         f"({n_buf} × reduce_bucket_size {s.reduce_bucket_size:.3g}); lower reduce_bucket_size "
                         "or set \"auto\" (hidden²)")
        return Buffers(persistent=ipg, fwd_bwd=0, settings=s, notes=tuple(notes))
    # ---- ZeRO-3 (2, 3)
    persistent = _persistent_small_params(model, s.param_persistence_threshold) * g
    largest = counts.largest_module
    live = min(largest + s.prefetch_bucket_size, max(s.max_live_parameters, largest))
    trains_largest = cfg.method == Method.FULL
    grad_largest = largest if trains_largest else 0
    fwd_bwd = live * g + grad_largest * g + s.reduce_bucket_size * g
    if cfg.offload == Offload.OPTIMIZER_PARAMS:
        notes.append("ZeRO-3 parameter offload: every module's weights cross PCIe each forward and backward")
    return Buffers(persistent=persistent, fwd_bwd=fwd_bwd, settings=s, notes=tuple(notes))
