"""Analytic memory model: per-GPU bytes of one training configuration, without torch.

    from planner.memory import estimate_memory
    est = estimate_memory(load_model("llama-3-8b"), TrainConfig(method="lora"), get_gpu("h100-80gb"))

One concept per file:
  counts.py       which parameters train / are frozen / are adapters (exact counts)
  states.py       parameters, gradients, optimizer states, fp32 master (precision × optimizer × ZeRO × offload)
  activations.py  bytes saved for backward, per token per layer, term by term (+ checkpointing)
  logits.py       logits + cross-entropy spike (and chunked CE)
  sharding.py     DDP / ZeRO buckets, ZeRO-3 gathered parameters
  overhead.py     CUDA context, cuBLAS, NCCL, fragmentation (tables/calibration.yaml)
  phases.py       peak = max over forward / backward / optimizer step
  result.py       MemoryEstimate (the return type)
"""
from __future__ import annotations

from typing import Any, Mapping

from planner.config import Attention, Checkpointing, Precision, TrainConfig
from planner.hardware import GPUSpec, get_gpu
from planner.memory.activations import ActivationEstimate, estimate_activations
from planner.memory.counts import ParamCounts, param_counts
from planner.memory.logits import LogitsEstimate, estimate_logits
from planner.memory.overhead import calibration_value, estimate_overhead, fragmentation_fraction
from planner.memory.phases import PhasePeaks, phase_peaks
from planner.memory.result import MemoryEstimate
from planner.memory.sharding import Buffers, estimate_buffers
from planner.memory.states import ModelStates, model_states
from planner.model import ModelSpec

GiB = 2**30


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def estimate_memory(model: ModelSpec, cfg: TrainConfig, gpu: GPUSpec | None = None, *,
                    ds_config: Mapping[str, Any] | None = None) -> MemoryEstimate:
    """Per-GPU memory of one training step of `model` under `cfg` on `gpu` (default H100 80GB).

    `ds_config`: a DeepSpeed config dict whose bucket sizes override calibration.yaml's defaults.
    """
    gpu = gpu or get_gpu(None)
    st = model_states(model, cfg)
    act = estimate_activations(model, cfg)
    lg = estimate_logits(model, cfg)
    buf = estimate_buffers(model, cfg, st.counts, st.gradients_full, ds_config)
    ph = phase_peaks(model, cfg, st, act, lg, buf)
    ovh = estimate_overhead(cfg)

    peak_alloc = max(ph.as_dict().values())
    frac = fragmentation_fraction(cfg)
    frag = int(peak_alloc * frac)
    reserved = peak_alloc + frag
    device = reserved + ovh.total

    # bounds: activations ±spread (fake oracle vs CUDA kernels), fragmentation low..high, overhead low..high
    spread = float(calibration_value("activation_spread_fraction"))
    act_part = act.saved + lg.peak + act.recompute
    lo_alloc = peak_alloc - int(spread * act_part)
    hi_alloc = peak_alloc + int(spread * act_part)
    low = int(lo_alloc * (1 + fragmentation_fraction(cfg, "low"))) + ovh.low
    high = int(hi_alloc * (1 + fragmentation_fraction(cfg, "high"))) + ovh.high
    spread_reason = (f"activations ±{spread:.0%} (fake-tensor oracle vs CUDA kernels); allocator fragmentation "
                     f"{fragmentation_fraction(cfg, 'low'):.0%}-{fragmentation_fraction(cfg, 'high'):.0%} of allocated "
                     "and CUDA context/cuBLAS/NCCL are priors from calibration.yaml, not yet measured on a GPU")

    notes = list(st.notes) + list(buf.notes) + _advice(model, cfg, st, act, lg, ph, peak_alloc)
    if device > gpu.memory_bytes:
        notes.append(f"does not fit: {_gib(device)} expected vs {_gib(gpu.memory_bytes)} on {gpu.name}")
    elif high > gpu.memory_bytes:
        notes.append(f"fits only at the expected value: the upper bound {_gib(high)} exceeds {_gib(gpu.memory_bytes)}")

    return MemoryEstimate(
        parameters=st.parameters, gradients=st.gradients, optimizer=st.optimizer, master_weights=st.master_weights,
        activations=act.saved, logits=lg.peak, buffers=buf.persistent + buf.fwd_bwd + st.autocast_cache,
        overhead=ovh.total, fragmentation=frag, peak_allocated=peak_alloc, peak_reserved=reserved,
        peak_device=device, capacity=gpu.memory_bytes, phase_peaks=ph.as_dict(), peak_phase=ph.peak_phase,
        low=low, high=high, spread_reason=spread_reason, notes=tuple(notes))


def _advice(model: ModelSpec, cfg: TrainConfig, st: ModelStates, act: ActivationEstimate, lg: LogitsEstimate,
            ph: PhasePeaks, peak: int) -> list[str]:
    out: list[str] = []
    if not cfg.chunked_ce and lg.backward_spike > 0.15 * peak:
        out.append(f"logits transient dominates: cross-entropy over {model.vocab_size} vocab spikes "
                   f"{_gib(lg.backward_spike)} at the start of backward; enable --chunked-ce")
    if cfg.checkpointing == Checkpointing.NONE and act.saved > 0.3 * peak:
        ck = estimate_activations(model, cfg.replace(checkpointing=Checkpointing.FULL))
        out.append(f"activations {_gib(act.saved)}: --checkpointing full keeps {_gib(ck.saved)} "
                   f"(+{_gib(ck.recompute)} recomputed per layer in backward, ~+33% compute)")
    if cfg.attention == Attention.EAGER and cfg.checkpointing != Checkpointing.SELECTIVE:
        s2 = sum(v for k, v in act.layer_terms.items() if k in ("attn.softmax_fp32", "attn.probs", "attn.softcap_tanh"))
        n = model.num_layers if cfg.checkpointing == Checkpointing.NONE else 1
        out.append(f"eager attention saves seq² scores ({_gib(s2 * act.tokens * n)}): use sdpa or flash")
    if cfg.is_adapter and cfg.zero == 0 and cfg.precision == Precision.BF16_TRUE:
        out.append("without autocast peft keeps each adapted Linear's input as an fp32 copy (4 bytes per element "
                   "per adapter): LoRA saves more activations than full fine-tuning; bf16-mixed (autocast) halves it")
    if model.is_moe and cfg.is_adapter:
        from planner.memory.activations import layer_constant_bytes
        merged = sum(layer_constant_bytes(model, cfg, i) for i in range(model.num_layers))
        if merged:
            out.append(f"peft adapts the MoE expert banks through a parametrisation (W + B·A merged every forward): "
                       f"autograd keeps a merged copy per MoE layer, {_gib(merged)} without checkpointing")
        if cfg.method.value == "qlora":
            out.append("MoE expert banks are 3-D parameters, not nn.Linear, in transformers ≥ 5: bitsandbytes leaves "
                       "them 16-bit (counted so)")
    if ph.peak_phase == "optimizer" and st.step_transient:
        out.append(f"optimizer step peak includes DeepSpeed's fp32 gradient partition ({_gib(st.step_transient)})")
    return out


__all__ = ["estimate_memory", "MemoryEstimate", "ModelStates", "model_states", "ActivationEstimate",
           "estimate_activations", "LogitsEstimate", "estimate_logits", "Buffers", "estimate_buffers",
           "PhasePeaks", "phase_peaks", "ParamCounts", "param_counts"]
