"""One description of a fine-tuning run: the planner evaluates it, the profiler executes it,
the trainer trains it.

`TrainConfig` is a frozen dataclass whose field names are tuneplan's own; `to_plan_yaml()` /
`from_mapping()` translate to and from the HF / LLaMA-Factory names that `plan.yaml` uses
(`per_device_train_batch_size`, `gradient_accumulation_steps`, `cutoff_len`, `lora_rank`,
`lora_target`, `deepspeed`, ...), accepting axolotl / torchtune names as aliases.

No torch import here: planning is arithmetic.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from planner.errors import PlanError


class _StrEnum(str, Enum):
    def __str__(self) -> str:  # "bf16-mixed", not "Precision.BF16_MIXED"
        return self.value

    @classmethod
    def parse(cls, value: Any, what: str):
        if isinstance(value, cls):
            return value
        text = str(value).strip().lower().replace("_", "-")
        for member in cls:
            if text == member.value or text in _ALIASES.get(cls.__name__, {}).get(member.value, ()):
                return member
        choices = ", ".join(m.value for m in cls)
        raise PlanError(f"unknown {what} {value!r}; choose one of: {choices}")


class Method(_StrEnum):
    FULL = "full"        # every weight trains
    FREEZE = "freeze"    # the last `freeze_trainable_layers` decoder layers train, the rest is frozen
    LORA = "lora"        # frozen 16-bit base + trainable low-rank adapters (peft)
    QLORA = "qlora"      # frozen NF4 base (bitsandbytes) + trainable adapters


class Precision(_StrEnum):
    BF16_MIXED = "bf16-mixed"  # fp32 weights/optimizer (master), bf16 autocast compute
    BF16_TRUE = "bf16-true"    # everything in bf16, no fp32 copy
    FP16_MIXED = "fp16-mixed"  # fp32 master + fp16 compute + loss scaling
    FP32 = "fp32"              # everything fp32


class Optimizer(_StrEnum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw-8bit"
    PAGED_ADAMW_8BIT = "paged-adamw-8bit"
    SGD = "sgd"
    ADAFACTOR = "adafactor"


class Offload(_StrEnum):
    NONE = "none"
    OPTIMIZER = "optimizer"                 # ZeRO-Offload: optimizer states + step on CPU
    OPTIMIZER_PARAMS = "optimizer+params"   # ZeRO-Infinity style (stage 3 only): params too


class Checkpointing(_StrEnum):
    NONE = "none"
    FULL = "full"            # recompute each decoder layer; keep only its input
    SELECTIVE = "selective"  # recompute attention core only (Korthikanti et al. 2022)


class Attention(_StrEnum):
    FLASH = "flash"  # flash-attention 2 (varlen for packing)
    SDPA = "sdpa"    # torch scaled_dot_product_attention (flash / mem-efficient backends)
    EAGER = "eager"  # explicit softmax(QK^T)V, materialises s×s scores


_ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "Method": {"qlora": ("q-lora",), "freeze": ("frozen",)},
    "Precision": {
        "bf16-mixed": ("bf16", "bf16-amp", "amp-bf16"),
        "bf16-true": ("pure-bf16", "bf16-pure"),
        "fp16-mixed": ("fp16", "16-mixed", "amp-fp16"),
        "fp32": ("32", "32-true", "fp32-true", "float32"),
    },
    "Optimizer": {
        "adamw": ("adamw-torch", "adamw-torch-fused", "adam"),
        "adamw-8bit": ("adamw-bnb-8bit", "adamw8bit", "8bit"),
        "paged-adamw-8bit": ("paged-adamw8bit",),
    },
    "Offload": {"optimizer+params": ("all", "optimizer-params", "full")},
    "Checkpointing": {"full": ("true", "yes", "on", "1"), "none": ("false", "no", "off", "0")},
    "Attention": {"flash": ("flash-attention-2", "flash-attn", "fa2", "flash-attn2"),
                  "sdpa": ("torch",), "eager": ("math",)},
}

LORA_ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class TrainConfig:
    """Every dimension of a fine-tuning run that changes memory or speed."""

    method: Method = Method.FULL
    """What trains: full | freeze | lora | qlora."""
    lora_rank: int = 16
    """LoRA rank r (lora / qlora only)."""
    lora_alpha: int = 32
    """LoRA scaling numerator (alpha / r scales the adapter output); no memory effect."""
    lora_dropout: float = 0.05
    """LoRA dropout; > 0 makes peft save a second (dropped-out) copy of each adapted input."""
    lora_target: tuple[str, ...] = (LORA_ALL_LINEAR,)
    """Adapted modules: ("all-linear",) or module names such as ("q_proj", "v_proj")."""
    double_quant: bool = True
    """QLoRA: quantise the NF4 absmax constants too (0.5 → 0.127 bits/param; planner.model.bytes_per_param_nf4)."""
    freeze_trainable_layers: int = 2
    """Method freeze: how many of the last decoder layers train."""
    precision: Precision = Precision.BF16_MIXED
    """Weight / compute precision regime."""
    optimizer: Optimizer = Optimizer.ADAMW
    """Optimizer; decides optimizer-state bytes per trainable parameter."""
    zero: int = 0
    """DeepSpeed ZeRO stage 0-3 (FSDP full shard is modelled as stage 3)."""
    offload: Offload = Offload.NONE
    """CPU offload of optimizer states (ZeRO ≥ 1) and parameters (ZeRO-3 only)."""
    micro_batch: int = 1
    """Sequences per GPU per forward pass (per_device_train_batch_size)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (gradient_accumulation_steps)."""
    seq_len: int = 2048
    """Tokens per sequence (cutoff_len); with packing, tokens per packed row."""
    packing: bool = False
    """Concatenate examples into full rows (no padding waste, no cross-attention)."""
    checkpointing: Checkpointing = Checkpointing.NONE
    """Activation (gradient) checkpointing."""
    attention: Attention = Attention.SDPA
    """Attention kernel."""
    chunked_ce: bool = False
    """Chunked / fused cross-entropy: logits never materialised for the whole sequence."""
    compile: bool = False
    """torch.compile the model."""
    gpus: int = 1
    """GPUs per node."""
    nodes: int = 1
    """Nodes."""

    # ------------------------------------------------------------------ derived
    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def is_adapter(self) -> bool:
        return self.method in (Method.LORA, Method.QLORA)

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step across all GPUs."""
        return self.micro_batch * self.grad_accum * self.world_size

    def __post_init__(self) -> None:
        # coerce strings so TrainConfig(method="lora") works, then validate.
        coerce = {"method": Method, "precision": Precision, "optimizer": Optimizer,
                  "offload": Offload, "checkpointing": Checkpointing, "attention": Attention}
        for name, enum in coerce.items():
            object.__setattr__(self, name, enum.parse(getattr(self, name), name))
        target = self.lora_target
        if isinstance(target, str):
            target = tuple(t.strip() for t in target.split(",") if t.strip())
        object.__setattr__(self, "lora_target", tuple(target))
        validate(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, Enum) else (list(v) if isinstance(v, tuple) else v)
        out["world_size"] = self.world_size
        out["global_batch"] = self.global_batch
        return out

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, warn=None) -> "TrainConfig":
        """Build from tuneplan names, HF / LLaMA-Factory names, or axolotl / torchtune aliases.

        Unknown keys are ignored (a plan.yaml carries training keys such as learning_rate);
        `warn(msg)` is called for each alias used.
        """
        kwargs: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key in names:
                target, conv = key, None
            elif key in HF_NAMES:
                target, conv = HF_NAMES[key]
            elif key in ALIAS_NAMES:
                target, conv = ALIAS_NAMES[key]
                if warn:
                    warn(f"'{key}' is an alias; tuneplan writes '{_hf_name_for(target)}'")
            else:
                continue
            if target is None:
                continue
            kwargs.update(conv(value) if conv else {target: value})
        kwargs = {k: _coerce(k, v) for k, v in kwargs.items()}
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - defensive
            raise PlanError(f"bad configuration: {exc}") from None

    def to_plan_yaml(self) -> dict[str, Any]:
        """The HF / LLaMA-Factory field names `tuneplan train --config` consumes."""
        finetuning_type = {"full": "full", "freeze": "freeze", "lora": "lora", "qlora": "lora"}[self.method.value]
        d: dict[str, Any] = {
            "finetuning_type": finetuning_type,
            "method": self.method.value,
            "per_device_train_batch_size": self.micro_batch,
            "gradient_accumulation_steps": self.grad_accum,
            "cutoff_len": self.seq_len,
            "packing": self.packing,
            "gradient_checkpointing": self.checkpointing != Checkpointing.NONE,
            "checkpointing": self.checkpointing.value,
            "attn_implementation": {"flash": "flash_attention_2", "sdpa": "sdpa", "eager": "eager"}[self.attention.value],
            "bf16": self.precision in (Precision.BF16_MIXED, Precision.BF16_TRUE),
            "fp16": self.precision == Precision.FP16_MIXED,
            "precision": self.precision.value,
            "optim": OPTIM_HF[self.optimizer.value],
            "torch_compile": self.compile,
            "chunked_ce": self.chunked_ce,
            "zero_stage": self.zero,
            "offload": self.offload.value,
            "gpus_per_node": self.gpus,
            "nnodes": self.nodes,
        }
        if self.is_adapter:
            d.update(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                     lora_target=",".join(self.lora_target))
        if self.method == Method.QLORA:
            d.update(quantization_bit=4, quantization_type="nf4", double_quantization=self.double_quant)
        if self.method == Method.FREEZE:
            d["freeze_trainable_layers"] = self.freeze_trainable_layers
        return d


