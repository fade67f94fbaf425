"""Activations: bytes the HF Llama-family code saves for backward, per token, per layer.

The model follows the autograd graph of transformers 5.23 (`models/llama/modeling_llama.py`,
`qwen2`, `qwen3`, `mistral`, `mixtral`, `qwen3_moe`, `gemma2`, `phi3`) + peft 0.21
(`tuners/lora/layer.py::Linear.forward`) op by op: a tensor costs memory at the end of the
forward pass iff some autograd node saved it (`ctx.save_for_backward` / SavedVariable).
A tensor saved by several nodes is counted once (its storage). Terms are bytes per token
(multiply by micro_batch · seq_len); eager attention adds terms ∝ seq_len.

Notation: h hidden, q = heads·head_dim, kv = kv_heads·head_dim, f intermediate, H heads,
a = activation dtype bytes (2 for bf16/fp16 compute, 4 for fp32), r LoRA rank.

Checked to the byte against the fake-tensor oracle (`profiler.fake`, CPU kernels) on tiny
Llama/Qwen models (tests/test_memory.py) and within a few % at 7B/8B (tables/measured/
fake_reference.csv).

Which autograd nodes save what (the numbered terms used below):

 RMSNorm, Llama style: `x.to(float32)`, `pow(2).mean(-1)`, `x * rsqrt(var + eps)`,
 `weight * x.to(input_dtype)`
  1. fp32 copy of the input, saved by pow and mul: 4h (only if the input requires grad);
  2. rsqrt(var + eps): 4 bytes per token (same condition);
  3. the normalised a-byte tensor, saved by `weight *` for the weight gradient: a·h (only
     if the weight trains). Its output is a new a·h tensor, saved by whoever consumes it.
     Gemma2 RMSNorm stays in fp32 to the end: (1) + (2) + fp32 normalised 4h (if trained).
 Linear (nn.functional.linear = addmm/mm):
  4. saves its input only when its weight trains (grad_W = grad_outᵀ·x); the input
     gradient needs only W, which is a parameter (no activation cost).
 LoRA Linear (peft, adapters fp32 by default — `autocast_adapter_dtype=True`):
  5. `x = x.to(lora_A.weight.dtype)`: each adapted Linear makes its *own* fp32 copy of its
     input (q, k and v each upcast the same normed input), saved by lora_A: 4·in per
     adapter — without autocast (bf16-true; the fake oracle's setting).
  5a. under autocast (HF Trainer bf16=True → accelerate's native AMP) lora_A recasts that
     fp32 copy to bf16 and saves the bf16 cast instead: a·in per adapter (the fp32 copy is
     transient). DeepSpeed (16-bit adapters, no autocast) and fp32 save the shared input.
     See `adapter_input()`.
  5b. under autocast F.linear also casts the fp32 adapter weights A (r·in) and B (out·r) to
     the 16-bit dtype, and since they are leaves that require grad, autocast's cache keeps
     each cast until the autocast region exits (after the loss): a bytes per adapter
     parameter at the forward peak, independent of the batch. The matmuls save them too:
     lora_B's always, lora_A's only when the adapter's input requires grad (not layer 0's
     q/k/v under LoRA — their input descends from the frozen embedding — whose A casts live
     only in the cache). Without checkpointing they therefore stay until their layer's
     backward; with checkpointing the forward's casts die with the cache and each layer's are
     re-made by its recompute. (Saved-tensor hooks + the fake oracle on a tiny Llama, CPU
     autocast: 2·adapter_params more than 5a alone, to the byte.) See `adapter_weight_casts()`.
  6. lora_A's output, saved by lora_B: r elements in the adapter's dtype;
  7. lora_dropout > 0: `nn.Dropout` on the copy: the dropped copy replaces (5) and CUDA's
     fused dropout saves a 1-byte mask per element: +1·in. (CPU dropout saves a float
     mask: +4·in; the fake oracle shows that, so compare with lora_dropout=0.)
     The frozen base Linear saves nothing (4), the adapter output path (lora_B output,
     scaling, the sum with the base output, the cast back) is transient.
 QLoRA (bitsandbytes 0.50 `MatMul4Bit`): saves only the packed weight (a parameter), so
     the terms are LoRA's; forward and backward dequantise one weight at a time (a·in·out
     transient, the largest Linear) — see `estimate_activations`.
 Attention:
  8. q_proj / k_proj outputs are rotated by RoPE (`q*cos + rotate_half(q)*sin`: the muls
     save cos/sin, shared by all layers), so the RoPE *outputs* q_embed (a·q) and k_embed
     (a·kv) are new tensors and the pre-RoPE q, k are freed;
  9. SDPA / flash-attention (GQA handled in-kernel via `enable_gqa`, transformers
     `use_gqa_in_sdpa` when there is no padding mask) save q, k, v, the output (a·q) and the
     fp32 log-sum-exp (4·H); no s² term. The output's memory layout is (b, s, H, d), so
     `transpose(1, 2).reshape(...)` is a view and o_proj's saved input is that same storage.
 10. eager (`eager_attention_forward`): repeat_kv copies k and v to H heads when GQA
     (a·q each, saved by the two matmuls; the originals are freed), the softmax runs in fp32
     and saves its output 4·H·s, the bf16 cast of the probabilities (a·H·s) is saved by the
     probs@V matmul, and `attn_output.transpose(1, 2).contiguous()` is a fresh a·q copy that
     o_proj saves. Dropout p=0 is the identity (no mask). Gemma2's logit soft-capping adds a
     saved tanh output a·H·s.
 11. Qwen3 q_norm / k_norm: per-head RMSNorm on q and k: (1)+(2)+(3) on q-dim and kv-dim,
     rsqrt per head.
 12. Phi-3 fused qkv_proj: v is a view of the fused output, so SDPA keeps the whole
     a·(q + 2kv) storage alive.
 MLP (SwiGLU / GeGLU): `down(act(gate(x)) * up(x))`
 13. act saves its input, the gate output: a·f;
 14. the product saves both factors: act output a·f and up output a·f;
 15. down_proj saves the product (a·f) when it trains (4), or its adapter copies it (5).
     Phi-3's fused gate_up output (2a·f) is kept by the two views: same total.
 MoE (Mixtral / Qwen3-MoE in transformers 5: router Linear-free weight + fused expert banks,
 loop over experts with `hidden[token_idx]`):
 16. router softmax in fp32 saved: 4·E per token; topk indices 8·k;
 17. per (token, expert) pair — k pairs per token: the gathered input a·h (when the banks
     train), gate_up output 2a·f, act a·f, product a·f (when the banks train), the expert
     output a·h saved by `* routing_weight` (the weight needs a gradient through the
     router), and two int64 index vectors (16 bytes).
 Residual adds save nothing; the residual stream itself is not saved (the next norm saves
 its fp32 upcast instead).

Model-level (once, not per layer):
 18. final norm (1)+(2)+(3); lm_head saves its input a·h when it trains;
 19. cos/sin tables (2 · s · head_dim · a, batch-independent), position ids (8·s), and the
     batch (input_ids, labels, attention_mask: 3 × int64 per token in HF Trainer).

Activation checkpointing (HF `gradient_checkpointing_enable`, non-reentrant
`torch.utils.checkpoint`, one call per decoder layer):
 20. forward keeps only each layer's input hidden state (a·h per token per layer, held by
     the recompute closure); in backward one layer at a time is re-run and saves its full
     set (the "recompute working set") before its gradients are taken.
 21. selective (Korthikanti et al. 2022, attention core only): drops the eager s² terms (10)
     and recomputes them per layer in backward; with SDPA / flash nothing is dropped — the
     kernel already saves no s² tensor. (HF has no built-in selective mode; this models a
     Megatron/torchtitan-style wrapper.)

Requires-grad propagation: a layer saves its input-side terms (1, 2) only if its input
requires grad. With LoRA the embedding is frozen, so layer 0's input norm saves nothing;
with the freeze method the layers before the first trainable one save nothing at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from planner.config import Attention, Checkpointing, Method, Precision, TrainConfig
from planner.memory.counts import (adapted_linears, embed_adapted, head_adapted, moe_adapted, moe_adapter_params,
                                   trainable_layer_indices)
from planner.memory.memo import memoized
from planner.model import ModelSpec


def act_bytes(cfg: TrainConfig) -> int:
    """a: bytes per activation element (compute dtype)."""
    return 4 if cfg.precision == Precision.FP32 else 2


@dataclass(frozen=True)
class AdapterInput:
    """How a LoRA adapter's input is saved (5)."""

    nbytes: int
    """Bytes per element of the saved adapter input (and of the lora_A output)."""
    own_copy: bool
    """Each adapter saves its own copy (True) or the shared input tensor itself (False)."""
    compute_bytes: int
    """dtype of the adapter path's transients (lora_B output, the sum with the base output)."""


