"""`tuneplan profile run | sweep` on this CPU machine: tiny real models, exact expectations.

Measured categories are checked against numbers that do not come from the profiler:
parameter bytes = 2·N for bf16 weights (N from the ModelSpec's exact count), LoRA gradient
bytes = trainable × 4 (peft keeps adapters in fp32), AdamW state = 2 × params in the
parameter dtype + a 4-byte step per tensor, and each toggle must move what it should.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from planner.config import TrainConfig
from planner.errors import PlanError
from planner.model import load_model

TINY = load_model("tiny")
N = TINY.total_params  # 3,950,848 (tables/README.md)
SEQ, MB = 16, 2


def _profile(tmp: Path, name: str, **cfg):
    from profiler.run import profile

    return profile("tiny", TrainConfig(seq_len=cfg.pop("seq_len", SEQ), micro_batch=cfg.pop("micro_batch", MB), **cfg),
                   device="cpu", steps=0, warmup=1, out=tmp / name, progress=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """`profile run --model tiny --device cpu` through the CLI entry point (in-process)."""
    from profiler.cli import main

    out = tmp_path_factory.mktemp("prof") / "full"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["run", "--model", "tiny", "--device", "cpu", "--seq-len", str(SEQ), "--micro-batch", str(MB),
                   "--steps", "1", "--warmup", "0", "--out", str(out), "--json", "--quiet"])
    assert rc == 0, buf.getvalue()[-2000:]
    return out, json.loads(buf.getvalue())


def test_cpu_run_writes_all_outputs(full_run):
    out, m = full_run
    assert m["status"] == "ok" and m["device"] == "cpu"
    on_disk = json.loads((out / "measurements.json").read_text())
    assert on_disk["measured"]["summary"] == m["measured"]["summary"]
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "timeline.html").read_text()
    assert "<svg" in html and "timeline-data" in html
    # self-contained: nothing fetched from the network (no CDN scripts, styles, fonts, images)
    low = html.lower()
    assert "http://" not in low and "https://" not in low and "<link" not in low and "src=" not in low
    env = m["environment"]["versions"]
    assert env["torch"] and env["transformers"] and env["peft"]
    assert set(m["measured"]["memory"]["phase_peaks"]) == {"forward", "backward", "optimizer"}
    assert len(m["measured"]["step_seconds"]) == 1 and m["measured"]["tokens_per_step"] == SEQ * MB
    assert m["config"]["seq_len"] == SEQ and "run" in m and "tiny" in m["run"]["command"]
    # the planner's prediction sits next to the measurement, with a relative error per component
    if "error" not in m["predicted"]:
        metrics = {r["metric"] for r in m["comparison"]}
        assert {"parameters", "gradients", "optimizer", "activations", "peak_allocated"} <= metrics


def test_full_bf16_categories_exact(full_run):
    _, m = full_run
    s = m["measured"]["summary"]
    n_tensors = 4 * 9 + 3  # 4 layers × (q,k,v,o,gate,up,down + 2 norms) + embedding, lm_head, final norm
    assert s["parameters"] == 2 * N  # bf16 weights: exactly 2 bytes × the ModelSpec count
    assert s["gradients"] == 2 * N  # .grad in the parameter dtype
    assert s["optimizer"] == 2 * 2 * N + 4 * n_tensors  # AdamW m, v in bf16 + fused step tensors
    assert m["build"]["param_bytes"] == 2 * N and m["build"]["trainable_params"] == N
    assert s["activations"] > 0 and s["peak_allocated"] >= s["parameters"] + s["optimizer"] + s["activations"]


def test_lora_gradients_are_trainable_times_bytes(tmp_path):
    m = _profile(tmp_path, "lora", method="lora", lora_rank=8)
    s, b = m["measured"]["summary"], m["build"]
    t = b["trainable_params"]
    # LoRA r on every linear of 4 layers: r·(in + out) per adapted linear
    lin = [(256, 256), (256, 128), (256, 128), (256, 256), (256, 688), (256, 688), (688, 256)]
    assert t == 4 * sum(8 * (i + o) for i, o in lin)
    assert s["gradients"] == 4 * t  # adapters (and their grads) in fp32 (peft autocast_adapter_dtype)
    assert s["parameters"] == 2 * N + 4 * t  # bf16 frozen base + fp32 adapters
    assert b["total_params"] == N + t


def test_checkpointing_lowers_activations(full_run, tmp_path):
    _, base = full_run
    ck = _profile(tmp_path, "ckpt", checkpointing="full")
    assert ck["status"] == "ok"
    a0, a1 = base["measured"]["summary"]["activations"], ck["measured"]["summary"]["activations"]
    assert a1 < 0.6 * a0, (a0, a1)
    assert ck["measured"]["summary"]["parameters"] == 2 * N


def test_packing_batches_reset_positions_and_change_examples(tmp_path):
    from profiler.step import make_batches

    cfg = TrainConfig(seq_len=64, micro_batch=2, packing=True)
    batches, info = make_batches(cfg, TINY.vocab_size, "cpu", seed=1)
    b = batches[0]
    assert list(b["input_ids"].shape) == [1, 128] and info.tokens_per_micro_batch == 128
    assert info.examples_per_micro_batch > cfg.micro_batch and sum(info.example_lengths) == 128
    starts = (b["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == len(info.example_lengths)
    assert all(b["labels"][0, i] == -100 for i in starts)  # no token learns the next example's start
    unpacked, uinfo = make_batches(TrainConfig(seq_len=64, micro_batch=2), TINY.vocab_size, "cpu")
    assert list(unpacked[0]["input_ids"].shape) == [2, 64] and uinfo.examples_per_micro_batch == 2

    m = _profile(tmp_path, "pack", packing=True, seq_len=64)
    assert m["status"] == "ok" and m["batch"]["packed"] and m["batch"]["shape"] == [1, 128]
    assert m["batch"]["examples_per_micro_batch"] > MB


def test_packing_has_no_cross_contamination():
    """Each packed example's logits equal the logits of that example run alone."""
    import torch

    from profiler.modelbuild import build_for_training
    from profiler.step import make_batches

    cfg = TrainConfig(seq_len=48, micro_batch=1, packing=True, precision="fp32")
    built = build_for_training(TINY, cfg, "cpu", seed=0)
    model = built.model.eval()
    (batch,), info = make_batches(cfg, built.vocab_size, "cpu", seed=3)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        pos = 0
        for n in info.example_lengths:
            alone = model(input_ids=batch["input_ids"][:, pos:pos + n], use_cache=False).logits[0]
            torch.testing.assert_close(packed[pos:pos + n], alone, atol=1e-4, rtol=1e-4)
            pos += n


