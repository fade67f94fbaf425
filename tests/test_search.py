"""The recommender: enumeration size and speed, ranking, the solvers' boundaries, nothing-fits."""
from __future__ import annotations

import time

import pytest

from planner.config import Method, TrainConfig
from planner.errors import PlanError
from planner.hardware import get_gpu
from planner.model import load_model
from planner import search as S

GiB = 2**30


@pytest.fixture(scope="module")
def memory_fn():
    from planner.memory import estimate_memory
    return estimate_memory


@pytest.fixture(scope="module")
def h100():
    return get_gpu("h100-80gb")


def test_70b_on_64_gpus_is_big_and_fast(memory_fn, h100):
    """Issue 3: >= 2,000 candidates for 70b on 8 GPUs x 8 nodes in < 0.5 s of planner time.
    scripts/bench_search.py reports the numbers. Here: the search's own time (enumeration,
    solver, throughput, ranking: everything but the memory model) has a generous bound for
    shared CI cores, and so has the whole search (memory model included)."""
    m = load_model("70b")
    spent = {"t": 0.0, "n": 0}

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return memory_fn(*a, **k)
        finally:
            spent["t"] += time.perf_counter() - t
            spent["n"] += 1

    S.search(m, {"gpus": 8, "nodes": 8}, h100, memory_fn=memory_fn)  # warm caches (table reads)
    t0 = time.perf_counter()
    r = S.search(m, {"gpus": 8, "nodes": 8}, h100, memory_fn=timed)
    total = time.perf_counter() - t0
    own = total - spent["t"]
    per_call = spent["t"] / max(spent["n"], 1)
    print(f"\n70b 8x8: {r.evaluated} candidates, {spent['n']} memory calls ({per_call * 1e6:.0f} us each), "
          f"search {total:.2f} s of which planner-own {own:.2f} s")
    assert r.evaluated >= 2000, r.evaluated
    assert r.fitting > 0 and r.recommended == 0
    assert own < 1.5, own
    # 0.19 s best / 0.23 s median on an idle-ish 2-core machine (scripts/bench_search.py); the
    # bound leaves room for shared CI cores.
    assert per_call < 600e-6, per_call
    assert total < 2.0, total


def test_ranking_and_trades(memory_fn, h100):
    r = S.search(load_model("7b"), {"gpus": 8}, h100, memory_fn=memory_fn)
    fitting = [c for c in r.candidates if c.fits]
    assert fitting and r.candidates[0].fits
    best = r.candidates[0]
    # method not fixed: the recommendation is the most capable method that fits (full), ranked by
    # tokens/s; the other methods' best rows follow (different products)
    assert best.cfg.method == Method.FULL
    tps = [c.throughput.tokens_per_s for c in r.candidates if c.cfg.method == best.cfg.method]
    # ranked by tokens/s; speeds within 0.5% tie and the simpler configuration goes first
    assert all(b <= a * 1.006 for a, b in zip(tps, tps[1:])), tps
    others = [c for c in r.candidates if c.cfg.method != best.cfg.method]
    assert r.candidates[-len(others):] == others
    assert best.trades.startswith("recommended")
    assert all(c.trades for c in r.candidates[1:])
    # method was not fixed: the output says full and LoRA are different products
    assert any("different products" in n for n in r.notes)
    assert {"full", "lora", "qlora"} <= set(r.best_by_method)
    for c in r.candidates[1:]:
        if c.cfg.method != best.cfg.method:
            assert "different product" in c.trades
    # every shown candidate carries bounds
    assert all(c.throughput.low <= c.throughput.tokens_per_s <= c.throughput.high for c in r.candidates)


def test_all_fixed_gives_exactly_one_candidate_fitting_or_not(memory_fn, h100):
    fixed = dict(method="full", zero=0, offload="none", micro_batch=1, grad_accum=1, checkpointing="none",
                 packing=False, chunked_ce=False, attention="sdpa", gpus=1)
    r = S.search(load_model("70b"), fixed, h100, memory_fn=memory_fn)  # 70B full on one GPU: no
    assert len(r.candidates) == 1 and r.evaluated == 1 and not r.candidates[0].fits
    assert r.nothing_fits is not None
    r = S.search(load_model("qwen2.5-0.5b"), fixed, h100, memory_fn=memory_fn)
    assert len(r.candidates) == 1 and r.candidates[0].fits and r.recommended == 0


