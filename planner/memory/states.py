"""Model states per GPU: parameters, gradients, optimizer states, fp32 master weights.

Bytes, per GPU, for every method × precision × optimizer × ZeRO stage × offload.

Two training stacks, decided by `cfg.zero`:

* `zero == 0` — **HF Trainer** (single GPU, or DDP across GPUs). What it really does:
  1. `bf16-mixed` / `bf16-true`: the user loads the checkpoint in bf16 (transformers ≥ 5
     `from_pretrained(dtype="auto")` keeps the checkpoint's bf16) and sets `bf16=True`.
     Autocast then has nothing to cast, gradients are bf16 (`.grad` has the parameter's
     dtype) and torch AdamW keeps `exp_avg`/`exp_avg_sq` in the *parameter dtype*
     (torch/optim/adamw.py `_init_group`: `torch.zeros_like(p, memory_format=...)`), so
     full fine-tuning costs 2 + 2 + 4 = 8 bytes/param and there is **no fp32 master copy**.
     DESIGN.md §2 fake-tensor run: Llama-3-8B full = params 15.0 GiB + Adam 29.9 GiB.
     DECISION: `bf16-mixed` without DeepSpeed is modelled this way (identical to
     `bf16-true`); a trainer that upcasts trainable weights to fp32 (LLaMA-Factory's
     default for full/freeze without ZeRO-3) costs 4 + 4 + 8 = 16 bytes/param instead —
     `planner.memory.states.HF_BF16_MIXED_WEIGHT_BYTES` is the one switch.
  2. `fp16-mixed`: `GradScaler` refuses fp16 gradients ("Attempting to unscale FP16
     gradients"), so trainable weights are fp32 (4 + 4 + 8) and autocast caches an fp16 copy
     of each trainable weight it casts (`torch.autocast(cache_enabled=True)`, kept until
     the autocast region exits, i.e. through backward via saved tensors): +2 bytes per
     trainable matmul weight during forward/backward (`autocast_cache`).
  3. `fp32`: 4 + 4 + 8.
  4. LoRA/QLoRA adapters: peft `get_peft_model(..., autocast_adapter_dtype=True)` (default)
     upcasts bf16/fp16 adapters to fp32 (peft 0.21 `tuners_utils.cast_adapter_dtype`), so
     adapters cost 4 + 4 + 8 bytes/param whatever the base dtype.
* `zero >= 1` — **DeepSpeed** ZeRO (`deepspeed/runtime/zero/stage_1_and_2.py`, `stage3.py`):
  5. the engine casts the module to the 16-bit dtype (adapters included), keeps fp32 master
     weights + fp32 Adam states for the trainable partition, and converts this rank's
     gradient partition to fp32 inside `step()` (`single_partition_of_fp32_groups[i].grad`):
     its own estimator is 2Ψ + 18Ψ/N for ZeRO-2 (2 grads16 + 4 grads32 + 4 master + 8 Adam).
  6. ZeRO-1 shards master + optimizer states; ZeRO-2 also the (16-bit) gradients; ZeRO-3 also
     the parameters. Frozen weights (LoRA base, freeze method) are not in any optimizer
     group, so ZeRO-1/2 keep them whole on every rank; ZeRO-3 partitions *every*
     parameter (`zero.Init` / `_convert_to_zero_parameters`), frozen ones included.
  7. offload "optimizer": master + optimizer states + fp32 gradients live in CPU memory and
     the step runs there (ZeRO-Offload); with ZeRO-2/3 the gradient partitions are copied to
     pinned CPU buffers during backward too. "optimizer+params" (ZeRO-3): the 16-bit
     parameter partitions live on the CPU as well and are fetched per module.

Optimizer states per trainable parameter (state dtype s = parameter dtype for torch, fp32
for DeepSpeed's master partition):
  8. adamw: exp_avg + exp_avg_sq = 2·s; fused AdamW (HF `adamw_torch_fused`) also keeps a
     4-byte `step` tensor per parameter tensor on the device.
  9. adamw-8bit / paged-adamw-8bit (bitsandbytes): two uint8 states + one fp32 absmax per
     256-value block (`optimizer_update_8bit_blockwise`) = 2·(1 + 4/256) bytes; tensors with
     fewer than 4096 elements (min_8bit_size) keep fp32 states. Paged states live in CUDA
     unified memory: they are on the GPU unless the driver evicts them under pressure.
 10. sgd: HF `optim="sgd"` is `torch.optim.SGD` with momentum 0 → no state. (With
     momentum it would be 1·s.)
 11. adafactor (transformers.optimization.Adafactor, beta1=None): factored second moment,
     exp_avg_sq_row (rows) + exp_avg_sq_col (cols) per matrix, full exp_avg_sq per vector,
     all fp32 (`grad.float()` before the states are created with `.to(grad)`).
"""
from __future__ import annotations

from dataclasses import dataclass