OPTIM_HF = {"adamw": "adamw_torch_fused", "adamw-8bit": "adamw_bnb_8bit",
            "paged-adamw-8bit": "paged_adamw_8bit", "sgd": "sgd", "adafactor": "adafactor"}
_OPTIM_FROM_HF = {v: k for k, v in OPTIM_HF.items()} | {"adamw_torch": "adamw", "adamw_8bit": "adamw-8bit",
                                                         "paged_adamw_32bit": "adamw"}


_INT_FIELDS = ("lora_rank", "lora_alpha", "freeze_trainable_layers", "zero", "micro_batch", "grad_accum",
               "seq_len", "gpus", "nodes")
_BOOL_FIELDS = ("double_quant", "packing", "chunked_ce", "compile")


def _coerce(name: str, v: Any) -> Any:
    """Values read from CSV / YAML strings ("4", "true", "0.05") → the field's type."""
    if not isinstance(v, str):
        return v
    text = v.strip()
    try:
        if name in _INT_FIELDS:
            return int(float(text)) if float(text).is_integer() else text
        if name == "lora_dropout":
            return float(text)
    except ValueError:
        raise PlanError(f"{name}: expected a number, got {v!r}") from None
    if name in _BOOL_FIELDS:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise PlanError(f"{name}: expected true/false, got {v!r}")
        return _bool(text)
    return v


