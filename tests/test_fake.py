"""The fake-tensor oracle (profiler.fake) against a real CPU step and against counts.

Tiny tests (hidden 128, 2 layers) run in a few seconds; ``slow`` ones run 7B/8B steps.
"""

from __future__ import annotations

import json
import pathlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from profiler.fake import PHASES, build_model, cpu_step  # noqa: E402
from profiler.fake import fake_step as _fake_step  # noqa: E402
from profiler.tracker import CATEGORIES  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = dict(
    model_type="llama", vocab_size=1000, hidden_size=128, intermediate_size=256,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    tie_word_embeddings=False, rms_norm_eps=1e-5, _tuneplan={"note": "ignored"},
)
STEP = dict(micro_batch=2, seq_len=64)
_CACHE: dict = {}


def fake_step(cfg, **kw):
    """Memoised ``profiler.fake.fake_step`` (results are deterministic; keeps tests fast)."""
    key = (json.dumps(cfg, sort_keys=True), json.dumps(kw, sort_keys=True, default=str))
    if key not in _CACHE:
        _CACHE[key] = _fake_step(cfg, **kw)
    return _CACHE[key]


def _tiny_n_params() -> int:
    h, f, v, L, kv = 128, 256, 1000, 2, 64  # kv = kv_heads * head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * f + 2 * h
    return 2 * v * h + L * per_layer + h


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"method": "lora", "checkpointing": "full"},
        {"attention": "eager", "optimizer_impl": "foreach"},
        {"method": "freeze", "freeze_trainable_layers": 1, "dtype": "fp32", "optimizer": "sgd"},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "full",
)
def test_fake_equals_real_cpu_step(kw):
    """Oracle: the fake step's per-phase, per-category bytes equal a real CPU step's."""
    fake = fake_step(TINY, **STEP, **kw)
    real = cpu_step(TINY, **STEP, **kw)
    assert fake.peak_bytes == real.peak_bytes
    assert fake.phase_peaks == real.phase_peaks
    assert fake.trainable_params == real.trainable_params
    assert set(fake.phase_peaks) == set(PHASES)
    for d in fake.phase_peaks.values():
        assert set(d) == set(CATEGORIES) | {"total"}
        assert sum(d[c] for c in CATEGORIES) == d["total"]
    assert fake.peak_bytes == max(d["total"] for d in fake.phase_peaks.values())