def adapter_input(cfg: TrainConfig) -> AdapterInput:
    """5a. Which dtype the adapter sees depends on the training stack:

    - bf16-true (pure bf16, no autocast — what profiler.fake runs): peft casts x to the fp32
      adapter dtype; lora_A saves that fp32 copy → 4 bytes, one copy per adapter.
    - bf16-mixed / fp16-mixed under HF Trainer: accelerate wraps forward in
      `torch.autocast` (Accelerator.prepare_model, native_amp), so lora_A (fp32 weights)
      recasts the fp32 copy to the 16-bit dtype and saves *that* (a bytes, still one per
      adapter); the fp32 copy is transient. (Checked with saved-tensor hooks on a tiny
      Llama under CPU autocast.)
    - DeepSpeed (zero ≥ 1): no autocast, the engine cast the adapters to 16-bit: x is not
      converted and lora_A saves the shared input itself.
    - fp32: adapters and input are fp32: shared input.
    """
    a = act_bytes(cfg)
    if cfg.precision == Precision.FP32:
        return AdapterInput(4, False, 4)
    if cfg.zero >= 1:
        return AdapterInput(a, False, a)
    if cfg.precision == Precision.BF16_TRUE:
        return AdapterInput(4, True, 4)
    return AdapterInput(a, True, a)