def test_fake_replay_equals_fake_step_on_tiny():
    """The op-by-op timeline replay reports exactly what profiler.fake.fake_step reports."""
    from profiler.fake import fake_step
    from profiler.run import _fake_timeline, fake_kwargs

    for cfg in (TrainConfig(method="lora", seq_len=64, checkpointing="full"),):
        kw = fake_kwargs(cfg, [])
        rep = _fake_timeline(TINY, kw)
        assert rep["phase_peaks"] == fake_step(TINY.config, **kw).phase_peaks
        assert len(rep["timeline"]["points"]) > 100 and rep["timeline"]["spans"][0]["phase"] == "forward"


def test_fake_device_on_tiny_writes_outputs(tmp_path):
    from profiler.run import profile

    m = profile("tiny", TrainConfig(method="lora", seq_len=64), device="fake", out=tmp_path / "f", progress=False)
    assert m["status"] == "ok" and m["device"] == "fake"
    assert m["measured"]["summary"]["gradients"] == 4 * m["build"]["trainable_params"]
    assert (tmp_path / "f" / "timeline.png").exists() and (tmp_path / "f" / "timeline.html").exists()


@pytest.mark.slow
def test_fake_7b_lora_seq1024(tmp_path):
    """`profile run --model 7b --method lora --seq-len 1024 --device fake` end to end."""
    from profiler.cli import main

    rc = main(["run", "--model", "7b", "--method", "lora", "--seq-len", "1024", "--device", "fake",
               "--out", str(tmp_path / "7b"), "--quiet"])
    assert rc == 0
    m = json.loads((tmp_path / "7b" / "measurements.json").read_text())
    spec = load_model("7b")
    t = m["build"]["trainable_params"]
    assert m["measured"]["summary"]["parameters"] == 2 * spec.total_params + 4 * t
    assert m["measured"]["summary"]["gradients"] == 4 * t
    assert (tmp_path / "7b" / "timeline.png").exists() and (tmp_path / "7b" / "timeline.html").exists()


@pytest.mark.slow
def test_compile_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "tuneplan" / "inductor-tests"))
    m = _profile(tmp_path, "compile", compile=True)
    assert m["status"] == "ok", m.get("message")
    assert m["config"]["compile"] is True and m["build"]["compiled"]
    assert m["measured"]["summary"]["parameters"] == 2 * N


@pytest.mark.slow
def test_qlora_on_cpu(tmp_path):
    m = _profile(tmp_path, "qlora", method="qlora", seq_len=16, micro_batch=1)
    assert m["status"] == "ok", m.get("message")
    b, s = m["build"], m["measured"]["summary"]
    assert b["quant_state_bytes"] > 0
    assert s["gradients"] == 4 * b["trainable_params"]
    # NF4 decoder linears (0.5 byte/weight) + bf16 embeddings, lm_head, norms + fp32 adapters
    lin = TINY.decoder_params - TINY.num_layers * TINY.norm_params_per_layer
    other = N - lin
    assert b["param_bytes"] == lin // 2 + 2 * other + 4 * b["trainable_params"]


@pytest.mark.slow
@pytest.mark.distributed
def test_optimizer_offload_on_cpu(tmp_path):
    """ZeRO-2 + optimizer offload on one CPU process (DS_ACCELERATOR=cpu, gloo). The first run
    JIT-builds DeepSpeed's cpu_adam and shm ops (minutes; cached in ~/.cache/tuneplan)."""
    r = subprocess.run([sys.executable, "-m", "profiler.cli", "run", "--model", "tiny", "--device", "cpu",
                        "--seq-len", "32", "--zero", "2", "--offload", "optimizer", "--steps", "1", "--warmup", "1",
                        "--out", str(tmp_path / "ds"), "--quiet"], capture_output=True, text=True, timeout=1500,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "ds" / "measurements.json").read_text())
    assert m["status"] == "ok" and "DeepSpeed" in m["build"]["optimizer"]


