"""Build the model a `TrainConfig` describes, random-initialised from its HF config.json.

    built = build_for_training(spec, cfg, device="cpu")   # or "cuda"
    built.module(input_ids=..., labels=...)                # compiled wrapper when cfg.compile

No downloads, ever: weights are random (transformers' own `_init_weights`), or read from a
local weights directory (`weights_dir`, `local_files_only=True`).

Precision regimes (TrainConfig.precision), as the memory model reads them
(planner/memory/states.py, decisions 1-4):

=============  ==============================================================================
bf16-mixed     HF Trainer `bf16=True` on a bf16 checkpoint: bf16 weights, bf16 gradients,
               AdamW states in bf16 (torch keeps them in the parameter dtype), bf16 autocast
               (it has only the fp32 LoRA adapters to cast). No fp32 master copy.
bf16-true      the same weights, no autocast.
fp16-mixed     fp16 frozen weights; trainable weights upcast to fp32 (GradScaler refuses fp16
               gradients); fp16 autocast + GradScaler.
fp32           fp32 everything.
LoRA / QLoRA   adapters in fp32 in every regime (peft `autocast_adapter_dtype=True`, its
               default).
=============  ==============================================================================

With DeepSpeed (`--zero N`) the engine casts the module to 16-bit itself and keeps fp32
master weights and optimizer states in its optimizer.

QLoRA: every decoder `nn.Linear` becomes a bitsandbytes `Linear4bit` (NF4, double quant
per `cfg.double_quant`, compute dtype = the autocast dtype — bitsandbytes' defaults are fp4
and fp32 compute, so both are set explicitly); `lm_head` stays 16-bit. The model is built in
16-bit on the target device first and each weight is quantised in place (the 16-bit copy is
freed linear by linear), the way `from_pretrained(quantization_config=...)` ends up.
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from planner.config import Attention, Checkpointing, Method, Optimizer, Precision, TrainConfig, LORA_ALL_LINEAR
from planner.errors import PlanError

__all__ = ["BuiltModel", "DtypePlan", "dtype_plan", "build_for_training", "make_optimizer", "hf_config"]


@dataclass(frozen=True)
class DtypePlan:
    """Which dtype each part of the model holds, and which autocast (if any) runs."""

    base: str
    """Weights of the base model as built: "float32" | "bfloat16" | "float16"."""
    trainable: str | None
    """Dtype trainable base weights are cast to (fp16-mixed: "float32"); None = as built."""
    adapter: str | None
    """LoRA adapter weights (None when there are no adapters)."""
    autocast: str | None
    """Autocast compute dtype, None for none."""
    grad_scaler: bool = False
    """fp16-mixed: loss scaling."""


def dtype_plan(cfg: TrainConfig) -> DtypePlan:
    p = cfg.precision
    adapter = "float32" if cfg.is_adapter else None
    if p == Precision.FP32:
        return DtypePlan("float32", None, adapter, None)
    if p == Precision.BF16_TRUE:
        return DtypePlan("bfloat16", None, adapter, None)
    if p == Precision.BF16_MIXED:
        return DtypePlan("bfloat16", None, adapter, "bfloat16")
    return DtypePlan("float16", "float32", adapter, "float16", grad_scaler=True)  # fp16-mixed


@dataclass
class BuiltModel:
    model: Any
    """The nn.Module (a PeftModel for LoRA/QLoRA)."""
    module: Any
    """What to call for a step: `model`, or its `torch.compile` wrapper."""
    trainable_params: int
    total_params: int
    """Logical parameter count (NF4 weights counted as their unquantised element count)."""
    param_bytes: int
    """Bytes of every parameter tensor as stored (NF4 packed: 0.5 byte per weight)."""
    quant_state_bytes: int
    """QLoRA: absmax / double-quant constants held outside the parameters."""
    dtypes: DtypePlan
    attention_impl: str
    """The attn_implementation transformers was given."""
    vocab_size: int
    device: str
    notes: list[str] = field(default_factory=list)


def hf_config(config_dict: dict[str, Any]):
    """An HF PretrainedConfig from a config.json dict (tuneplan's `_tuneplan` key and dtype fields dropped)."""
    from transformers import AutoConfig

    d = {k: v for k, v in dict(config_dict).items() if not k.startswith("_")}
    for k in ("torch_dtype", "dtype", "transformers_version", "quantization_config", "auto_map"):
        d.pop(k, None)
    model_type = d.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **d)
    cfg.use_cache = False  # packing needs it off (DESIGN.md §2); training never uses the cache
    return cfg


