"""tuneplan train / export on CPU: a tiny Llama, a local tokenizer, the bundled data.

Fast on purpose (a 2-layer, hidden-64 model; a few steps each). The multi-process DeepSpeed
runs are in test_trainer_distributed.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def small_config(path: Path, **overrides) -> Path:
    """A tiny Llama config.json (vocab 2048 = the local tokenizer)."""
    cfg = json.loads((REPO / "tables" / "models" / "tiny.json").read_text())
    cfg.pop("_tuneplan", None)
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1)
    cfg.update(overrides)
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> str:
    return str(small_config(tmp_path_factory.mktemp("model") / "config.json"))


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    # generated dataset + tokenizer cached once per session, not in the user's ~/.cache
    os.environ.setdefault("TUNEPLAN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _rows(path: Path, key: str = "loss") -> list[dict]:
    return [r for r in (json.loads(l) for l in path.read_text().splitlines() if l.strip()) if r.get(key) is not None]


def _opts(model: str, out: Path, **kw):
    from planner.config import TrainConfig
    from trainer.run import TrainOptions

    cfg = kw.pop("cfg", {})
    base = dict(micro_batch=4, seq_len=128, precision="fp32")
    base.update(cfg)
    return TrainOptions(model=model, cfg=TrainConfig(**base), out=str(out), quiet=True, **kw)


# ---------------------------------------------------------------------------- no torch

def test_cli_module_does_not_import_torch():
    code = ("import sys, trainer.cli, trainer.launch\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'deepspeed') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_plan_yaml_is_read_and_flags_override(tmp_path):
    import yaml

    from planner.config import TrainConfig
    from trainer.cli import build_options

    (tmp_path / "ds_config.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    plan = TrainConfig(method="lora", lora_rank=8, micro_batch=2, grad_accum=4, seq_len=512, zero=2).to_plan_yaml()
    plan.update(model_name_or_path="tiny", deepspeed="ds_config.json", learning_rate=3e-4, num_train_epochs=2)
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    local = {"config": tmp_path / "plan.yaml", "lora_rank": 4}
    opts, launch = build_options(local)
    assert opts.model == "tiny"
    assert opts.cfg.method.value == "lora" and opts.cfg.lora_rank == 4  # flag wins over the yaml
    assert opts.cfg.micro_batch == 2 and opts.cfg.grad_accum == 4
    assert opts.cfg.zero == 2
    assert opts.deepspeed == str((tmp_path / "ds_config.json").resolve())
    assert opts.lr == 3e-4 and opts.epochs == 2
    assert launch["print_launch"] is False
    # plan --out names the Hub id and the preset: the preset is what trains here (no downloads)
    (tmp_path / "p2.yaml").write_text(yaml.safe_dump({"model_name_or_path": "meta-llama/Llama-3.1-8B",
                                                      "model_preset": "llama-3.1-8b", "method": "lora"}))
    opts, _ = build_options({"config": tmp_path / "p2.yaml"})
    assert opts.model == "llama-3.1-8b" and opts.cfg.method.value == "lora"


def test_print_launch_commands(tmp_path, capsys):
    from trainer.cli import main

    rc = main(["train", "--model", "tiny", "--gpus", "2", "--zero", "2", "--print-launch", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "--nproc_per_node 2" in out and "trainer.run" in out and "TORCH_EXTENSIONS_DIR=" in out
    assert "DS_ACCELERATOR=cpu" in out  # no CUDA here
    assert (tmp_path / "o" / "train_options.json").is_file()
    rc = main(["train", "--model", "tiny", "--gpus", "4", "--nodes", "2", "--print-launch", "--master-addr", "10.0.0.1",
               "--out", str(tmp_path / "o2")])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("--node_rank") == 2 and "--node_rank 1" in out and "--nnodes 2" in out
    (tmp_path / "hosts").write_text("node1 slots=4\nnode2 slots=4\n")
    rc = main(["train", "--model", "tiny", "--gpus", "4", "--nodes", "2", "--print-launch", "--hostfile",
               str(tmp_path / "hosts"), "--launcher", "deepspeed", "--out", str(tmp_path / "o3")])
    out = capsys.readouterr().out
    if rc == 0:
        assert "--hostfile" in out and "--num_nodes 2" in out and "--module trainer.run" in out
    else:  # deepspeed launcher not on PATH
        assert rc == 2


# ---------------------------------------------------------------------------- loss

def test_chunked_cross_entropy_equals_transformers_loss(small_model):
    import torch

    from planner.config import TrainConfig
    from planner.model import resolve_model
    from trainer.loss import chunked_causal_lm_loss
    from trainer.model import build_model

    model, _ = build_model(resolve_model(small_model).spec, TrainConfig(precision="fp32"), seed=0)
    torch.manual_seed(0)
    ids = torch.randint(0, 2048, (2, 37))
    labels = ids.clone()
    labels[0, :10] = -100
    labels[1, 30:] = -100
    ref = model(input_ids=ids, labels=labels)
    ref.loss.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss, _ = chunked_causal_lm_loss(model, {"input_ids": ids, "labels": labels}, chunk_size=7)
    loss.backward()
    assert torch.allclose(loss, ref.loss, atol=1e-6, rtol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, g_ref[n], atol=1e-6, rtol=1e-4), n
    # token-weighted normalisation across gradient accumulation (num_items_in_batch)
    n_items = int((labels[:, 1:] != -100).sum())
    l2, _ = chunked_causal_lm_loss(model, {"input_ids": ids, "labels": labels}, num_items_in_batch=torch.tensor(2 * n_items))
    assert torch.allclose(l2 * 2, ref.loss, atol=1e-6)


# ---------------------------------------------------------------------------- training

def test_resume_after_kill_reproduces_the_loss_curve(small_model, tmp_path):
    """Kill a real training process after its first checkpoint, resume, compare every step."""
    from trainer.run import run_training

    steps, every = 20, 4
    ref = run_training(_opts(small_model, tmp_path / "ref", max_steps=steps, save_steps=every))
    args = [sys.executable, "-m", "trainer.cli", "train", "--model", small_model, "--micro-batch", "4", "--seq-len", "128",
            "--precision", "fp32", "--max-steps", str(steps), "--save-steps", str(every), "--quiet",
            "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    ckpt = tmp_path / "run" / "checkpoints" / f"checkpoint-{every}" / "trainer_state.json"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"training ended before it could be killed: {proc.stderr.read()[-2000:]}"
    killed_rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert killed_rows and killed_rows[-1]["step"] < steps
    out = subprocess.run(args + ["--resume"], env=_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    a = [(r["step"], r["loss"]) for r in _rows(tmp_path / "ref" / "metrics.jsonl")]
    b = [(r["step"], r["loss"]) for r in _rows(tmp_path / "run" / "metrics.jsonl")]
    assert [s for s, _ in a] == list(range(1, steps + 1))
    assert [s for s, _ in b] == [s for s, _ in a]
    for (s, la), (_, lb) in zip(a, b):
        assert abs(la - lb) < 1e-5, f"step {s}: {la} vs {lb}"
    # outputs of the reference run
    assert ref["loss_fell"] and ref["steps"] == steps
    for f in ("metrics.jsonl", "loss.png", "plan.yaml", "summary.json", "model/model.safetensors",
              "model/tokenizer.json"):
        assert (tmp_path / "ref" / f).is_file(), f
    row = _rows(tmp_path / "ref" / "metrics.jsonl")[-1]
    for k in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes"):
        assert row.get(k) is not None, k
    assert len(list((tmp_path / "ref" / "checkpoints").glob("checkpoint-*"))) == 2  # save_total_limit


def test_lora_merge_gives_the_same_logits(small_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.export import export_adapter
    from trainer.run import run_training

    s = run_training(_opts(small_model, tmp_path / "lora", max_steps=4, lr=5e-3, val_size=8, eval_steps=2,
                           early_stopping_patience=3, save_steps=3,
                           cfg=dict(method="lora", lora_rank=4, lora_dropout=0.0)))
    # early stopping: checkpoints aligned to evaluations, best model reloaded at the end
    assert any("early stopping" in n for n in s["notes"])
    assert (tmp_path / "lora" / "checkpoints" / "checkpoint-4").is_dir()
    adapter = tmp_path / "lora" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert s["final_eval_loss"] is not None
    assert _rows(tmp_path / "lora" / "metrics.jsonl", "eval_loss")
    res = export_adapter(adapter, tmp_path / "merged", merge=True)
    assert res["merged"]
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lora" / "base_model"))
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(0, 2048, (2, 33))
    with torch.no_grad():
        a = peft_model(input_ids=ids).logits
        b = merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lora" / "base_model")).eval()(input_ids=ids).logits
    assert (a - plain).abs().max() > 1e-4, "the adapter did not train"
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_qlora_trains_on_cpu(small_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    from trainer.run import run_training

    s = run_training(_opts(small_model, tmp_path / "q", max_steps=3, lr=5e-3,
                           cfg=dict(method="qlora", precision="bf16-mixed", lora_rank=4)))
    assert s["steps"] == 3
    assert all(r["loss"] == r["loss"] for r in _rows(tmp_path / "q" / "metrics.jsonl"))  # finite
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").is_file()
    assert s["params"]["trainable_params"] < s["params"]["total_params"] / 5


def test_packing_with_chunked_ce_freeze_and_neftune(small_model, tmp_path):
    from trainer.run import run_training

    s = run_training(_opts(small_model, tmp_path / "p", max_steps=3, neftune_alpha=5.0,
                           cfg=dict(packing=True, chunked_ce=True, method="freeze", freeze_trainable_layers=1,
                                    micro_batch=1, seq_len=256, checkpointing="full")))
    assert s["steps"] == 3 and s["data"]["packed_rows"] < s["data"]["train_examples"]
    assert any("chunked cross-entropy" in n for n in s["notes"])
    rows = _rows(tmp_path / "p" / "metrics.jsonl")
    assert all(r["tokens"] > 100 for r in rows)  # packed rows, not single short examples


def test_bad_data_stops_before_training(small_model, tmp_path, capsys):
    from trainer.cli import main

    data = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text("\n".join([json.dumps(good)] * 20 + ["{not json", json.dumps({"foo": 1})]) + "\n")
    out = tmp_path / "bad"
    rc = main(["train", "--model", small_model, "--data", str(data), "--out", str(out), "--max-steps", "2", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("tuneplan: error: ") and f"{data}:21:" in err[-1]
    assert not (out / "metrics.jsonl").exists()
    rc = main(["train", "--model", small_model, "--data", str(data), "--out", str(out), "--max-steps", "2",
               "--skip-bad-lines", "--precision", "fp32", "-q"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["bad_lines"] == 2 and summary["steps"] == 2


def test_unknown_model_and_bad_flags_exit_2(tmp_path, capsys):
    from trainer.cli import main

    assert main(["train", "--model", "no-such-model", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["train", "--model", "tiny", "--scheduler", "zigzag", "--out", str(tmp_path / "y"), "--max-steps", "1",
                 "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["export", "--adapter", str(tmp_path), "--out", str(tmp_path / "m")]) == 2


def test_tuneplan_app_registers_train_and_export():
    pytest.importorskip("planner.plan_command")
    from planner.cli import app

    names = {c.name for c in app.registered_commands}
    assert {"train", "export"} <= names