@pytest.mark.parametrize(
    "kw",
    [
        {"method": "lora"},
        {"method": "lora", "checkpointing": "full"},
        {},
        {"method": "lora", "attention": "eager", "chunked_ce": True, "ce_chunk": 32},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "full",
)
def test_fake_equals_real_cpu_step_under_autocast(kw):
    """bf16-mixed (forward + loss under torch.autocast("cpu", bfloat16)): fake == real to the byte."""
    fake = fake_step(TINY, **STEP, autocast=True, **kw)
    real = cpu_step(TINY, **STEP, autocast=True, **kw)
    assert fake.settings["autocast"] is True
    assert fake.peak_bytes == real.peak_bytes
    assert fake.phase_peaks == real.phase_peaks


def test_autocast_lora_saves_bf16_adapter_inputs():
    """peft's fp32 adapters: without autocast lora_A saves an fp32 copy of its input, under
    autocast the bf16 re-cast of it -- half the bytes. Full fine-tuning (bf16 weights) is
    unchanged: autocast has nothing to cast."""
    pure = fake_step(TINY, **STEP, method="lora")
    amp = fake_step(TINY, **STEP, method="lora", autocast=True)
    assert amp.phase_peaks["forward"]["activation"] < pure.phase_peaks["forward"]["activation"]
    assert fake_step(TINY, **STEP, autocast=True).phase_peaks == fake_step(TINY, **STEP).phase_peaks


def test_bf16_full_state_bytes():
    r = fake_step(TINY, **STEP)
    n = _tiny_n_params()
    assert r.total_params == r.trainable_params == n
    opt = r.phase_peaks["optimizer"]
    n_tensors = 2 + 2 * 9 + 1  # embed, lm_head, 9 per layer (7 linears + 2 norms), final norm
    assert opt["parameter"] == 2 * n
    assert opt["gradient"] == 2 * n  # all grads alive while step() runs
    # torch AdamW keeps exp_avg / exp_avg_sq in the parameter dtype, plus a fp32 `step` scalar
    assert opt["optimizer"] == 2 * 2 * n + 4 * n_tensors
    assert opt["temp"] == 0  # fused AdamW: no scratch
    assert r.phase_peaks["forward"]["gradient"] == 0  # zero_grad(set_to_none=True) last step


def test_fp32_doubles_model_states():
    r16 = fake_step(TINY, **STEP)
    r32 = fake_step(TINY, **STEP, dtype="fp32", optimizer="sgd")
    for cat in ("parameter", "gradient"):
        assert r32.phase_peaks["optimizer"][cat] == 2 * r16.phase_peaks["optimizer"][cat]
    assert r32.phase_peaks["optimizer"]["optimizer"] == 0  # plain SGD keeps no state


def test_foreach_adamw_scratch():
    fused = fake_step(TINY, **STEP)
    foreach = fake_step(TINY, **STEP, attention="eager", optimizer_impl="foreach")
    n = fused.trainable_params
    assert fused.phase_peaks["optimizer"]["temp"] == 0
    # foreach AdamW allocates per-step scratch on the order of the trainable bytes
    assert n <= foreach.phase_peaks["optimizer"]["temp"] <= 4 * 2 * n


def test_lora_counts_match_peft():
    model = build_model(TINY, device="meta", method="lora", lora_rank=8)
    trainable, total = model.get_nb_trainable_parameters()
    r = fake_step(TINY, **STEP, method="lora", lora_rank=8)
    assert (r.trainable_params, r.total_params) == (trainable, total)
    # 7 adapted linears per layer, A (r x in) + B (out x r)
    h, f, kv, rk = 128, 256, 64, 8
    per_layer = rk * ((h + h) * 2 + (h + kv) * 2 + (h + f) * 2 + (f + h))
    assert trainable == 2 * per_layer
    opt = r.phase_peaks["optimizer"]
    # peft creates adapters in fp32 for a bf16 base (autocast_adapter_dtype): 4-byte grads
    assert opt["gradient"] == 4 * trainable
    assert opt["parameter"] == 2 * _tiny_n_params() + 4 * trainable
    r16 = fake_step(TINY, **STEP, method="lora", lora_rank=8, lora_fp32_adapters=False)
    assert r16.phase_peaks["optimizer"]["gradient"] == 2 * trainable


def test_checkpointing_lowers_activations():
    plain = fake_step(TINY, **STEP)
    ckpt = fake_step(TINY, **STEP, checkpointing="full")
    assert ckpt.phase_peaks["forward"]["activation"] < plain.phase_peaks["forward"]["activation"]
    assert ckpt.peak_bytes < plain.peak_bytes


def test_eager_attention_costs_more_than_sdpa():
    sdpa = fake_step(TINY, **STEP)
    eager = fake_step(TINY, **STEP, attention="eager", optimizer_impl="foreach")
    assert eager.phase_peaks["forward"]["activation"] > sdpa.phase_peaks["forward"]["activation"]


def test_chunked_ce_lowers_backward_peak():
    plain = fake_step(TINY, micro_batch=2, seq_len=256)
    chunked = fake_step(TINY, micro_batch=2, seq_len=256, chunked_ce=True, ce_chunk=64)
    assert chunked.peak_bytes < plain.peak_bytes
    real = cpu_step(TINY, micro_batch=2, seq_len=256, chunked_ce=True, ce_chunk=64)
    assert chunked.phase_peaks == real.phase_peaks


def test_fsdp_zero3_shards_model_states():
    """world_size=4, zero=3 (FSDP2 + fake process group): states are ~1/4 of one GPU's."""
    single = fake_step(TINY, **STEP)
    z3 = fake_step(TINY, **STEP, world_size=4, zero=3)
    one, four = single.phase_peaks["optimizer"], z3.phase_peaks["optimizer"]
    for cat in ("parameter", "gradient", "optimizer"):
        # dim-0 shards are padded up to a multiple of the world size
        assert one[cat] / 4 <= four[cat] <= one[cat] / 4 + 4 * 1024, cat
    fwd = z3.phase_peaks["forward"]
    assert fwd["unsharded_param"] > 0 and fwd["all_gather"] > 0
    assert fwd["activation"] == single.phase_peaks["forward"]["activation"]  # same per-rank batch
    assert z3.trainable_params == single.trainable_params
    assert z3.peak_bytes < single.peak_bytes


def _preset(name: str) -> dict:
    p = ROOT / "tables" / "models" / f"{name}.json"
    assert p.exists(), f"{p} is a committed preset"
    return json.loads(p.read_text())


@pytest.mark.slow
def test_llama3_8b_full_step():
    r = fake_step(_preset("llama-3-8b"), seq_len=2048, micro_batch=1)
    n = 8_030_261_248
    assert r.total_params == n
    opt = r.phase_peaks["optimizer"]
    assert opt["parameter"] == 2 * n and opt["gradient"] == 2 * n
    assert opt["optimizer"] == 4 * n + 4 * 291  # 291 parameter tensors, 4-byte step each
    assert 55 * 2**30 < r.peak_bytes < 66 * 2**30


@pytest.mark.slow
def test_llama3_8b_lora_step():
    r = fake_step(_preset("llama-3-8b"), method="lora", seq_len=2048, micro_batch=1)
    assert r.trainable_params == 41_943_040
    assert 30 * 2**30 < r.peak_bytes < 42 * 2**30
    full = fake_step(_preset("llama-3-8b"), seq_len=2048, micro_batch=1)
    # peft keeps fp32 copies of adapted-layer inputs: LoRA saves more activations than full
    assert r.phase_peaks["forward"]["activation"] > full.phase_peaks["forward"]["activation"]