def _attention_impl(cfg: TrainConfig, device: str, notes: list[str]) -> str:
    if cfg.attention == Attention.FLASH:
        if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        why = "flash-attn is not installed" if device == "cuda" else "flash-attention 2 needs CUDA"
        notes.append(f"--attention flash: {why}; ran sdpa (on CUDA its flash backend)")
        return "sdpa"
    return {Attention.SDPA: "sdpa", Attention.EAGER: "eager"}[cfg.attention]


def _enable_checkpointing(model) -> None:
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def _lora_targets(cfg: TrainConfig):
    t = list(cfg.lora_target)
    if t in (["all"], [LORA_ALL_LINEAR], ["all_linear"]):
        return LORA_ALL_LINEAR
    return t


def _quantize_nf4(model, device: str, compute_dtype, double_quant: bool) -> int:
    """Replace every nn.Linear except the output head by bitsandbytes NF4 `Linear4bit`.

    Returns the bytes of the quantisation constants (absmax, nested absmax, code) that live in
    each weight's `quant_state`, outside the parameter storage.
    """
    import torch
    from torch import nn

    try:
        import bitsandbytes as bnb
    except ImportError:
        raise PlanError("--method qlora needs bitsandbytes (pip install 'tuneplan[quant]')") from None
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is head:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant,
                                  quant_type="nf4", device="meta")
            w = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=double_quant,
                                  quant_type="nf4", module=q)
            q.weight = w._quantize(device)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
            del child, w
    model.is_loaded_in_4bit = True  # peft dispatches its bnb LoRA layers on this flag
    model.is_quantized = True
    if device == "cuda":
        torch.cuda.empty_cache()
    return _quant_state_bytes(model)


def _quant_state_bytes(model) -> int:
    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if t is not None and hasattr(t, "untyped_storage"):
            key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()

    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is None:
            continue
        add(getattr(qs, "absmax", None))
        add(getattr(qs, "code", None))
        nested = getattr(qs, "state2", None)
        if nested is not None:
            add(getattr(nested, "absmax", None))
            add(getattr(nested, "code", None))
        add(getattr(qs, "offset", None))
    return total


def _count(model) -> tuple[int, int, int]:
    trainable = total = nbytes = 0
    for p in model.parameters():  # de-duplicates tied weights
        n = p.numel()
        nbytes += n * p.element_size()
        if getattr(p, "quant_state", None) is not None:  # packed NF4: 2 weights per uint8
            shape = getattr(p.quant_state, "shape", None)
            n = int(torch_numel(shape)) if shape is not None else 2 * n
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total, nbytes