class _Terms:
    """Named bytes-per-token accumulator."""

    def __init__(self) -> None:
        self.d: dict[str, float] = {}

    def add(self, name: str, value: float) -> None:
        if value:
            self.d[name] = self.d.get(name, 0.0) + value


def adapter_weight_casts(model: ModelSpec, cfg: TrainConfig, layer: int | None = None) -> int:
    """5b. Bytes of autocast's 16-bit casts of the fp32 LoRA weights (A and B of every adapted
    Linear; the lm_head adapter when targeted) -- one decoder `layer`, or, with ``layer=None``,
    the model-level ones (lm_head). 0 unless autocast runs over fp32 adapters (bf16-/fp16-mixed
    under HF Trainer, no DeepSpeed). MoE expert/router adapters (peft ParamWrapper) are
    counted with their merged banks in `layer_constant_bytes` (17c)."""
    if not cfg.is_adapter or cfg.zero >= 1 or cfg.precision not in (Precision.BF16_MIXED, Precision.FP16_MIXED):
        return 0
    a, r = act_bytes(cfg), cfg.lora_rank
    if layer is None:
        return a * r * (model.hidden_size + model.vocab_size) if head_adapted(cfg) else 0
    return a * r * sum(lin.in_features + lin.out_features for lin in adapted_linears(model, cfg, layer))