def test_sweep_records_failure_and_goes_on(tmp_path):
    from profiler.sweep import load_grid, run_sweep

    grid = tmp_path / "grid.yaml"
    grid.write_text("base:\n  model: tiny\n  device: cpu\n  steps: 0\n  warmup: 1\n  seq-len: 16\n"
                    "  precision: fp32\n  timeline: false\n"
                    "grid:\n  method: [qlora, full]\n")  # QLoRA needs 16-bit compute: rejected, exit 2
    res = run_sweep(load_grid(grid), out=tmp_path / "sw", timeout=300)
    assert [r["status"] for r in res["results"]] == ["error", "ok"]
    assert "16-bit" in res["results"][0]["message"]
    with open(res["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["error", "ok"] and rows[1]["peak_allocated_bytes"]
    assert rows[0]["method"] == "qlora" and rows[1]["method"] == "full"


def test_sweep_grid_expansion_and_unknown_keys(tmp_path):
    from profiler.sweep import expand, options_to_argv

    configs, _ = expand({"model": "tiny", "seq_len": [16, 32], "packing": [True, False], "method": "lora"})
    assert len(configs) == 4 and all(c["method"] == "lora" for c in configs)
    argv = options_to_argv({"model": "tiny", "packing": False, "seq_len": 16, "lora_target": ["q_proj", "v_proj"]})
    assert argv == ["--model", "tiny", "--no-packing", "--seq-len", "16", "--lora-target", "q_proj,v_proj"]
    with pytest.raises(PlanError, match="unknown option"):
        expand({"base": {"model": "tiny", "sequence": 3}})


def test_record_appends_atomically_with_provenance(full_run, tmp_path):
    from profiler.record import append_measurement

    _, m = full_run
    p1 = append_measurement(m, measured_dir=tmp_path)
    m2 = json.loads(json.dumps(m))
    m2["run"]["command"] = "tuneplan profile run --model tiny --new-flag"
    p2 = append_measurement(m2, measured_dir=tmp_path)
    assert p1 == p2 == tmp_path / "cpu.csv"
    with p1.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for col in ("date_utc", "device", "torch", "transformers", "peft", "deepspeed", "bitsandbytes", "command",
                "model", "method", "seq_len", "status", "peak_allocated_bytes"):
        assert col in rows[0]
    assert rows[0]["torch"] and rows[0]["model"] == "tiny" and int(rows[0]["parameter_bytes"]) == 2 * N
    assert rows[1]["command"].endswith("--new-flag")
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    cfg = TrainConfig.from_mapping({k: v for k, v in rows[0].items() if k in ("method", "precision", "attention")})
    assert cfg.method.value == "full"


def test_errors_are_one_line(tmp_path, capsys):
    from profiler.cli import main

    assert main(["run", "--model", "tiny", "--device", "fake", "--method", "qlora"]) == 2
    assert main(["run", "--model", "tiny", "--device", "cpu", "--checkpointing", "selective",
                 "--out", str(tmp_path / "x"), "-q"]) == 2
    assert main(["run", "--model", "no-such-model", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("tuneplan: error:") for line in err)


def test_auto_device_choice():
    import torch

    from profiler.run import choose_device

    if torch.cuda.is_available():
        pytest.skip("auto picks cuda on a GPU machine")
    assert choose_device("auto", TINY)[0] == "cpu"
    assert choose_device("auto", load_model("8b"))[0] == "fake"
    with pytest.raises(PlanError):
        choose_device("cuda", TINY)


def test_cli_module_does_not_import_torch():
    code = ("import sys; import profiler.cli; heavy = [m for m in ('torch', 'transformers', 'peft', 'matplotlib') "
            "if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-1000:]


def test_gpu_matrix_plan():
    from planner.cli_options import config_from_options
    from profiler.gpu_matrix import main, matrix, split_parts

    configs = matrix()
    assert len(configs) >= 40 and len({c.id for c in configs}) == len(configs)
    models = {c.model for c in configs}
    assert {"qwen2.5-0.5b", "llama-3.2-1b", "qwen2.5-3b", "llama-2-7b", "llama-3.1-8b", "qwen2.5-7b"} <= models
    assert any(c.options.get("offload") for c in configs) and any(c.options.get("method") == "qlora" for c in configs)
    for c in configs:  # every configuration is a valid TrainConfig of a known model
        config_from_options({k: v for k, v in c.options.items() if k != "model"})
        load_model(c.model)
    for n in (1, 3, 5):
        parts = split_parts(configs, n)
        assert [c.id for p in parts for c in p] == [c.id for c in configs] and all(parts)
    assert main(["--list", "--part", "2/5"]) == 0
    assert main(["--list", "--part", "6/5"]) == 2