def torch_numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def build_for_training(spec, cfg: TrainConfig, device: str, *, seed: int = 0, weights_dir: str | None = None,
                       meta: bool = False) -> BuiltModel:
    """The model of `cfg` on `device` ("cpu" | "cuda"), ready to train; `meta=True` builds on
    the meta device (no memory; fake-tensor runs swap in fake tensors afterwards)."""
    import torch
    from transformers import AutoModelForCausalLM

    notes: list[str] = []
    if cfg.checkpointing == Checkpointing.SELECTIVE:
        raise PlanError("--checkpointing selective has no HF implementation to run; profile 'full' or 'none'")
    if cfg.method == Method.QLORA and meta:
        raise PlanError("QLoRA (bitsandbytes NF4) cannot run on fake tensors; use --device cuda "
                        "(or --device cpu for small models)")
    dp = dtype_plan(cfg)
    attn = _attention_impl(cfg, device, notes)
    base_dtype = getattr(torch, dp.base)
    hf_cfg = hf_config(spec.config)
    if seed is not None:
        torch.manual_seed(seed)
    build_device = "meta" if meta else device
    if weights_dir:
        model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=base_dtype, attn_implementation=attn,
                                                     local_files_only=True, device_map=build_device)
        model.config.use_cache = False
        notes.append(f"weights read from {weights_dir}")
    else:
        with torch.device(build_device):
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=base_dtype, attn_implementation=attn)
    model.train()
    quant_bytes = 0
    if cfg.method == Method.QLORA:
        quant_bytes = _quantize_nf4(model, device, getattr(torch, dp.autocast or dp.base), cfg.double_quant)

    if cfg.checkpointing == Checkpointing.FULL:
        _enable_checkpointing(model)

    if cfg.is_adapter:
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=_lora_targets(cfg), task_type="CAUSAL_LM", bias="none")
        try:
            model = get_peft_model(model, lcfg, autocast_adapter_dtype=dp.adapter == "float32")
        except ValueError as exc:  # e.g. target modules not found
            raise PlanError(f"LoRA: {' '.join(str(exc).split())[:300]}") from None
        model.train()
    elif cfg.method == Method.FREEZE:
        layers = model.model.layers
        k = cfg.freeze_trainable_layers
        keep = set(range(len(layers) - k, len(layers))) if k > 0 else set(range(0, -k))
        for p in model.parameters():
            p.requires_grad_(False)
        for i in keep:
            for p in layers[i].parameters():
                p.requires_grad_(True)
    if dp.trainable and not cfg.is_adapter:
        tdt = getattr(torch, dp.trainable)
        for p in model.parameters():
            if p.requires_grad and p.dtype != tdt:
                p.data = p.data.to(tdt)
    if cfg.checkpointing == Checkpointing.FULL and cfg.method != Method.FULL:
        # non-reentrant checkpointing needs no input grad, but HF / LLaMA-Factory turn it on:
        # the backward then runs down to layer 0 (same memory as a real fine-tuning job).
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.enable_input_require_grads()

    trainable, total, nbytes = _count(model)
    module = model
    if cfg.compile:
        if meta:
            notes.append("--compile ignored on fake tensors")
        else:
            module = torch.compile(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    return BuiltModel(model=model, module=module, trainable_params=trainable, total_params=total,
                      param_bytes=nbytes, quant_state_bytes=quant_bytes, dtypes=dp, attention_impl=attn,
                      vocab_size=int(vocab), device=device, notes=notes)


def make_optimizer(params, cfg: TrainConfig, device: str, *, lr: float = 1e-5, notes: list[str] | None = None):
    """The torch optimizer `cfg.optimizer` names (fused AdamW where the device has it)."""
    import torch

    params = list(params)
    notes = notes if notes is not None else []
    opt = cfg.optimizer
    if opt == Optimizer.ADAMW:
        try:
            o = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
            notes.append("optimizer: torch AdamW (fused)")
            return o
        except (RuntimeError, TypeError, ValueError) as exc:  # a dtype/device without a fused kernel
            notes.append(f"optimizer: torch AdamW (foreach; fused unavailable: {exc})")
            return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    if opt in (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW_8BIT):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise PlanError(f"--optimizer {opt} needs bitsandbytes (pip install 'tuneplan[quant]')") from None
        if opt == Optimizer.PAGED_ADAMW_8BIT:
            if device != "cuda":
                notes.append("paged-adamw-8bit: paging needs CUDA; bitsandbytes falls back to unpaged on CPU")
            return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=0.0)
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
    if opt == Optimizer.SGD:
        return torch.optim.SGD(params, lr=lr, momentum=0.0)
    if opt == Optimizer.ADAFACTOR:
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    raise PlanError(f"optimizer {opt} is not supported by the profiler")  # pragma: no cover


@contextlib.contextmanager
def autocast(device: str, dtype_name: str | None):
    import torch

    if not dtype_name:
        yield
        return
    with torch.autocast(device_type=device, dtype=getattr(torch, dtype_name)):
        yield