def _bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def _finetuning_type(v: Any) -> dict[str, Any]:
    return {"method": "lora" if str(v).lower() == "lora" else v}


def _quant_bit(v: Any) -> dict[str, Any]:
    if v in (None, "", 0):
        return {}
    if int(v) != 4:
        raise PlanError(f"quantization_bit={v} is not supported; QLoRA here means 4-bit NF4")
    return {"method": "qlora"}


def _attn(v: Any) -> dict[str, Any]:
    return {"attention": {"flash_attention_2": "flash", "fa2": "flash"}.get(str(v), str(v))}


def _precision_flag(name: str):
    def conv(v: Any) -> dict[str, Any]:
        return {"precision": name} if _bool(v) else {}
    return conv


def _gc(v: Any) -> dict[str, Any]:
    if isinstance(v, str) and v.lower() in ("full", "selective", "none"):
        return {"checkpointing": v}
    return {"checkpointing": "full" if _bool(v) else "none"}


def _deepspeed(v: Any) -> dict[str, Any]:
    """A DeepSpeed JSON path or dict: read its zero stage and offload."""
    if v in (None, ""):
        return {}
    cfg = v
    if not isinstance(v, Mapping):
        import json
        from pathlib import Path
        p = Path(str(v))
        if not p.is_file():
            return {}
        try:
            cfg = json.loads(p.read_text())
        except ValueError as exc:
            raise PlanError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    zo = cfg.get("zero_optimization", {}) or {}
    out: dict[str, Any] = {"zero": int(zo.get("stage", 0))}
    opt_off = (zo.get("offload_optimizer") or {}).get("device", "none")
    par_off = (zo.get("offload_param") or {}).get("device", "none")
    if par_off not in (None, "none"):
        out["offload"] = "optimizer+params"
    elif opt_off not in (None, "none"):
        out["offload"] = "optimizer"
    return out


def _lora_target(v: Any) -> dict[str, Any]:
    if isinstance(v, (list, tuple)):
        v = ",".join(map(str, v))
    v = str(v)
    return {"lora_target": LORA_ALL_LINEAR if v in ("all", "all-linear", "all_linear") else v}


