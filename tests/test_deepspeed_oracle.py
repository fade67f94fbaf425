"""ZeRO model-state bytes against DeepSpeed's own estimator functions (deepspeed 0.19.8),
and the seeds' ZeRO example (seed 002, 多卡全参数训练的显存计算).

DeepSpeed's estimators take counts, not models (`*_all_live` dedups parameters by
`data_ptr()`, which is 0 on meta tensors), and what their `*_all_cold` wrappers print as
"GB" is GiB. Where the assumptions match, the bytes must agree exactly:

- ZeRO-2, `gpu_mem = 2Ψ + 18Ψ/N` (2 params16 + [2 grads16 + 4 grads32 + 4 master + 8 Adam]/N)
  = our optimizer-step model states: parameters + gradient partition + master + Adam states
  + the fp32 gradient partition DeepSpeed creates inside `step()`.
- ZeRO-3, `gpu_mem = 4·largest_layer + 18Ψ/N`: DeepSpeed's 18/N leaves out the 16-bit
  gradient partition (`grad_partitions_flat_buffer`, 2Ψ/N, which stage3.py does allocate),
  so ours is 2Ψ/N higher; its 4·largest_layer (gathered params + grads of the biggest
  module) is our gathered-parameter + gradient buffer for that module. And stage3.py
  makes the fp32 gradient copy one optimizer sub-group (≤ sub_group_size = 1e9 elements) at a
  time, which its estimator does not (it counts the whole partition at once).
"""
from __future__ import annotations

import os

import pytest

from planner.config import TrainConfig
from planner.memory import estimate_buffers, model_states, param_counts
from planner.model import load_model, spec_from_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs  # noqa: E402

GiB = 2**30


def _step_states(st) -> int:
    """Model states alive inside optimizer.step() on one GPU."""
    return st.parameters + st.gradients + st.optimizer + st.master_weights + st.step_transient


def _steady_states(st) -> int:
    """Model states between steps (the textbook (2 + 2 + 12)Ψ accounting)."""
    return st.parameters + st.gradients + st.optimizer + st.master_weights


CASES = [("llama-3-8b", 1, 8), ("llama-2-70b", 2, 8), ("qwen2.5-7b", 1, 4), ("mistral-7b", 4, 8)]


@pytest.mark.parametrize("name,nodes,gpus", CASES)
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_matches_deepspeed_estimator(name, nodes, gpus, offload):
    spec = load_model(name)
    cfg = TrainConfig(method="full", zero=2, gpus=gpus, nodes=nodes, offload="optimizer" if offload else "none")
    st = model_states(spec, cfg)
    _cpu, ds_gpu = estimate_zero2_model_states_mem_needs(spec.total_params, num_gpus_per_node=gpus,
                                                         num_nodes=nodes, cpu_offload=offload)
    assert _step_states(st) == pytest.approx(ds_gpu, abs=16)  # floor-division rounding only


@pytest.mark.parametrize("name,nodes,gpus", CASES)
@pytest.mark.parametrize("offload", ["none", "optimizer", "optimizer+params"])
def test_zero3_matches_deepspeed_estimator_up_to_the_grad_partition(name, nodes, gpus, offload):
    spec = load_model(name)
    cfg = TrainConfig(method="full", zero=3, gpus=gpus, nodes=nodes, offload=offload)
    st = model_states(spec, cfg)
    counts = param_counts(spec, cfg)
    _cpu, ds_gpu, ds_largest = estimate_zero3_model_states_mem_needs(
        spec.total_params, counts.largest_module, num_gpus_per_node=gpus, num_nodes=nodes,
        cpu_offload=offload != "none", cpu_offload_params=offload == "optimizer+params")
    N = gpus * nodes
    grad16_partition = 2 * spec.total_params // N if offload == "none" else 0  # DeepSpeed's estimator omits it
    # stage3.py converts gradients to fp32 one optimizer sub-group (sub_group_size = 1e9 elements) at a
    # time; DeepSpeed's estimator counts the whole fp32 gradient partition at once.
    fp32_grads_all_at_once = 4 * spec.total_params // N if offload == "none" else 0
    grad16_partition -= fp32_grads_all_at_once - st.step_transient
    # DeepSpeed's 4·largest_layer: the largest module gathered (2 B/param) + its full gradient (2 B/param)
    assert ds_largest == 4 * counts.largest_module
    assert _step_states(st) - grad16_partition + ds_largest == pytest.approx(ds_gpu, abs=16)
    # our buffers cover at least that gathered module + its gradient (plus prefetch and a reduce bucket)
    buf = estimate_buffers(spec, cfg, counts, st.gradients_full)
    assert buf.fwd_bwd >= ds_largest


