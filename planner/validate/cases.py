"""The cases of each suite, read from tables/validate_cases.yaml (data, not code).

A fake / cpu case names a model (a preset, or a preset with overridden config.json keys)
and the `TrainConfig` fields of one training step; `quick: true` puts it in the quick
suite (what CI runs), every case is in the full suite. The same case gives the planner
its `TrainConfig` and the oracle its keyword arguments, so both see one configuration.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from planner.config import TrainConfig
from planner.errors import PlanError
from planner.model import MODELS_DIR, TABLES, ModelSpec, spec_from_config

CASES_FILE = TABLES / "validate_cases.yaml"

# TrainConfig fields a case may set (everything else keeps TrainConfig's default)
_CONFIG_FIELDS = ("method", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "precision", "optimizer",
                  "micro_batch", "seq_len", "checkpointing", "attention", "chunked_ce", "freeze_trainable_layers")
# precision -> the oracle's pure dtype (weights, gradients and optimizer states all in it)
_ORACLE_DTYPE = {"bf16-true": "bf16", "fp32": "fp32"}


@dataclass(frozen=True)
class StepCase:
    """One single-GPU training step that both the oracle and the planner evaluate."""

    id: str
    suite: str
    model: str
    """Preset name (the model's config.json in tables/models/)."""
    override: dict = field(default_factory=dict, hash=False, compare=False)
    """config.json keys replaced on top of the preset (small CPU models)."""
    config: dict = field(default_factory=dict, hash=False, compare=False)
    """TrainConfig fields."""
    quick: bool = False
    optimizer_impl: str = "fused"
    note: str = ""
    skip: dict = field(default_factory=dict, hash=False, compare=False)
    """metric -> why the oracle's number for it is not compared."""

    @property
    def model_label(self) -> str:
        return self.model if not self.override else f"{self.model}+{_short(self.override)}"

    def hf_config(self) -> dict[str, Any]:
        """The config.json dict the oracle builds (preset + override)."""
        return hf_config(self.model, self.override)

    def spec(self) -> ModelSpec:
        if not self.override:
            from planner.model import load_model
            return load_model(self.model)
        return spec_from_config(self.hf_config(), self.model_label)

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.config)

    def oracle_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of profiler.fake.fake_step / cpu_step for this case."""
        cfg = self.train_config()
        dtype = _ORACLE_DTYPE.get(cfg.precision.value)
        if dtype is None:
            raise PlanError(f"case {self.id}: the oracle runs pure bf16 or fp32 steps, not {cfg.precision}")
        if cfg.checkpointing.value not in ("none", "full"):
            raise PlanError(f"case {self.id}: the oracle checkpoints whole layers only (none | full)")
        kw: dict[str, Any] = dict(method=cfg.method.value, dtype=dtype, optimizer=cfg.optimizer.value,
                                  optimizer_impl=self.optimizer_impl, attention=cfg.attention.value,
                                  checkpointing=cfg.checkpointing.value, micro_batch=cfg.micro_batch,
                                  seq_len=cfg.seq_len, chunked_ce=cfg.chunked_ce)
        if cfg.is_adapter:
            target = list(cfg.lora_target)
            kw.update(lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      lora_target="all-linear" if target == ["all-linear"] else target)
        if cfg.method.value == "freeze":
            kw["freeze_trainable_layers"] = cfg.freeze_trainable_layers
        return kw


def _short(override: dict) -> str:
    abbrev = {"hidden_size": "h", "num_hidden_layers": "L", "vocab_size": "V", "intermediate_size": "f",
              "num_attention_heads": "a", "num_key_value_heads": "kv"}
    return ",".join(f"{abbrev.get(k, k)}{v}" for k, v in override.items())


@lru_cache(maxsize=None)
def _preset_json(model: str) -> str:
    path = MODELS_DIR / f"{model}.json"
    if not path.is_file():
        raise PlanError(f"validate case: unknown preset {model!r} (no {path})")
    return path.read_text()


def hf_config(model: str, override: dict | None = None) -> dict[str, Any]:
    cfg = json.loads(_preset_json(model))
    cfg.update(copy.deepcopy(override or {}))
    return cfg


def _auto_id(model_label: str, c: dict[str, Any]) -> str:
    """llama-3-8b lora-r16 sdpa ckpt s2048×1."""
    method = c.get("method", "full")
    parts = [model_label]
    if method in ("lora", "qlora"):
        tgt = c.get("lora_target", "all-linear")
        tgt = tgt if isinstance(tgt, str) else ",".join(tgt)
        tgt = "" if tgt in ("all-linear", "all") else "-" + tgt.replace("_proj", "")
        parts.append(f"{method}-r{c.get('lora_rank', 16)}{tgt}")
        if float(c.get("lora_dropout", 0) or 0) > 0:
            parts.append(f"drop{c['lora_dropout']}")
    else:
        parts.append(method)
    parts.append(c.get("attention", "sdpa"))
    if c.get("checkpointing", "none") not in ("none", False):
        parts.append("ckpt")
    if c.get("chunked_ce"):
        parts.append("chunked-ce")
    if c.get("precision") not in (None, "bf16-true"):
        parts.append(str(c["precision"]))
    if c.get("optimizer") not in (None, "adamw"):
        parts.append(str(c["optimizer"]))
    parts.append(f"s{c.get('seq_len', 2048)}×{c.get('micro_batch', 1)}")
    return " ".join(parts)


@lru_cache(maxsize=4)
def _load(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    try:
        return yaml.safe_load(p.read_text()) or {}
    except OSError as exc:
        raise PlanError(f"{p}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise PlanError(f"{p}: malformed YAML ({' '.join(str(exc).split())})") from None


def load_cases_file(path: str | Path | None = None) -> dict[str, Any]:
    return _load(str(Path(path) if path else CASES_FILE))


def step_cases(suite: str, selection: str = "quick", path: str | Path | None = None) -> list[StepCase]:
    """The fake or cpu cases of `selection` ("quick" or "full")."""
    data = load_cases_file(path).get(suite) or {}
    defaults = dict(data.get("defaults") or {})
    out: list[StepCase] = []
    seen: set[str] = set()
    for i, raw in enumerate(data.get("cases") or []):
        raw = dict(raw)
        model = raw.pop("model", None)
        if not model:
            raise PlanError(f"{suite} case #{i + 1}: no model")
        override = raw.pop("override", None) or {}
        quick = bool(raw.pop("quick", False))
        note = str(raw.pop("note", ""))
        skip = {str(k): " ".join(str(v).split()) for k, v in (raw.pop("skip", None) or {}).items()}
        optimizer_impl = str(raw.pop("optimizer_impl", defaults.get("optimizer_impl", "fused")))
        cid = raw.pop("id", None)
        cfg = {k: v for k, v in defaults.items() if k in _CONFIG_FIELDS}
        unknown = [k for k in raw if k not in _CONFIG_FIELDS]
        if unknown:
            raise PlanError(f"{suite} case #{i + 1}: unknown keys {unknown} (allowed: {', '.join(_CONFIG_FIELDS)})")
        cfg.update(raw)
        case = StepCase(id="", suite=suite, model=model, override=override, config=cfg, quick=quick,
                        optimizer_impl=optimizer_impl, note=note, skip=skip)
        cid = cid or _auto_id(case.model_label, cfg)
        if cid in seen:
            raise PlanError(f"{suite}: duplicate case id {cid!r}")
        seen.add(cid)
        case = StepCase(id=cid, suite=suite, model=model, override=override, config=cfg, quick=quick,
                        optimizer_impl=optimizer_impl, note=note, skip=skip)
        if selection == "full" or quick:
            out.append(case)
    return out


def published_rules(path: str | Path | None = None) -> dict[str, Any]:
    """The `published:` section: exclusions with reasons, per-row assumptions."""
    return dict(load_cases_file(path).get("published") or {})
