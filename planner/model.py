"""Model architecture → exact parameter counts, without torch.

A `ModelSpec` is read from an HF `config.json` (a preset in `tables/models/`, a path to a
`config.json`, or a directory containing one). Missing keys take the defaults of
transformers' config class for that `model_type` (`tables/architectures.json`). Counts are
tested equal to a meta-device build (`tests/test_model_spec.py`).
"""
from __future__ import annotations

import csv
import difflib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from planner.errors import PlanError

TABLES = Path(__file__).resolve().parent.parent / "tables"
MODELS_DIR = TABLES / "models"


@dataclass(frozen=True)
class Linear:
    """One nn.Linear of a decoder layer (what LoRA can adapt)."""

    name: str
    """transformers' module name, e.g. "q_proj"."""
    in_features: int
    out_features: int
    bias: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer, as much as memory and FLOPs need to know."""

    name: str
    """Preset name or the path it was read from."""
    model_type: str
    """HF model_type (llama, qwen2, qwen3, mistral, gemma2, phi3, mixtral, qwen3_moe)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    """Dense MLP width f (per expert width for MoE lives in moe_intermediate_size)."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Key/value heads (GQA when < num_heads)."""
    head_dim: int
    tie_embeddings: bool
    """lm_head shares the embedding matrix (counted once)."""
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2
    fused_qkv: bool = False
    fused_gate_up: bool = False
    num_experts: int = 0
    """Routed experts per MoE layer (0 = dense)."""
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    moe_layers: int = 0
    """How many decoder layers use the MoE block (the rest are dense)."""
    embed_scale: bool = False
    max_position_embeddings: int = 0
    hf_id: str | None = None
    """Where the preset's config.json comes from."""
    published_params: int | None = None
    config: dict = field(default_factory=dict, compare=False, repr=False, hash=False)
    """The config.json as read (without tuneplan's own keys)."""

    # ------------------------------------------------------------ counts
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def attention_linears(self) -> list[Linear]:
        h = self.hidden_size
        if self.fused_qkv:
            qkv = [Linear("qkv_proj", h, self.q_dim + 2 * self.kv_dim, self.qkv_bias)]
        else:
            qkv = [Linear("q_proj", h, self.q_dim, self.qkv_bias),
                   Linear("k_proj", h, self.kv_dim, self.qkv_bias),
                   Linear("v_proj", h, self.kv_dim, self.qkv_bias)]
        return qkv + [Linear("o_proj", self.q_dim, h, self.o_bias)]

    def dense_mlp_linears(self) -> list[Linear]:
        h, f = self.hidden_size, self.intermediate_size
        if self.fused_gate_up:
            return [Linear("gate_up_proj", h, 2 * f, self.mlp_bias), Linear("down_proj", f, h, self.mlp_bias)]
        return [Linear("gate_proj", h, f, self.mlp_bias), Linear("up_proj", h, f, self.mlp_bias),
                Linear("down_proj", f, h, self.mlp_bias)]

    def layer_linears(self, layer: int) -> list[Linear]:
        """The nn.Linear modules of one decoder layer, as transformers builds them.

        In transformers ≥ 5 MoE experts are fused 3-D parameters and the router is not an
        nn.Linear, so for MoE layers only the attention projections are Linear modules.
        """
        if self.is_moe_layer(layer):
            return self.attention_linears()
        return self.attention_linears() + self.dense_mlp_linears()

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer < self.moe_layers

    @staticmethod
    def _linear_params(lins: list[Linear]) -> int:
        return sum(l.in_features * l.out_features + (l.out_features if l.bias else 0) for l in lins)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Separate output projection; 0 when tied to the embedding."""
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def attention_params_per_layer(self) -> int:
        qk_norm = 2 * self.head_dim if self.qk_norm else 0
        return self._linear_params(self.attention_linears()) + qk_norm

    @property
    def dense_mlp_params_per_layer(self) -> int:
        return self._linear_params(self.dense_mlp_linears())

    @property
    def moe_params_per_layer(self) -> int:
        """Router (E×h) + E experts of gated MLP width moe_intermediate_size."""
        h, e, f = self.hidden_size, self.num_experts, self.moe_intermediate_size
        return e * h + e * 3 * h * f

    @property
    def norm_params_per_layer(self) -> int:
        return self.norms_per_layer * self.hidden_size

    def layer_params(self, layer: int) -> int:
        mlp = self.moe_params_per_layer if self.is_moe_layer(layer) else self.dense_mlp_params_per_layer
        return self.attention_params_per_layer + mlp + self.norm_params_per_layer

    @property
    def decoder_params(self) -> int:
        return sum(self.layer_params(i) for i in range(self.num_layers))

    @property
    def total_params(self) -> int:
        """Every parameter, tied embeddings counted once (= sum(p.numel()) in torch)."""
        return self.embedding_params + self.lm_head_params + self.decoder_params + self.hidden_size

    @property
    def active_params(self) -> int:
        """Parameters one token touches (MoE: top-k experts of each MoE layer)."""
        if not self.is_moe:
            return self.total_params
        h, f, e, k = self.hidden_size, self.moe_intermediate_size, self.num_experts, self.experts_per_token
        inactive = self.moe_layers * (e - k) * 3 * h * f
        return self.total_params - inactive

    @property
    def matmul_params(self) -> int:
        """Weights a token is multiplied by (2 FLOPs each per token in forward): the decoder
        linears on its path (MoE: router + top-k experts) and the lm_head, which is a matmul
        even when tied. Embedding lookups, norms and biases do no matmul."""
        h = self.hidden_size
        attn = sum(l.in_features * l.out_features for l in self.attention_linears())
        dense = sum(l.in_features * l.out_features for l in self.dense_mlp_linears())
        moe = self.num_experts * h + self.experts_per_token * 3 * h * self.moe_intermediate_size
        layers = sum(attn + (moe if self.is_moe_layer(i) else dense) for i in range(self.num_layers))
        return layers + self.vocab_size * h

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name, "hf_id": self.hf_id, "model_type": self.model_type,
            "params": self.total_params, "active_params": self.active_params,
            "layers": self.num_layers, "hidden": self.hidden_size, "intermediate": self.intermediate_size,
            "heads": self.num_heads, "kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "vocab": self.vocab_size, "tied_embeddings": self.tie_embeddings,
            "experts": self.num_experts, "experts_per_token": self.experts_per_token,
        }


# ---------------------------------------------------------------------- reading

@lru_cache(maxsize=1)
def architectures() -> dict[str, Any]:
    return {k: v for k, v in json.loads((TABLES / "architectures.json").read_text()).items() if not k.startswith("_")}


def _int(cfg: dict, key: str, where: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise PlanError(f"{where}: '{key}' must be a positive integer, got {v!r}")
    return v


def spec_from_config(cfg: dict[str, Any], name: str = "custom") -> ModelSpec:
    """Read an HF config.json dict the way transformers' config class would."""
    if not isinstance(cfg, dict):
        raise PlanError(f"{name}: config.json must hold a JSON object")
    own = cfg.get("_tuneplan") or {}
    cfg = {k: v for k, v in cfg.items() if k != "_tuneplan"}
    model_type = cfg.get("model_type")
    archs = architectures()
    if model_type not in archs:
        known = ", ".join(sorted(archs))
        raise PlanError(f"{name}: model_type {model_type!r} is not supported (supported: {known})")
    arch = archs[model_type]
    full = dict(arch["defaults"]) | {k: v for k, v in cfg.items() if v is not None or k not in arch["defaults"]}
    st = arch["structure"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        _int(full, key, name)
    heads = full["num_attention_heads"]
    kv = full.get("num_key_value_heads") or heads
    if not isinstance(kv, int) or kv <= 0 or heads % kv:
        raise PlanError(f"{name}: num_key_value_heads={kv!r} must be a positive divisor of num_attention_heads={heads}")
    head_dim = full.get("head_dim") or full["hidden_size"] // heads
    layers = full["num_hidden_layers"]

    experts = experts_per_tok = moe_f = moe_layers = 0
    if st["moe"]:
        experts = full.get("num_local_experts") or full.get("num_experts") or 0
        experts_per_tok = full.get("num_experts_per_tok") or 0
        if model_type == "mixtral":
            moe_f, moe_layers = full["intermediate_size"], layers
        else:
            moe_f = full.get("moe_intermediate_size") or full["intermediate_size"]
            step = full.get("decoder_sparse_step") or 1
            mlp_only = set(full.get("mlp_only_layers") or [])
            moe_idx = [i for i in range(layers) if i not in mlp_only and experts > 0 and (i + 1) % step == 0]
            moe_layers = len(moe_idx)
            if moe_idx != list(range(moe_layers)):
                raise PlanError(f"{name}: interleaved dense/MoE layers are not supported yet")
    attention_bias = bool(full.get("attention_bias", False))
    return ModelSpec(
        name=name, model_type=model_type, vocab_size=full["vocab_size"], hidden_size=full["hidden_size"],
        intermediate_size=full["intermediate_size"], num_layers=layers, num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim, tie_embeddings=bool(full.get("tie_word_embeddings", False)),
        qkv_bias=st["qkv_bias"] or attention_bias, o_bias=attention_bias, mlp_bias=bool(full.get("mlp_bias", False)),
        qk_norm=st["qk_norm"], norms_per_layer=st["norms_per_layer"], fused_qkv=st["fused_qkv"],
        fused_gate_up=st["fused_gate_up"], num_experts=experts, experts_per_token=experts_per_tok,
        moe_intermediate_size=moe_f, moe_layers=moe_layers, embed_scale=st["embed_scale"],
        max_position_embeddings=int(full.get("max_position_embeddings") or 0),
        hf_id=own.get("hf_id"), published_params=own.get("published_params"), config=cfg,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise PlanError(f"{path}: malformed JSON ({exc})") from None
    except OSError as exc:
        raise PlanError(f"{path}: cannot read ({exc.strerror})") from None


@lru_cache(maxsize=1)
def aliases() -> dict[str, tuple[str, str]]:
    """Size alias → (preset, why)."""
    path = MODELS_DIR / "aliases.csv"
    if not path.exists():
        return {}
    with path.open() as fh:
        return {r["alias"].strip().lower(): (r["preset"].strip(), r.get("why", "").strip()) for r in csv.DictReader(fh)}


def preset_names() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


@dataclass(frozen=True)
class ResolvedModel:
    spec: ModelSpec
    how: str
    """How the name was read: "preset", "alias 7b → llama-2-7b (why)", or "config.json at PATH"."""


def resolve_model(name: str) -> ResolvedModel:
    """A preset name, a size alias, a config.json path, or a directory holding one."""
    if not name or not str(name).strip():
        raise PlanError("--model is empty")
    text = str(name).strip()
    key = text.lower()
    if key in aliases():
        preset, why = aliases()[key]
        spec = _load_preset(preset)
        return ResolvedModel(spec, f"alias {key} → {preset}" + (f" ({why})" if why else ""))
    if (MODELS_DIR / f"{key}.json").is_file():
        return ResolvedModel(_load_preset(key), f"preset {key}")
    path = Path(text).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise PlanError(f"{path}: directory has no config.json")
        return ResolvedModel(spec_from_config(_read_json(cfg), str(path)), f"config.json in {path}")
    if path.is_file():
        return ResolvedModel(spec_from_config(_read_json(path), str(path)), f"config.json at {path}")
    choices = preset_names() + sorted(aliases())
    close = difflib.get_close_matches(key, choices, n=4, cutoff=0.4)
    hint = f"; closest presets: {', '.join(close)}" if close else f"; presets: {', '.join(preset_names()[:8])}, ..."
    raise PlanError(f"unknown model {text!r} (not a preset, a size alias, or a path to a config.json){hint}")


@lru_cache(maxsize=None)
def _load_preset(preset: str) -> ModelSpec:
    return spec_from_config(_read_json(MODELS_DIR / f"{preset}.json"), preset)


def load_model(name: str) -> ModelSpec:
    return resolve_model(name).spec


def bytes_per_param_nf4(double_quant: bool) -> float:
    """NF4 storage per weight (bitsandbytes): 4 bits + one absmax per 64-weight block.

    1. the weight: 4 bits = 0.5 byte;
    2. absmax, blocksize 64: fp32 (4 B) per 64 weights = 0.0625 B/param;
       with double quantisation the absmax is stored as 8 bits per 64 weights (1/64 B) plus an
       fp32 scale per 256 absmax values (4 / (64·256) B) = 0.0159 B/param (Dettmers et al. 2023,
       QLoRA §3: 0.127 bits/param).
    """
    if double_quant:
        return 0.5 + 1 / 64 + 4 / (64 * 256)
    return 0.5 + 4 / 64


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["ModelSpec", "Linear", "ResolvedModel", "resolve_model", "load_model", "spec_from_config",
           "preset_names", "aliases", "bytes_per_param_nf4"]
