"""ModelSpec (pure JSON arithmetic) against independent oracles: transformers' AutoConfig
reading and a meta-device build of the real HF model."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from planner.errors import PlanError
from planner.model import MODELS_DIR, aliases, load_model, preset_names, resolve_model, spec_from_config

PRESETS = preset_names()


def _hf_config(spec):
    return AutoConfig.for_model(**spec.config)


def _meta_model(spec):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_hf_config(spec))


def test_there_are_presets():
    assert len(PRESETS) >= 30, PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_param_count_equals_meta_build(preset):
    spec = load_model(preset)
    model = _meta_model(spec)
    assert spec.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", PRESETS)
def test_reading_matches_autoconfig(preset):
    spec = load_model(preset)
    hf = _hf_config(spec)
    assert spec.vocab_size == hf.vocab_size
    assert spec.hidden_size == hf.hidden_size
    assert spec.num_layers == hf.num_hidden_layers
    assert spec.num_heads == hf.num_attention_heads
    assert spec.num_kv_heads == (getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads)
    assert spec.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert spec.tie_embeddings == bool(hf.tie_word_embeddings)


@pytest.mark.parametrize("preset", PRESETS)
def test_layer_linears_match_meta_modules(preset):
    """The Linear modules the planner would adapt with LoRA are the ones transformers builds."""
    spec = load_model(preset)
    model = _meta_model(spec)
    layer0 = model.model.layers[0]
    built = {n.split(".")[-1]: (m.in_features, m.out_features, m.bias is not None)
             for n, m in layer0.named_modules() if isinstance(m, torch.nn.Linear)}
    planned = {l.name: (l.in_features, l.out_features, l.bias) for l in spec.layer_linears(0)}
    assert planned == built


def test_minimal_config_uses_class_defaults(tmp_path):
    """A config.json that names only a few keys reads like transformers would read it."""
    for model_type, extra in [("llama", {}), ("qwen2", {"num_key_value_heads": 4}), ("gemma2", {}),
                              ("mistral", {}), ("phi3", {}), ("qwen3", {}), ("mixtral", {}), ("qwen3_moe", {})]:
        cfg = {"model_type": model_type, "num_hidden_layers": 2, **extra}
        path = tmp_path / f"{model_type}.json"
        path.write_text(json.dumps(cfg))
        spec = load_model(str(path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
        assert spec.total_params == sum(p.numel() for p in model.parameters()), model_type


def test_directory_with_config(tmp_path):
    (tmp_path / "config.json").write_text((MODELS_DIR / "tiny.json").read_text())
    r = resolve_model(str(tmp_path))
    assert r.spec.total_params == load_model("tiny").total_params
    assert "config.json" in r.how


def test_aliases_say_which_preset():
    assert set(aliases()) >= {"1b", "3b", "7b", "8b", "13b", "14b", "32b", "34b", "70b", "72b", "405b"}
    r = resolve_model("7b")
    assert r.spec.name == aliases()["7b"][0]
    assert "7b" in r.how and r.spec.name in r.how


def test_unknown_model_lists_closest():
    with pytest.raises(PlanError, match="llama-3.1-8b"):
        resolve_model("llama-3.1-8")


@pytest.mark.parametrize("bad", ['{"model_type": "llama", "hidden_size": -5}', "{not json", '["a list"]',
                                 '{"model_type": "bert"}', '{"model_type": "llama", "num_key_value_heads": 5}'])
def test_malformed_config_is_a_plan_error(tmp_path, bad):
    p = tmp_path / "config.json"
    p.write_text(bad)
    with pytest.raises(PlanError):
        load_model(str(p))


def test_moe_active_params_smaller():
    moes = [p for p in PRESETS if load_model(p).is_moe]
    assert moes
    for p in moes:
        s = load_model(p)
        assert s.active_params < s.total_params / 2


def test_spec_from_config_rejects_non_object():
    with pytest.raises(PlanError):
        spec_from_config([1, 2], "x")  # type: ignore[arg-type]