def _norm(t: _Terms, name: str, width: int, a: int, *, in_grad: bool, w_grad: bool, gemma: bool,
          rsqrt_count: int = 1) -> None:
    if in_grad:
        t.add(f"{name}.fp32_input", 4 * width)              # 1.
        t.add(f"{name}.rsqrt", 4 * rsqrt_count)             # 2.
    if w_grad:
        t.add(f"{name}.normalized", (4 if gemma else a) * width)  # 3.


def _linear_group(t: _Terms, name: str, in_features: int, lins: list, adapted: frozenset, trainable: bool,
                  a: int, ai: AdapterInput, r: int, dropout: bool, *, input_saved_elsewhere: bool = False) -> None:
    """Linears sharing one input tensor: base weight grads save it once (4); each adapter
    saves its own cast copy (5) — or the shared input itself (5a). `input_saved_elsewhere`:
    another node already keeps the input."""
    n_ad = sum(1 for lin in lins if lin.name in adapted)
    shared_by_adapter = n_ad and not ai.own_copy and not dropout
    if (trainable or shared_by_adapter) and lins and not input_saved_elsewhere:
        t.add(f"{name}.input", a * in_features)             # 4. / 5a. shared
    if not n_ad:
        return
    if ai.own_copy or dropout:
        label = "lora_input_fp32" if ai.nbytes == 4 and a != 4 else "lora_input_copy"
        t.add(f"{name}.{label}", n_ad * ai.nbytes * in_features)     # 5. (7: the dropped copy)
    if dropout:
        t.add(f"{name}.lora_dropout_mask", n_ad * in_features)      # 7. CUDA bool mask
    t.add(f"{name}.lora_A_out", n_ad * ai.nbytes * r)       # 6.


@dataclass(frozen=True)
class LayerFlags:
    active: bool
    in_grad: bool
    trains: bool
    adapted: frozenset


def layer_flags(model: ModelSpec, cfg: TrainConfig) -> list[LayerFlags]:
    """Per decoder layer: does it save anything, does its input need a gradient, does it train."""
    return list(_layer_flags(model, cfg.method, cfg.lora_target, cfg.freeze_trainable_layers))


@lru_cache(maxsize=1024)
def _layer_flags(model: ModelSpec, method, lora_target: tuple, freeze_k: int) -> tuple[LayerFlags, ...]:
    cfg = TrainConfig(method=method, lora_target=lora_target, freeze_trainable_layers=freeze_k)
    trains = set(trainable_layer_indices(model, cfg))
    flags = []
    grad_flowing = cfg.method == Method.FULL or embed_adapted(cfg)
    for i in range(model.num_layers):
        adapted = frozenset(l.name for l in adapted_linears(model, cfg, i))
        t = i in trains
        active = grad_flowing or t or bool(adapted)
        flags.append(LayerFlags(active=active, in_grad=grad_flowing, trains=t, adapted=adapted))
        grad_flowing = grad_flowing or t or bool(adapted)
    return tuple(flags)