from planner.config import Method, Offload, Optimizer, Precision, TrainConfig
from planner.memory.counts import ParamCounts, adapted_linears, head_adapted, param_counts, trainable_layer_indices
from planner.model import ModelSpec, bytes_per_param_nf4

#: bytes per base weight for bf16-mixed / bf16-true without DeepSpeed (see decision 1 above).
HF_BF16_MIXED_WEIGHT_BYTES = 2

#: bitsandbytes blockwise 8-bit optimizer: 1 byte per state value + fp32 absmax per 256 values.
BNB_8BIT_STATE_BYTES = 1 + 4 / 256


@dataclass(frozen=True)
class ModelStates:
    """Per-GPU bytes of the model states (and what went to the CPU)."""

    counts: ParamCounts
    deepspeed: bool
    parameters: int
    """Resident weights on this GPU (NF4 + 16-bit rest for QLoRA; ZeRO-3: this rank's partition)."""
    gradients: int
    """Gradient bytes held at the end of backward (full, or this rank's ZeRO-2/3 partition)."""
    gradients_full: int
    """Gradient bytes of all trainable params in their grad dtype (what backward produces before any reduce)."""
    optimizer: int
    master_weights: int
    step_transient: int
    """Extra GPU bytes alive only inside optimizer.step() (DeepSpeed fp32 gradient partition, ...)."""
    autocast_cache: int
    """fp16 copies of fp32 trainable weights cached by autocast through forward+backward (fp16-mixed)."""
    cpu_bytes: int
    """Host bytes of offloaded states (not part of any GPU category)."""
    weight_bytes: float
    """Bytes per trainable base parameter (param dtype)."""
    notes: tuple[str, ...] = ()


def weight_bytes_per_param(cfg: TrainConfig, *, trainable: bool) -> int:
    """Storage bytes of one (non-quantised) base weight."""
    if cfg.precision == Precision.FP32:
        return 4
    if cfg.zero >= 1:
        return 2  # 5. DeepSpeed runs the module in 16-bit
    if cfg.precision == Precision.FP16_MIXED:
        return 4 if trainable else 2  # 2. GradScaler needs fp32 trainable weights
    return HF_BF16_MIXED_WEIGHT_BYTES  # 1.


def adapter_bytes_per_param(cfg: TrainConfig) -> int:
    if cfg.zero >= 1 and cfg.precision != Precision.FP32:
        return 2  # 5. engine.module.bfloat16()/half() casts the adapters too
    return 4  # 4. peft autocast_adapter_dtype=True


def _state_bytes_per_param(cfg: TrainConfig, state_dtype_bytes: int) -> float:
    opt = cfg.optimizer
    if opt == Optimizer.ADAMW:
        return 2 * state_dtype_bytes  # 8.
    if opt in (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW_8BIT):
        return 2 * BNB_8BIT_STATE_BYTES  # 9.
    if opt == Optimizer.SGD:
        return 0  # 10.
    raise AssertionError("adafactor is factored, see _adafactor_elems")


def _adafactor_elems(model: ModelSpec, cfg: TrainConfig) -> int:
    """11. Factored second-moment elements: rows+cols per matrix, numel per vector."""
    h, V = model.hidden_size, model.vocab_size
    elems = 0
    layers = trainable_layer_indices(model, cfg)
    for i in layers:
        for lin in model.layer_linears(i):
            elems += lin.in_features + lin.out_features + (lin.out_features if lin.bias else 0)
        elems += model.norm_params_per_layer + (2 * model.head_dim if model.qk_norm else 0)
        if model.is_moe_layer(i):
            E, f = model.num_experts, model.moe_intermediate_size
            # a 3-D bank (E, 2f, h) factors over its last two dims: E·(2f + h); down E·(h + f); router E + h.
            elems += E * (2 * f + h) + E * (h + f) + (E + h)
    if cfg.method == Method.FULL:
        elems += (V + h) + (0 if model.tie_embeddings else V + h) + h
    r = cfg.lora_rank
    if cfg.is_adapter:
        for i in range(model.num_layers):
            for lin in adapted_linears(model, cfg, i):
                elems += (r + lin.in_features) + (lin.out_features + r)
        if head_adapted(cfg):
            elems += (r + h) + (V + r)
    return elems


