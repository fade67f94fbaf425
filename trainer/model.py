"""Build the model a `TrainConfig` describes: full / freeze / LoRA / QLoRA.

    model, info = build_model(spec, cfg, weights_dir=None, device="cpu")

- Weights: `weights_dir` (a local HF model directory: config.json + safetensors) is loaded
  with `from_pretrained(local_files_only=True)`; without it the model is randomly
  initialised from `spec.config` (`AutoConfig.for_model(**spec.config)`), seeded.
- Precision: `bf16-true` loads bf16 weights; `bf16-mixed` / `fp16-mixed` / `fp32` keep fp32
  weights (mixed precision is autocast, switched on by the Trainer's `bf16`/`fp16` flags).
- Methods:
  * full   — every parameter trains;
  * freeze — only the last `cfg.freeze_trainable_layers` decoder layers train (LLaMA-Factory's
    `freeze_trainable_layers`; embeddings, final norm and lm_head stay frozen);
  * lora   — peft `LoraConfig(r, alpha, dropout, target_modules)`, "all-linear" = every
    nn.Linear of the decoder except lm_head (peft's own rule);
  * qlora  — bitsandbytes NF4 with double quantisation and bf16 (fp16 with fp16-mixed)
    compute dtype, `prepare_model_for_kbit_training`, then LoRA. A randomly initialised
    QLoRA base is saved to a temporary directory first, because transformers quantises
    on `from_pretrained` only. On CPU `device_map="cpu"` (bitsandbytes ≥ 0.45 has CPU
    4-bit kernels); on CUDA `device_map={"": local_rank}`.
- `attn_implementation`: flash → "flash_attention_2" when `flash_attn` is importable and CUDA
  is present, else sdpa (with a note in `info["notes"]`).
- `use_cache=False` always: the packed (DataCollatorWithFlattening) mask is only derived
  when no cache is created (DESIGN.md §2, packing trap).

Gradient checkpointing, torch.compile and NEFTune are switched on through the Trainer
(`TrainingArguments.activation_checkpointing`, `torch_compile`, `neftune_noise_alpha`) so
that they compose with DeepSpeed and peft the way transformers tests them; see
`trainer.run.training_arguments`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from planner.config import LORA_ALL_LINEAR, Method, Precision, TrainConfig
from planner.errors import PlanError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def has_weights(path: str | os.PathLike | None) -> bool:
    """A local directory that holds HF weights (not just a config.json)."""
    if not path:
        return False
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in WEIGHT_FILES)


def torch_dtype(cfg: TrainConfig):
    """dtype of the (non-quantised) weights for this precision regime."""
    import torch

    return torch.bfloat16 if cfg.precision == Precision.BF16_TRUE else torch.float32


def compute_dtype(cfg: TrainConfig):
    """Compute dtype of the 4-bit layers (QLoRA): bf16 unless the run is fp16."""
    import torch

    return torch.float16 if cfg.precision == Precision.FP16_MIXED else torch.bfloat16


def attn_implementation(cfg: TrainConfig, notes: list[str] | None = None) -> str:
    want = {"flash": "flash_attention_2", "sdpa": "sdpa", "eager": "eager"}[cfg.attention.value]
    if want == "flash_attention_2":
        import importlib.util

        import torch

        if not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
            if notes is not None:
                notes.append("flash-attention 2 not available here (needs CUDA + flash_attn): using sdpa")
            return "sdpa"
    return want


def hf_config(spec, vocab_size: int | None = None):
    """transformers config for a ModelSpec (optionally with a larger vocabulary)."""
    from transformers import AutoConfig

    d = dict(spec.config)
    model_type = d.pop("model_type")
    for k in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        d.pop(k, None)
    if vocab_size and vocab_size > d.get("vocab_size", 0):
        d["vocab_size"] = vocab_size
    d["use_cache"] = False
    return AutoConfig.for_model(model_type, **d)


def lora_targets(cfg: TrainConfig) -> str | list[str]:
    t = list(cfg.lora_target)
    return "all-linear" if t == [LORA_ALL_LINEAR] or "all-linear" in t else t


def decoder_layers(model):
    """The ModuleList of decoder layers (works through peft wrappers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise PlanError(f"cannot find the decoder layers of {type(base).__name__} for --method freeze")
    return layers


def apply_freeze(model, n_trainable: int) -> None:
    """Freeze everything but the last `n_trainable` decoder layers."""
    layers = decoder_layers(model)
    if n_trainable > len(layers):
        raise PlanError(f"--freeze-trainable-layers {n_trainable} exceeds the model's {len(layers)} layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[len(layers) - n_trainable:]:
        for p in layer.parameters():
            p.requires_grad_(True)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights counted as their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n = int(getattr(p, "quant_state", None).shape.numel()) if getattr(p, "quant_state", None) else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def _quantization_config(cfg: TrainConfig):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=bool(cfg.double_quant),
        bnb_4bit_compute_dtype=compute_dtype(cfg),
        bnb_4bit_quant_storage=compute_dtype(cfg) if cfg.zero == 3 else None,
    )


def _device_map(device: str):
    if device == "cpu":
        return "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return {"": local_rank}


def build_base_model(spec, cfg: TrainConfig, *, weights_dir=None, vocab_size: int | None = None,
                     seed: int = 42, device: str = "cpu", notes: list[str] | None = None,
                     save_random_init_to=None):
    """The causal LM before any adapter: loaded, or randomly initialised (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    notes = notes if notes is not None else []
    attn = attn_implementation(cfg, notes)
    dtype = torch_dtype(cfg)
    quant = cfg.method == Method.QLORA
    if quant:
        _check_bitsandbytes(device)
    if weights_dir is not None and has_weights(weights_dir):
        kwargs: dict[str, Any] = dict(local_files_only=True, attn_implementation=attn, dtype=dtype)
        if quant:
            kwargs.update(quantization_config=_quantization_config(cfg), device_map=_device_map(device),
                          dtype=compute_dtype(cfg))
        model = AutoModelForCausalLM.from_pretrained(str(weights_dir), **kwargs)
        model.config.use_cache = False
        if vocab_size and vocab_size > model.get_input_embeddings().num_embeddings:
            if quant:
                raise PlanError(f"the tokenizer has {vocab_size} tokens, more than the model's embedding; "
                                "resize the base model before QLoRA")
            model.resize_token_embeddings(vocab_size)
        return model

    # random init from config.json, seeded so every rank and every resume builds the same weights
    set_seed(seed)
    config = hf_config(spec, vocab_size)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    model.config.use_cache = False
    if save_random_init_to is not None:
        # adapters of a randomly initialised base are useless without that base: keep it
        model.save_pretrained(str(save_random_init_to))
        model.config._name_or_path = str(save_random_init_to)
    if quant:
        with tempfile.TemporaryDirectory(prefix="tuneplan-qlora-") as tmp:
            src = str(save_random_init_to) if save_random_init_to is not None else tmp
            if save_random_init_to is None:
                model.save_pretrained(tmp)
            del model
            model = AutoModelForCausalLM.from_pretrained(
                src, local_files_only=True, attn_implementation=attn, dtype=compute_dtype(cfg),
                quantization_config=_quantization_config(cfg), device_map=_device_map(device))
        model.config.use_cache = False
    return model


def _check_bitsandbytes(device: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise PlanError(f"--method qlora needs bitsandbytes ({type(exc).__name__}: {exc}); "
                        "pip install 'bitsandbytes>=0.45'") from None


def apply_method(model, cfg: TrainConfig, *, gradient_checkpointing: bool = False):
    """freeze / LoRA / QLoRA on a built base model; returns the (possibly peft-wrapped) model."""
    if cfg.method == Method.FULL:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.method == Method.FREEZE:
        apply_freeze(model, cfg.freeze_trainable_layers)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == Method.QLORA:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=float(cfg.lora_dropout),
                      target_modules=lora_targets(cfg), bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise PlanError(f"LoRA targets {','.join(cfg.lora_target)}: {exc}") from None
    return model


def build_model(spec, cfg: TrainConfig, *, weights_dir=None, vocab_size: int | None = None, seed: int = 42,
                device: str = "cpu", save_random_init_to=None) -> tuple[Any, dict]:
    """Base model + method. Returns (model, info) with parameter counts and notes."""
    notes: list[str] = []
    from planner.config import Checkpointing

    model = build_base_model(spec, cfg, weights_dir=weights_dir, vocab_size=vocab_size, seed=seed, device=device,
                             notes=notes, save_random_init_to=save_random_init_to)
    model = apply_method(model, cfg, gradient_checkpointing=cfg.checkpointing != Checkpointing.NONE)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise PlanError(f"--method {cfg.method}: no parameter is trainable")
    info = {"trainable_params": trainable, "total_params": total,
            "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
            "random_init": not has_weights(weights_dir), "notes": notes}
    return model, info


def base_model_path_of_adapter(adapter_dir) -> str | None:
    cfg = Path(adapter_dir) / "adapter_config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("base_model_name_or_path")