def layer_terms(model: ModelSpec, cfg: TrainConfig, layer: int, flags: LayerFlags | None = None,
                *, attention: Attention | None = None) -> dict[str, float]:
    """Bytes per token one decoder layer saves for backward, by term (no checkpointing)."""
    fl = flags or layer_flags(model, cfg)[layer]
    if not fl.active:
        return {}
    attention = attention or cfg.attention
    a, ai, r = act_bytes(cfg), adapter_input(cfg), cfg.lora_rank
    dropout = cfg.is_adapter and cfg.lora_dropout > 0
    h, q, kv, H, s = model.hidden_size, model.q_dim, model.kv_dim, model.num_heads, cfg.seq_len
    gemma = model.model_type == "gemma2"
    tr, ad = fl.trains, fl.adapted
    t = _Terms()
    lins = {l.name: l for l in model.layer_linears(layer)}

    # ---- attention block -------------------------------------------------------------
    _norm(t, "attn_norm", h, a, in_grad=fl.in_grad, w_grad=tr, gemma=gemma)
    qkv = [lins[n] for n in ("qkv_proj", "q_proj", "k_proj", "v_proj") if n in lins]
    _linear_group(t, "qkv", h, qkv, ad, tr, a, ai, r, dropout)
    if model.qk_norm:                                                     # 11.
        _norm(t, "q_norm", q, a, in_grad=True, w_grad=tr, gemma=False, rsqrt_count=H)
        _norm(t, "k_norm", kv, a, in_grad=True, w_grad=tr, gemma=False, rsqrt_count=model.num_kv_heads)
    gqa = model.num_kv_heads < H
    t.add("attn.q_rope", a * q)                                           # 8.
    if attention == Attention.EAGER:                                      # 10.
        t.add("attn.k", a * (q if gqa else kv))
        if gqa:
            t.add("attn.v_repeat", a * q)
        elif model.fused_qkv:
            t.add("attn.qkv_storage", a * (q + 2 * kv))                  # 12. v is a view
        else:
            t.add("attn.v", a * kv)
        t.add("attn.softmax_fp32", 4 * H * s)
        t.add("attn.probs", a * H * s)
        if gemma:
            t.add("attn.softcap_tanh", a * H * s)
    else:                                                                 # 9. sdpa / flash
        t.add("attn.k_rope", a * kv)
        if model.fused_qkv:
            t.add("attn.qkv_storage", a * (q + 2 * kv))                  # 12.
        else:
            t.add("attn.v", a * kv)
        t.add("attn.out", a * q)
        t.add("attn.lse_fp32", 4 * H)
    # o_proj's input: with SDPA the kernel output storage (9, already counted); with eager
    # the fresh transpose copy (10), saved only by a training o_proj or a same-dtype adapter.
    _linear_group(t, "o", q, [lins["o_proj"]], ad, tr, a, ai, r, dropout,
                  input_saved_elsewhere=attention != Attention.EAGER)
    if gemma:
        _norm(t, "post_attn_norm", h, a, in_grad=True, w_grad=tr, gemma=True)

    # ---- MLP block ---------------------------------------------------------------------
    _norm(t, "mlp_norm", h, a, in_grad=True, w_grad=tr, gemma=gemma)
    if model.is_moe_layer(layer):                                         # 16. 17.
        E, k, fm = model.num_experts, model.experts_per_token, model.moe_intermediate_size
        # 17b. peft's ParamWrapper merges W + B·A into a new bank that requires grad: the
        #      experts then save what trainable experts save (their inputs and products).
        bank_grad = tr or moe_adapted(model, cfg, layer)
        if bank_grad:
            t.add("mlp_norm.output", a * h)  # the router's weight gradient saves its input
        t.add("moe.router_softmax_fp32", 4 * E)
        t.add("moe.topk", 8 * k + 4 * k)
        t.add("moe.expert_input", k * a * h if bank_grad else 0)
        t.add("moe.gate_up", k * 2 * a * fm)
        t.add("moe.act", k * a * fm)
        t.add("moe.product", k * a * fm if bank_grad else 0)
        t.add("moe.expert_out", k * a * h)
        t.add("moe.indices", k * 16)
    else:
        f = model.intermediate_size
        gu = [lins[n] for n in ("gate_up_proj", "gate_proj", "up_proj") if n in lins]
        _linear_group(t, "gate_up", h, gu, ad, tr, a, ai, r, dropout)
        t.add("mlp.gate", a * f)                                          # 13.
        t.add("mlp.up", a * f)                                            # 14.
        t.add("mlp.act", a * f)                                           # 14.
        _linear_group(t, "down", f, [lins["down_proj"]], ad, tr, a, ai, r, dropout)   # 15.
    if gemma:
        _norm(t, "post_mlp_norm", h, a, in_grad=True, w_grad=tr, gemma=True)
    return dict(t.d)