def test_global_batch_sets_grad_accum(memory_fn, h100):
    r = S.search(load_model("llama-3.2-1b"), {"gpus": 8, "method": "lora"}, h100, global_batch=128,
                 memory_fn=memory_fn)
    for c in r.candidates:
        assert c.cfg.micro_batch * c.cfg.grad_accum * 8 >= 128
        assert c.cfg.micro_batch * (c.cfg.grad_accum - 1) * 8 < 128
    with pytest.raises(PlanError):
        S.search(load_model("llama-3.2-1b"), {"gpus": 8}, h100, global_batch=4, memory_fn=memory_fn)


@pytest.mark.parametrize("model,cfg", [
    ("llama-3.1-8b", TrainConfig(method="lora", gpus=1)),
    ("llama-2-7b", TrainConfig(method="full", zero=3, gpus=8, checkpointing="full")),
    ("qwen2.5-7b", TrainConfig(method="qlora", gpus=1, chunked_ce=True)),
])
def test_max_micro_batch_is_the_boundary(memory_fn, h100, model, cfg):
    m = load_model(model)
    b = S.max_micro_batch(m, cfg, h100, memory_fn=memory_fn)
    assert b >= 1
    assert memory_fn(m, cfg.replace(micro_batch=b), h100).fits
    assert not memory_fn(m, cfg.replace(micro_batch=b + 1), h100).fits


@pytest.mark.parametrize("model,cfg", [
    ("llama-3.1-8b", TrainConfig(method="lora", gpus=1, checkpointing="full", chunked_ce=True)),
    ("llama-2-7b", TrainConfig(method="full", zero=3, gpus=8)),
])
def test_max_seq_len_is_the_boundary(memory_fn, h100, model, cfg):
    m = load_model(model)
    s = S.max_seq_len(m, cfg, h100, memory_fn=memory_fn)
    assert s > 1
    assert memory_fn(m, cfg.replace(seq_len=s), h100).fits
    assert not memory_fn(m, cfg.replace(seq_len=s + 1), h100).fits


def test_max_micro_batch_zero_when_nothing_fits(memory_fn, h100):
    assert S.max_micro_batch(load_model("70b"), TrainConfig(gpus=1), h100, memory_fn=memory_fn) == 0


def test_min_gpus(memory_fn, h100):
    m = load_model("llama-3.1-8b")
    fixed = {"method": "full", "zero": 3, "offload": "none", "checkpointing": "full"}
    r = S.min_gpus(m, fixed, h100, memory_fn=memory_fn)
    assert r is not None and r.candidate.fits and r.candidate.cfg.method == Method.FULL
    assert r.world_size > 1
    # one GPU fewer does not fit even with the leanest free dimensions
    g, n = (r.gpus - 1, 1) if r.nodes == 1 else (8, r.nodes - 1)
    lean = S._leanest(dict(fixed, gpus=g, nodes=n), h100, g * n)
    assert not memory_fn(m, TrainConfig(gpus=g, nodes=n, **lean), h100).fits


def test_nothing_fits_explains_and_ranks_fixes(memory_fn):
    gpu = get_gpu("a100-40gb")
    fixed = {"method": "full", "zero": 0, "gpus": 1}
    r = S.search(load_model("llama-3.1-8b"), fixed, gpu, memory_fn=memory_fn)
    assert r.fitting == 0 and r.recommended is None
    nf = r.nothing_fits
    assert nf is not None and nf.dominant == "model states"
    assert "model states" in nf.reason and "GiB" in nf.reason
    assert nf.fixes, "a fix must be found (LoRA, QLoRA or ZeRO offload)"
    changes = " | ".join(f.change for f in nf.fixes)
    assert "--method qlora" in changes or "--method lora" in changes
    assert all(f.candidate.fits for f in nf.fixes)
    speeds = [f.candidate.throughput.tokens_per_s for f in nf.fixes]
    assert speeds == sorted(speeds, reverse=True)
    text = nf.fixes[0].describe()
    assert "fits at" in text and "GiB" in text


def test_eager_is_never_faster_and_flash_only_where_supported(memory_fn):
    v100 = get_gpu("v100-32gb")
    structs, _ = S.structures({}, v100, world=1)
    assert all(s["attention"].value != "flash" for s in structs)
    assert S.default_precision(v100).value == "fp16-mixed"
    assert S.default_precision(get_gpu("h100-80gb")).value == "bf16-mixed"
