"""Peak = max over the phases of one training step, not a sum of categories.

What is alive in each phase (per GPU, allocated bytes; HF Trainer order: forward →
loss.backward() → optimizer.step() → zero_grad(set_to_none=True)):

 1. always: parameters, optimizer states, master weights, persistent buffers (DDP / ZeRO-1/2
    buckets, ZeRO-3 persistent params).
 2. gradients carried into forward/backward: none with grad_accum = 1 (set_to_none);
    all of them (or this rank's ZeRO-2/3 partition) for micro-steps 2..k with accumulation.
 3. forward, at the loss: + every layer's saved activations + the logits/CE forward spike
    (logits.py 1-4) + ZeRO-3 gathered params + fp16 autocast weight cache.
 4. backward, first node: the CE spike grows to 12·V·T (logits.py 6) while every saved
    activation still exists and no new gradient has been produced yet.
 5. backward, through the layers: each layer frees its saved activations and produces its
    weight gradients; both move linearly with the layer index, so the maximum of
    (activations left + gradients made) is at the top or the bottom layer, plus one layer's
    backward working set (activations.py 22/23) and, with checkpointing, one layer's
    recomputed activations (activations.py 20).
 6. backward end: every gradient exists (the embedding gradient is made last).
 7. optimizer step: parameters + gradients + states + master + the step's own transient
    (fused AdamW: none; DeepSpeed: the fp32 gradient partition).
"""
from __future__ import annotations

from dataclasses import dataclass

from planner.config import Method, TrainConfig
from planner.memory.activations import ActivationEstimate, act_bytes
from planner.memory.logits import LogitsEstimate
from planner.memory.sharding import Buffers
from planner.memory.states import ModelStates
from planner.model import ModelSpec


@dataclass(frozen=True)
class PhasePeaks:
    forward: int
    backward: int
    optimizer: int
    backward_point: str
    """Where in backward the peak falls: "loss", "top layer", "bottom layer", "end"."""

    def as_dict(self) -> dict[str, int]:
        return {"forward": self.forward, "backward": self.backward, "optimizer": self.optimizer}

    @property
    def peak_phase(self) -> str:
        d = self.as_dict()
        return max(d, key=d.get)


def phase_peaks(model: ModelSpec, cfg: TrainConfig, st: ModelStates, act: ActivationEstimate,
                lg: LogitsEstimate, buf: Buffers) -> PhasePeaks:
    base = st.parameters + st.optimizer + st.master_weights + buf.persistent            # 1.
    g_end = st.gradients
    g_prev = g_end if cfg.grad_accum > 1 else 0                                          # 2.

    # 3. forward
    fwd_transient = max(lg.forward_spike, act.forward_transient)
    forward = base + g_prev + buf.fwd_bwd + st.autocast_cache + act.saved + fwd_transient

    # 4.-6. backward: how much of the gradient exists at the top / bottom layer.
    wt = st.weight_bytes
    h, V = model.hidden_size, model.vocab_size
    total_grad_elems = max(st.counts.trainable, 1)
    head_elems = 0
    if cfg.method == Method.FULL:
        head_elems = (0 if model.tie_embeddings else V * h) + h                          # lm_head + final norm
    embed_elems = V * h if cfg.method == Method.FULL else 0
    layer_elems = (total_grad_elems - head_elems - embed_elems) / model.num_layers
    frac_top = head_elems / total_grad_elems
    # the bottom layer's own gradients are made while its activations are freed: count the
    # gradients of everything above it.
    frac_bottom = (head_elems + layer_elems * (model.num_layers - 1)) / total_grad_elems

    def grads_at(frac: float) -> int:
        return max(g_prev, int(g_end * frac))

    bwd_common = base + buf.fwd_bwd + st.autocast_cache
    layers = act.breakdown["layers"]
    rest = act.saved - layers
    n_layers = model.num_layers
    per_layer = layers / n_layers
    work = act.backward_transient + act.recompute
    grad_hidden = act_bytes(cfg) * h * act.tokens
    candidates = {
        "loss": bwd_common + g_prev + act.saved + lg.backward_spike,                     # 4.
        "top layer": bwd_common + grads_at(frac_top) + act.saved + work + grad_hidden,   # 5.
        "bottom layer": bwd_common + grads_at(frac_bottom) + rest + per_layer + work + grad_hidden,
        "end": bwd_common + g_end + rest + grad_hidden,                                  # 6.
    }
    point = max(candidates, key=candidates.get)
    optimizer = base + g_end + st.step_transient                                         # 7.
    return PhasePeaks(forward=int(forward), backward=int(candidates[point]), optimizer=int(optimizer),
                      backward_point=point)