def model_level_terms(model: ModelSpec, cfg: TrainConfig) -> dict[str, float]:
    """18. Bytes per token saved outside the decoder layers (final norm, lm_head input)."""
    a, ai, r, h = act_bytes(cfg), adapter_input(cfg), cfg.lora_rank, model.hidden_size
    t = _Terms()
    full = cfg.method == Method.FULL
    _norm(t, "final_norm", h, a, in_grad=True, w_grad=full, gemma=model.model_type == "gemma2")
    if full:
        t.add("lm_head.input", a * h)
    if head_adapted(cfg):
        t.add("lm_head.lora_input", ai.nbytes * h)
        t.add("lm_head.lora_A_out", ai.nbytes * r)
    t.add("batch.int64", 3 * 8)                                          # 19.
    return dict(t.d)


def layer_constant_bytes(model: ModelSpec, cfg: TrainConfig, layer: int) -> int:
    """17c. Token-independent bytes a layer saves: with peft's ParamWrapper on MoE expert
    banks (all-linear LoRA, transformers ≥ 5) the merged banks W + B·A (a bytes, E·3·f·h)
    and the a-byte casts of the reshaped adapters are saved by the expert matmuls — a full
    copy of every expert bank per MoE layer (e.g. Qwen3-30B-A3B: 1.2 GB per layer)."""
    if not moe_adapted(model, cfg, layer):
        return 0
    a = act_bytes(cfg)
    E, f, h = model.num_experts, model.moe_intermediate_size, model.hidden_size
    router, banks = moe_adapter_params(model, cfg)
    return a * (E * 3 * f * h + E * h) + a * (router + banks)


def constant_bytes(model: ModelSpec, cfg: TrainConfig) -> int:
    """19. Batch-independent tensors: cos/sin tables and position ids.
    20b. eager + checkpointing: the explicit (b, 1, s, s) a-byte causal mask is an input of
    every checkpointed layer call, so the recompute closures keep it alive until backward."""
    mask = 0
    if cfg.attention == Attention.EAGER and cfg.checkpointing != Checkpointing.NONE:
        mask = cfg.micro_batch * cfg.seq_len ** 2 * act_bytes(cfg)
    return 2 * cfg.seq_len * model.head_dim * act_bytes(cfg) + 8 * cfg.seq_len + mask


@dataclass(frozen=True)
class ActivationEstimate:
    tokens: int
    """micro_batch · seq_len."""
    layer_terms: dict
    """Largest layer's terms, bytes per token (no checkpointing)."""
    per_token_layers: float
    """Σ over layers of saved bytes per token without checkpointing."""
    per_token_other: float
    """Model-level saved bytes per token (final norm, lm_head input, batch)."""
    constant: int
    saved: int
    """Bytes saved at the end of the forward pass (with checkpointing: the layer inputs)."""
    recompute: int
    """Bytes one checkpointed layer re-materialises during backward (0 without checkpointing)."""
    forward_transient: int
    """Largest per-layer forward working set beyond saved tensors (eager softmax)."""
    backward_transient: int
    """Largest per-layer backward working set beyond the layer's saved tensors (activation gradients, casts)."""
    breakdown: dict = field(default_factory=dict)


_MLP_PREFIXES = ("mlp_norm.", "gate_up.", "mlp.", "down.", "moe.", "post_mlp_norm.")
_S2_TERMS = ("attn.softmax_fp32", "attn.probs", "attn.softcap_tanh")


