"""`profile run --device cuda` on a real GPU. Skipped (with the reason) where torch sees none.

Run on a lent GPU machine: `python -m pytest tests/test_profiler_cuda.py -m cuda`.
What only the GPU can show is checked against invariants that hold on any CUDA device:
reserved ≥ allocated (the caching allocator never hands out more than it holds), NVML
device-used ≥ reserved (it adds the CUDA context), per-phase peaks ≤ the run-wide peak,
the snapshot pickle loads, and the allocated peak is at least the model states the
tracker counted.
"""
from __future__ import annotations

import json
import pickle

import pytest

from planner.config import TrainConfig

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda unavailable)")]


def _run(tmp_path, name, model="tiny", **cfg):
    from profiler.run import profile

    return profile(model, TrainConfig(**cfg), device="cuda", steps=3, warmup=2, out=tmp_path / name, progress=False)


def test_cuda_tiny_full(tmp_path):
    m = _run(tmp_path, "full", seq_len=256, micro_batch=2)
    assert m["status"] == "ok", m.get("message")
    meas = m["measured"]
    pa, pr = meas["peak_allocated_bytes"], meas["peak_reserved_bytes"]
    assert 0 < pa <= pr
    s = meas["summary"]
    assert s["parameters"] == 2 * m["model"]["params"]
    assert pa >= s["parameters"] + s["optimizer"]
    for ph in ("forward", "backward", "optimizer"):
        p = meas["cuda_phase_peaks"][ph]
        assert 0 < p["allocated"] <= pa and p["allocated"] <= p["reserved"] <= pr
    if meas.get("nvml_peak_bytes") is not None:
        assert meas["nvml_peak_bytes"] - (meas.get("nvml_baseline_bytes") or 0) >= pr
    assert meas["tokens_per_s"] > 0 and len(meas["step_seconds"]) == 3
    assert 0 < meas["mfu"] < 1
    snap = tmp_path / "full" / "memory_snapshot.pickle"
    assert snap.exists()
    with snap.open("rb") as fh:
        data = pickle.load(fh)
    assert "segments" in data and "device_traces" in data
    env = m["environment"]
    assert env["device_name"] and env["cuda_version"]
    assert (tmp_path / "full" / "timeline.png").exists()
    assert "http" not in (tmp_path / "full" / "timeline.html").read_text().lower()


def test_cuda_lora_and_checkpointing(tmp_path):
    a = _run(tmp_path, "lora", method="lora", seq_len=512)
    b = _run(tmp_path, "lora_ck", method="lora", seq_len=512, checkpointing="full")
    assert a["status"] == b["status"] == "ok"
    t = a["build"]["trainable_params"]
    assert a["measured"]["summary"]["gradients"] == 4 * t
    fa = a["measured"]["cuda_phase_peaks"]["forward"]["allocated"]
    fb = b["measured"]["cuda_phase_peaks"]["forward"]["allocated"]
    assert fb < fa


def test_cuda_oom_is_recorded(tmp_path):
    """A configuration far over the GPU's memory ends with status 'oom' and exit code 3."""
    from profiler.cli import main

    free, total = torch.cuda.mem_get_info()
    # tiny model, a batch whose logits alone (fp32, 2048 vocab) exceed the card
    mb = int(total / (16 * 2048 * 4)) + 1
    rc = main(["run", "--model", "tiny", "--device", "cuda", "--seq-len", "16", "--micro-batch", str(mb),
               "--steps", "1", "--warmup", "0", "--out", str(tmp_path / "oom"), "--quiet", "--no-snapshot"])
    assert rc == 3
    m = json.loads((tmp_path / "oom" / "measurements.json").read_text())
    assert m["status"] == "oom"


def test_cuda_qlora_if_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    m = _run(tmp_path, "qlora", model="qwen2.5-0.5b", method="qlora", seq_len=512)
    assert m["status"] == "ok", m.get("message")
    assert m["build"]["quant_state_bytes"] > 0