def model_states(model: ModelSpec, cfg: TrainConfig) -> ModelStates:
    c = param_counts(model, cfg)
    N = cfg.world_size
    ds = cfg.zero >= 1
    notes: list[str] = []

    # ---- parameters (all ranks hold the same unless ZeRO-3) -------------------------------
    # 12. trainable base weights and frozen base weights may differ in dtype (fp16-mixed);
    #     QLoRA: decoder-layer Linear weights in NF4 (+ absmax, planner.model.bytes_per_param_nf4),
    #     everything else (embeddings, lm_head, norms, biases, MoE expert banks which are not
    #     nn.Linear in transformers ≥ 5) stays 16-bit.
    wt = weight_bytes_per_param(cfg, trainable=True)
    wf = weight_bytes_per_param(cfg, trainable=False)
    if cfg.method == Method.QLORA:
        nf4 = bytes_per_param_nf4(cfg.double_quant)
        rest = c.total_base - c.linear_weight_elems
        base_bytes = c.linear_weight_elems * nf4 + rest * wf
        notes.append(f"QLoRA: {c.linear_weight_elems / 1e9:.2f} B linear weights at {nf4:.4f} B/param (NF4"
                     f"{' + double-quant absmax' if cfg.double_quant else ' + fp32 absmax'}); embeddings, lm_head, "
                     "norms stay 16-bit (peft prepare_model_for_kbit_training would upcast them to fp32)")
    else:
        base_bytes = c.trainable_base * wt + c.frozen_base * wf
    ab = adapter_bytes_per_param(cfg)
    param_bytes = base_bytes + c.adapter * ab

    # ---- gradients: one per trainable parameter, in its dtype ------------------------------
    grad_full = c.trainable_base * wt + c.adapter * ab

    # ---- optimizer states and master weights ---------------------------------------------
    # 13. DeepSpeed: fp32 master + fp32 states when the model runs in 16-bit; torch: param dtype.
    master = 4 * c.trainable if (ds and cfg.precision != Precision.FP32) else 0
    if cfg.optimizer == Optimizer.ADAFACTOR:
        opt_bytes = 4 * _adafactor_elems(model, cfg)
    elif ds:
        opt_bytes = _state_bytes_per_param(cfg, 4) * c.trainable
    else:
        opt_bytes = (_state_bytes_per_param(cfg, wt) * c.trainable_base
                     + _state_bytes_per_param(cfg, ab) * c.adapter)
    if cfg.optimizer == Optimizer.ADAMW and not ds:
        opt_bytes += 4 * c.trainable_tensors  # 8. fused AdamW `step` tensors on the device
    if cfg.optimizer == Optimizer.PAGED_ADAMW_8BIT:
        notes.append("paged 8-bit AdamW: states are in CUDA unified memory and can page to the CPU under "
                     "pressure (counted on the GPU here)")

    # ---- autocast cache (fp16-mixed with fp32 trainable weights) --------------------------
    autocast = 0
    if cfg.precision == Precision.FP16_MIXED and not ds:
        matmul_trainable = sum(lin.in_features * lin.out_features
                               for i in trainable_layer_indices(model, cfg) for lin in model.layer_linears(i))
        if cfg.method == Method.FULL:
            matmul_trainable += model.vocab_size * model.hidden_size  # lm_head (tied: the embedding)
        autocast = 2 * matmul_trainable

    # ---- ZeRO sharding + offload ------------------------------------------------------------
    step_transient = 0
    cpu = 0
    grads = grad_full
    if ds:
        grad16 = 2 * c.trainable if cfg.precision != Precision.FP32 else 4 * c.trainable
        # 14. stage ≥ 2 keeps only this rank's partition of the reduced gradients
        #     (grads_in_partition / grad_partitions_flat_buffer, 16-bit); stage 1 keeps every
        #     param.grad until `reduce_gradients()` at the step.
        grads = grad16 // N if cfg.zero >= 2 else grad16
        grad_full = grad16
        opt_part = int(opt_bytes // N)
        master_part = master // N
        # 15. inside step(): this rank's gradient partition converted to fp32
        #     (stage 1/2: all groups; stage 3: one sub_group of ≤ sub_group_size elements).
        fp32_grad = 4 * c.trainable // N if cfg.precision != Precision.FP32 else 0
        if cfg.zero == 3:
            fp32_grad = min(fp32_grad, 4 * 1_000_000_000)
            param_bytes = param_bytes / N
        if cfg.offload in (Offload.OPTIMIZER, Offload.OPTIMIZER_PARAMS):
            cpu += opt_part + master_part + 4 * c.trainable // N
            if cfg.zero >= 2:
                cpu += grads
                grads = 0
            opt_part = master_part = fp32_grad = 0
        if cfg.offload == Offload.OPTIMIZER_PARAMS:
            cpu += int(param_bytes)
            param_bytes = 0
        opt_bytes, master, step_transient = opt_part, master_part, fp32_grad
        if cpu:
            notes.append(f"CPU offload holds {cpu / 2**30:.1f} GiB per rank in host memory "
                         f"({cpu * cfg.gpus / 2**30:.0f} GiB per node, pinned)")

    return ModelStates(counts=c, deepspeed=ds, parameters=int(param_bytes), gradients=int(grads),
                       gradients_full=int(grad_full), optimizer=int(opt_bytes), master_weights=int(master),
                       step_transient=int(step_transient), autocast_cache=int(autocast), cpu_bytes=int(cpu),
                       weight_bytes=wt, notes=tuple(notes))