def layer_transients(model: ModelSpec, cfg: TrainConfig, flags: LayerFlags,
                     terms: dict[str, float]) -> tuple[float, float]:
    """(forward, backward) working set of one layer, bytes per token, beyond its saved terms.

    22. forward, eager attention: at the softmax the a-byte masked scores, their fp32 cast
        (aten `softmax(x, dtype=float32)` converts first for bf16 — only fp16 on CUDA has
        the fused half-to-float path) and the fp32 output coexist: (a + 8)·H·s. SDPA and the
        MLP have no forward working set beyond a few a·f tensors that are saved anyway.
    23. backward, MLP (first block reached): the incoming residual gradient a·h and the
        block-input gradient a·h, ∂(down input) a·f, then the product rule makes ∂act and
        ∂up (a·f each) while ∂(down input) is still referenced → 3·a·f + 2·a·h. A LoRA down
        /gate/up adapter adds its fp32 path: ∂ of the fp32 sum (4·out) and ∂ of the fp32
        input copy (4·in): 2·a·f + ab·(f + h) + a·h for a LoRA down_proj (23b).
    24. backward, eager attention (reached after the MLP's saved tensors and the saved
        probabilities were freed): ∂probs' fp32 upcast (4·H·s) and the softmax input
        gradient (4·H·s) coexist → 8·H·s + 2·a·h, minus what was freed before.
    """
    if not flags.active:
        return 0.0, 0.0
    a, h, H, s = act_bytes(cfg), model.hidden_size, model.num_heads, cfg.seq_len
    f = model.moe_intermediate_size * model.experts_per_token if model.is_moe else model.intermediate_size
    eager = any(k in terms for k in _S2_TERMS)
    fwd = (a + 8) * H * s if eager else 0.0                                   # 22.
    mlp = 3 * a * f + 2 * a * h                                               # 23.
    ab = adapter_input(cfg).compute_bytes
    if flags.adapted and ab != a:
        # 23b. down_proj adapter backward: residual grad a·h, its fp32 copy ab·h, ∂(fp32
        #      input copy) ab·f, its cast a·f and the base input gradient a·f.
        mlp = max(mlp, 2 * a * f + ab * (f + h) + a * h)
    attn = 0.0
    if eager:                                                                 # 24.
        freed = sum(v for k, v in terms.items() if k.startswith(_MLP_PREFIXES)) + terms.get("attn.probs", 0.0)
        attn = 8 * H * s + 2 * a * h - freed
    return fwd, max(mlp, attn)


@dataclass(frozen=True)
class _Profile:
    """Everything per token (or per step) that does not depend on micro_batch."""

    per_layer_saved: float
    per_layer_full: float
    big_full: float
    big_saved: float
    terms: dict
    n_active: int
    layer_const_sum: int
    layer_const_max: int
    other: float
    const_no_batch: int
    fwd_tr: float
    bwd_tr: float
    dequant: int
    casts_sum: int = 0
    """5b. autocast casts of the adapter weights, all decoder layers (bytes)."""
    casts_max: int = 0
    """5b. the same, the layer with the most."""


def _profile(model: ModelSpec, cfg: TrainConfig) -> _Profile:
    flags = layer_flags(model, cfg)
    attn_saved = Attention.SDPA if (cfg.checkpointing == Checkpointing.SELECTIVE
                                    and cfg.attention == Attention.EAGER) else cfg.attention
    # decoder layers differ only by their flags and dense/MoE kind: one evaluation per kind
    kinds: dict = {}
    for i, fl in enumerate(flags):
        kinds.setdefault((fl, model.is_moe_layer(i)), []).append(i)
    per_saved = per_full = 0.0
    big, big_full, big_saved = 0, -1.0, 0.0
    const_sum = const_max = casts_sum = casts_max = 0
    for (fl, _moe), idx in kinds.items():
        i = idx[0]
        casts = adapter_weight_casts(model, cfg, i) if fl.adapted else 0
        casts_sum += casts * len(idx)
        casts_max = max(casts_max, casts)
        full = sum(layer_terms(model, cfg, i, fl).values())
        saved = full if attn_saved == cfg.attention else sum(layer_terms(model, cfg, i, fl, attention=attn_saved).values())
        c = layer_constant_bytes(model, cfg, i)
        per_full += full * len(idx)
        per_saved += saved * len(idx)
        const_sum += c * len(idx)
        const_max = max(const_max, c)
        if full > big_full:
            big, big_full, big_saved = i, full, saved
    terms = layer_terms(model, cfg, big, flags[big])
    # with selective recompute the eager s² terms are not saved, but the layer's forward
    # and its backward (after recompute) still materialise them: same transients.
    fwd_tr, bwd_tr = layer_transients(model, cfg, flags[big], terms)
    a = act_bytes(cfg)
    dequant = 0
    if cfg.method == Method.QLORA:
        # bnb dequantises the NF4 weight to the compute dtype for the matmul (forward) and
        # again for ∂input (backward): one a-byte copy of the largest Linear at a time.
        dequant = a * max(l.in_features * l.out_features for l in model.layer_linears(big))
    return _Profile(per_layer_saved=per_saved, per_layer_full=per_full, big_full=big_full, big_saved=big_saved,
                    terms=terms, n_active=sum(1 for fl in flags if fl.active), layer_const_sum=const_sum,
                    layer_const_max=const_max, other=sum(model_level_terms(model, cfg).values()),
                    const_no_batch=0, fwd_tr=fwd_tr, bwd_tr=bwd_tr, dequant=dequant,
                    casts_sum=casts_sum, casts_max=casts_max)