@pytest.mark.parametrize("name", ["llama-3-8b", "mixtral-8x7b", "qwen2.5-7b"])
def test_largest_module_matches_deepspeed_model_to_params(name):
    """DeepSpeed's own `model_to_params` (largest `m.parameters(recurse=False)`) on a meta model."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoConfig, AutoModelForCausalLM

    d = {k: v for k, v in load_model(name).config.items() if k not in ("torch_dtype", "dtype", "transformers_version")}
    d["num_hidden_layers"] = 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
    _total_on_meta_is_wrong, largest = model_to_params(model)
    spec = spec_from_config(dict(load_model(name).config, num_hidden_layers=1), name)
    assert param_counts(spec, TrainConfig()).largest_module == largest


# ------------------------------------------------------------------ the seeds' example
def _llama31_8b(tied: bool = False):
    cfg = dict(load_model("llama-3.1-8b").config)
    if tied:  # AutoModel (no lm_head) has exactly the parameters of the tied variant
        cfg["tie_word_embeddings"] = True
    return spec_from_config(cfg, "llama-3.1-8b")


@pytest.mark.parametrize("zero,expected_gb", [(1, 44), (2, 30), (3, 16)])
def test_seed_zero_example_textbook_numbers(zero, expected_gb):
    """Seed 002: 8 GPUs, 8B model, per GPU ZeRO-1 (2+2)Ψ + 12Ψ/N ≈ 44 GB, ZeRO-2 2Ψ + 14Ψ/N ≈ 30 GB,
    ZeRO-3 16Ψ/N ≈ 16 GB (Ψ = 8e9, GB = 1e9). With the exact Ψ = 8.03e9 of Llama-3.1-8B these are
    44.2 / 30.1 / 16.1 GB — our between-steps model states."""
    spec = _llama31_8b()
    st = model_states(spec, TrainConfig(method="full", zero=zero, gpus=8))
    assert round(_steady_states(st) / 1e9) == expected_gb


def test_seed_no_zero_is_128_gb_not_256():
    """The seed says 256 GB per GPU without ZeRO; (2 + 2 + 12)Ψ for Ψ = 8.03e9 is 128.5 GB
    (ZeRO-1 on one GPU shards nothing)."""
    st = model_states(_llama31_8b(), TrainConfig(method="full", zero=1, gpus=1))
    assert _steady_states(st) / 1e9 == pytest.approx(128.5, abs=0.1)


def test_seed_deepspeed_tables_come_from_automodel_without_lm_head():
    """Seed 002 ran `estimate_zero{2,3}_model_states_mem_needs_all_live(AutoModel(...))`: AutoModel has no
    lm_head, so Ψ = 7.50e9, and the printed "GB" are GiB: ZeRO-2 29.71 / 13.98 (optimizer offload),
    ZeRO-3 17.68 / 3.70 / 1.96."""
    spec = _llama31_8b(tied=True)
    psi = spec.total_params
    largest = param_counts(spec, TrainConfig()).largest_module  # the embedding, V·h
    _, z2 = estimate_zero2_model_states_mem_needs(psi, 8, 1, cpu_offload=False)
    _, z2_off = estimate_zero2_model_states_mem_needs(psi, 8, 1, cpu_offload=True)
    assert (round(z2 / GiB, 2), round(z2_off / GiB, 2)) == (29.71, 13.98)
    z3 = [estimate_zero3_model_states_mem_needs(psi, largest, 8, 1, cpu_offload=o, cpu_offload_params=p)[1]
          for o, p in ((False, False), (True, False), (True, True))]
    assert [round(x / GiB, 2) for x in z3] == [17.68, 3.70, 1.96]
    # ... and our model reproduces the ZeRO-2 row exactly
    ours = model_states(spec, TrainConfig(method="full", zero=2, gpus=8))
    assert round(_step_states(ours) / GiB, 2) == 29.71


def test_lora_under_zero2_shards_only_the_adapters():
    """Frozen weights are in no optimizer group: ZeRO-1/2 never shard them (DeepSpeed's estimator
    assumes every parameter trains, so it does not apply here)."""
    spec = load_model("llama-3-8b")
    st = model_states(spec, TrainConfig(method="lora", zero=2, gpus=8))
    adapters = st.counts.adapter
    assert st.parameters == 2 * spec.total_params + 2 * adapters
    assert st.optimizer + st.master_weights == pytest.approx(12 * adapters / 8, abs=16)
