"""`tuneplan validate`: tolerance logic, suites, and the gate itself.

The key test perturbs a memory formula (activations ×1.3, in-process monkeypatch) and
checks that validate exits 1 — and that the same selection exits 0 unperturbed, so the
failure comes from the perturbation.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from planner.validate import Report, run
from planner.validate.cases import step_cases
from planner.validate.core import ERROR, FAIL, NO_ROWS, NO_TOLERANCE, PASS, Comparison, SuiteResult
from planner.validate.tolerances import judge, load_tolerances

ROOT = Path(__file__).resolve().parents[1]


def _rows(suite: str, errs: list[float], metric: str = "peak") -> list[Comparison]:
    return [Comparison(f"c{i}", suite, metric, 100.0, 100.0 * (1 + e)) for i, e in enumerate(errs)]


TOLS = {"s": {"peak": {"median": 0.05, "max": 0.10}, "all": {"median": 0.05, "max": 0.10}}}


# ------------------------------------------------------------------------------ tolerance logic
def test_pass_within_tolerance():
    res = judge(SuiteResult("s", rows=_rows("s", [0.01, -0.04, 0.09])), TOLS)
    assert res.status == PASS
    peak = next(s for s in res.stats if s.metric == "peak")
    assert peak.median == pytest.approx(0.04) and peak.max == pytest.approx(0.09)


@pytest.mark.parametrize("errs", [[0.01, 0.02, 0.11], [0.06, 0.06, 0.0]], ids=["max", "median"])
def test_fail_over_tolerance(errs):
    assert judge(SuiteResult("s", rows=_rows("s", errs)), TOLS).status == FAIL


def test_no_rows_is_not_pass_and_does_not_fail():
    res = judge(SuiteResult("s"), TOLS)
    assert res.status == NO_ROWS
    report = Report("quick", [res], 0.0)
    assert report.exit_code == 0 and report.verdict == "NO ROWS"


def test_metric_without_tolerance_fails():
    res = judge(SuiteResult("s", rows=_rows("s", [0.0], metric="gradients")), TOLS)
    assert res.status == NO_TOLERANCE
    assert Report("quick", [res], 0.0).exit_code == 1


def test_case_error_fails():
    res = judge(SuiteResult("s", rows=_rows("s", [0.0]), errors=["c9: boom"]), TOLS)
    assert res.status == ERROR and Report("quick", [res], 0.0).exit_code == 1


def test_tolerance_file_covers_every_suite_and_metric():
    tols = load_tolerances()
    expected = {"fake": {"parameters", "gradients", "optimizer", "activations", "peak", "all"},
                "cpu": {"parameters", "gradients", "optimizer", "activations", "peak", "all"},
                "gpu": {"peak_allocated", "peak_reserved", "all"},
                "published": {"memory", "throughput", "throughput_check", "all"}}
    for suite, metrics in expected.items():
        assert metrics <= set(tols[suite]), (suite, metrics - set(tols[suite]))
        for m, t in tols[suite].items():
            assert 0 <= t["median"] <= t["max"], (suite, m, t)


# ------------------------------------------------------------------------------ cases
def test_cases_are_consistent():
    """Every case builds a TrainConfig and oracle kwargs; quick ⊂ full; quick covers the matrix."""
    for suite in ("fake", "cpu"):
        full = step_cases(suite, "full")
        quick = step_cases(suite, "quick")
        assert quick and set(c.id for c in quick) <= set(c.id for c in full)
        for c in full:
            cfg, kw = c.train_config(), c.oracle_kwargs()
            assert kw["method"] == cfg.method.value and kw["seq_len"] == cfg.seq_len
            assert c.spec().num_layers == c.hf_config()["num_hidden_layers"]
    quick = step_cases("fake", "quick")
    assert {c.model for c in quick} == {"llama-2-7b", "llama-3-8b", "qwen2.5-7b"}
    cfgs = [c.train_config() for c in quick]
    assert {c.method.value for c in cfgs} == {"full", "lora"}
    assert {c.attention.value for c in cfgs} == {"sdpa", "eager"}
    assert {c.checkpointing.value for c in cfgs} == {"none", "full"}
    assert min(c.seq_len for c in cfgs) == 512 and max(c.seq_len for c in cfgs) == 4096


# ------------------------------------------------------------------------------ suites without torch
def test_gpu_suite_without_rows_says_no_rows(tmp_path):
    from planner.validate import gpu

    res = judge(gpu.run_suite(directory=tmp_path), load_tolerances())
    assert res.status == NO_ROWS and not res.rows
    assert any("no rows" in m for m in res.messages)


def test_gpu_suite_reads_recorded_rows(tmp_path):
    """A recorded GPU row (tuneplan / HF field names) becomes peak_allocated / peak_reserved rows."""
    from planner.validate import gpu

    (tmp_path / "h100.csv").write_text(
        "id,device,gpu,model,method,micro_batch,seq_len,precision,peak_allocated_bytes,peak_reserved_bytes,status\n"
        "r1,cuda,h100-80gb,llama-3-8b,lora,1,2048,bf16-true,40000000000,46000000000,ok\n"
        "r2,cuda,h100-80gb,llama-3-8b,full,8,8192,bf16-true,,,oom\n"
        "r3,cpu,,tiny,full,1,128,bf16-true,1000,1000,ok\n")
    res = gpu.run_suite(directory=tmp_path)
    assert not res.errors, res.errors
    assert sorted((r.case, r.metric) for r in res.rows) == [("r1", "peak_allocated"), ("r1", "peak_reserved")]
    assert res.excluded and res.excluded[0][0] == "r2" and "oom" in res.excluded[0][1]


def test_published_suite_rows_and_exclusions():
    from planner.validate import published

    res = published.run_suite()
    keys = {r.case for r in res.rows}
    excluded = dict(res.excluded)
    assert "seed-zhang-1/memory" in excluded and "seed-zhang-1/throughput" in excluded
    assert "torchtune-readme-3/memory" in keys and "seed-zhang-2/memory" in keys
    assert all(why.strip() for why in excluded.values())
    assert not keys & set(excluded), "a row is both compared and excluded"
    assert {r.metric for r in res.rows} <= {"memory", "throughput", "throughput_check"}


def test_validate_command_does_not_import_torch():
    """The command module and the torch-free suites run without importing torch."""
    code = (
        "import sys, json\n"
        "import planner.validate_command\n"
        "from planner.validate import run\n"
        "r = run('quick', 'gpu,published', sensitivity=True)\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'deepspeed') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'suites': [s.name for s in r.suites]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last == {"heavy": [], "suites": ["gpu", "published"]}


# ------------------------------------------------------------------------------ the gate
def _scale_activations(monkeypatch, factor: float) -> None:
    """Perturb the memory model's activation term: every saved / recomputed / transient
    activation byte × factor (planner.memory.estimate_memory calls this function)."""
    import planner.memory as memory

    orig = memory.estimate_activations

    def scaled(model, cfg):
        est = orig(model, cfg)
        changes = {f: int(getattr(est, f) * factor) for f in ("saved", "recompute", "backward_transient")
                   if hasattr(est, f)}
        if isinstance(getattr(est, "breakdown", None), dict):
            changes["breakdown"] = {k: int(v * factor) for k, v in est.breakdown.items()}
        return dataclasses.replace(est, **changes)

    monkeypatch.setattr(memory, "estimate_activations", scaled)


def _validate_exit(args: list[str]) -> int:
    """Run the real typer command in-process; its exit code."""
    import typer
    from typer.testing import CliRunner

    from planner.validate_command import validate

    app = typer.Typer()
    app.command("validate")(validate)
    app.command("noop")(lambda: None)  # keep "validate" a sub-command, as in planner.cli
    result = CliRunner().invoke(app, ["validate", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code


CPU_CASE = ["--only", "cpu", "--case", "tiny full sdpa s256", "--no-sensitivity", "-q"]
FAKE_CASE = ["--only", "fake", "--case", "llama-3-8b full sdpa s2048", "--no-sensitivity", "-q"]


def test_validate_passes_unperturbed_cpu():
    pytest.importorskip("torch")
    assert _validate_exit(CPU_CASE) == 0


def test_perturbed_activation_formula_fails_cpu(monkeypatch):
    pytest.importorskip("torch")
    _scale_activations(monkeypatch, 1.3)
    assert _validate_exit(CPU_CASE) == 1


@pytest.mark.slow
def test_perturbed_activation_formula_fails_fake(monkeypatch):
    """The same at full scale: one Llama-3-8B fake-tensor case (~10-20 s each run)."""
    pytest.importorskip("torch")
    assert _validate_exit(FAKE_CASE) == 0
    _scale_activations(monkeypatch, 1.3)
    assert _validate_exit(FAKE_CASE) == 1


# ------------------------------------------------------------------------------ calibration fitting
def test_fit_calibration_fits_memory_constants_over_the_gpu_suite(tmp_path, monkeypatch):
    """fragmentation per method = median (reserved − allocated)/allocated over the suite's rows;
    context = median (NVML − reserved) − cuBLAS; written in place without losing comments."""
    import shutil

    from tables import fit_calibration as fc

    lines = ["id,device,gpu,model,method,micro_batch,seq_len,precision,gpus,"
             "peak_allocated_bytes,peak_reserved_bytes,nvml_peak_bytes,status"]
    for i, (a, r, d) in enumerate([(100, 110, 700), (100, 120, 720), (200, 230, 830), (100, 150, 650)]):
        lines.append(f"r{i},cuda,h100-80gb,tiny,lora,1,128,bf16-true,1,{a * 2**20},{r * 2**20},{d * 2**20},ok")
    (tmp_path / "h100-80gb.csv").write_text("\n".join(lines) + "\n")
    fits, log = fc.fit_memory(tmp_path)
    frag = fits["fragmentation_fraction"]["lora"]
    assert frag["value"] == pytest.approx(0.175, abs=1e-4) and frag["n"] == 4  # median of .10 .20 .15 .50
    from planner.memory.overhead import calibration_value
    cublas = int(calibration_value("cublas_workspace_bytes"))
    assert fits["cuda_context_bytes"]["value"] == int(595 * 2**20) - cublas  # median of 590, 600, 600, 500
    assert any("nccl" in line and "prior kept" in line for line in log)

    cal = tmp_path / "calibration.yaml"
    shutil.copy(fc.CALIBRATION, cal)
    monkeypatch.setattr(fc, "CALIBRATION", cal)
    fc.write_memory(fits, "test rows")
    import yaml
    data = yaml.safe_load(cal.read_text())["memory"]
    assert data["fragmentation_fraction"]["lora"]["value"] == pytest.approx(0.175)
    assert data["fragmentation_fraction"]["full"] == yaml.safe_load(fc.CALIBRATION.read_text())["memory"]["fragmentation_fraction"]["full"]
    assert data["cuda_context_bytes"]["value"] == fits["cuda_context_bytes"]["value"]
    assert "# fitted by tables/fit_calibration.py" in cal.read_text() and "prior, not yet measured" in cal.read_text()