def _key(model: ModelSpec, cfg: TrainConfig, *, with_batch: bool) -> tuple:
    """The TrainConfig fields activations depend on (cheap cache key; no TrainConfig rebuild)."""
    return (model, cfg.method, cfg.lora_rank, cfg.lora_target, cfg.lora_dropout > 0, cfg.freeze_trainable_layers,
            cfg.precision, cfg.zero >= 1, cfg.attention, cfg.checkpointing, cfg.seq_len,
            cfg.micro_batch if with_batch else None)


_ACT: dict = {}
_PROFILE: dict = {}


def estimate_activations(model: ModelSpec, cfg: TrainConfig) -> ActivationEstimate:
    """Saved activations at the end of forward + the per-layer working sets, for one micro-batch."""
    return memoized(_ACT, _key(model, cfg, with_batch=True), 8192, lambda: _estimate_activations(model, cfg))


def _estimate_activations(model: ModelSpec, cfg: TrainConfig) -> ActivationEstimate:
    T = cfg.tokens_per_micro_batch
    p = memoized(_PROFILE, _key(model, cfg, with_batch=False), 4096, lambda: _profile(model, cfg))
    # 5b. autocast's adapter-weight casts: the lm_head's are model-level; the layers' are
    # saved with their layer, except under full checkpointing where only autocast's cache
    # holds them through the forward pass (counted as constant: at most a·adapter bytes high
    # in backward, where one layer's casts are recomputed).
    const = constant_bytes(model, cfg) + adapter_weight_casts(model, cfg)
    a, h = act_bytes(cfg), model.hidden_size
    if cfg.checkpointing == Checkpointing.FULL:
        layers_saved = p.n_active * a * h * T                              # 20.
        recompute = p.big_full * T + p.layer_const_max + p.casts_max
        const += p.casts_sum
    elif cfg.checkpointing == Checkpointing.SELECTIVE:
        layers_saved = p.per_layer_saved * T + p.layer_const_sum + p.casts_sum   # 21.
        recompute = (p.big_full - p.big_saved) * T
    else:
        layers_saved = p.per_layer_saved * T + p.layer_const_sum + p.casts_sum
        recompute = 0
    saved = int(layers_saved + p.other * T + const)
    breakdown = {"layers": int(layers_saved), "model_level": int(p.other * T), "constant": const}
    return ActivationEstimate(tokens=T, layer_terms=p.terms, per_token_layers=p.per_layer_full,
                              per_token_other=p.other, constant=const, saved=saved, recompute=int(recompute),
                              forward_transient=int(p.fwd_tr * T + p.dequant),
                              backward_transient=int(p.bwd_tr * T + p.dequant),
                              breakdown=breakdown)