# HF TrainingArguments / LLaMA-Factory names → (field, converter)
HF_NAMES: dict[str, tuple[str | None, Any]] = {
    "per_device_train_batch_size": ("micro_batch", None),
    "gradient_accumulation_steps": ("grad_accum", None),
    "cutoff_len": ("seq_len", None),
    "finetuning_type": ("method", _finetuning_type),
    "quantization_bit": ("method", _quant_bit),
    "double_quantization": ("double_quant", None),
    "gradient_checkpointing": ("checkpointing", _gc),
    "attn_implementation": ("attention", _attn),
    "flash_attn": ("attention", lambda v: {"attention": "flash"} if str(v) in ("fa2", "flash") else {}),
    "bf16": ("precision", _precision_flag("bf16-mixed")),
    "fp16": ("precision", _precision_flag("fp16-mixed")),
    "pure_bf16": ("precision", _precision_flag("bf16-true")),
    "optim": ("optimizer", lambda v: {"optimizer": _OPTIM_FROM_HF.get(str(v), str(v))}),
    "torch_compile": ("compile", None),
    "deepspeed": ("zero", _deepspeed),
    "zero_stage": ("zero", None),
    "lora_target": ("lora_target", _lora_target),
    "gpus_per_node": ("gpus", None),
    "nnodes": ("nodes", None),
    "neat_packing": ("packing", None),
}

# axolotl / torchtune names (accepted with a warning)
ALIAS_NAMES: dict[str, tuple[str | None, Any]] = {
    "micro_batch_size": ("micro_batch", None),          # axolotl
    "batch_size": ("micro_batch", None),                # torchtune
    "sequence_len": ("seq_len", None),                  # axolotl
    "max_seq_len": ("seq_len", None),                   # torchtune
    "max_seq_length": ("seq_len", None),                # TRL
    "sample_packing": ("packing", None),                # axolotl
    "pack": ("packing", None),
    "adapter": ("method", lambda v: {"method": {"lora": "lora", "qlora": "qlora"}.get(str(v), "full")}),
    "lora_r": ("lora_rank", None),                      # axolotl
    "lora_target_modules": ("lora_target", _lora_target),
    "lora_attn_modules": ("lora_target", _lora_target),  # torchtune
    "enable_activation_checkpointing": ("checkpointing", _gc),  # torchtune
    "gradient_accumulation": ("grad_accum", None),
    "load_in_4bit": ("method", lambda v: {"method": "qlora"} if _bool(v) else {}),
    "flash_attention": ("attention", lambda v: {"attention": "flash"} if _bool(v) else {}),
    "sdp_attention": ("attention", lambda v: {"attention": "sdpa"} if _bool(v) else {}),
    "optimizer": ("optimizer", lambda v: {"optimizer": _OPTIM_FROM_HF.get(str(v), str(v))}),
}


def _hf_name_for(field_name: str) -> str:
    for k, (t, _) in HF_NAMES.items():
        if t == field_name:
            return k
    return field_name


def validate(cfg: TrainConfig) -> None:
    """Reject configurations that cannot exist, with one line that says why."""
    def positive(name: str) -> None:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PlanError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")

    for name in ("micro_batch", "grad_accum", "seq_len", "gpus", "nodes", "lora_rank"):
        positive(name)
    if cfg.zero not in (0, 1, 2, 3) or isinstance(cfg.zero, bool):
        raise PlanError(f"--zero must be 0, 1, 2 or 3, got {cfg.zero!r}")
    if not 0.0 <= float(cfg.lora_dropout) < 1.0:
        raise PlanError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout!r}")
    if cfg.freeze_trainable_layers < 0:
        raise PlanError("--freeze-trainable-layers must be >= 0")
    if cfg.method == Method.QLORA and cfg.precision == Precision.FP32:
        raise PlanError("QLoRA needs 16-bit compute (bf16-mixed, bf16-true or fp16-mixed), not fp32")
    if cfg.offload != Offload.NONE and cfg.zero == 0:
        raise PlanError(f"--offload {cfg.offload} needs DeepSpeed ZeRO (--zero 1, 2 or 3)")
    if cfg.offload == Offload.OPTIMIZER_PARAMS and cfg.zero != 3:
        raise PlanError("parameter offload needs ZeRO stage 3 (--zero 3)")
    if cfg.method == Method.QLORA and cfg.zero == 3:
        # bitsandbytes 4-bit weights cannot be partitioned by ZeRO-3 without special quant storage
        pass
    if not cfg.lora_target:
        raise PlanError("--lora-target is empty")
