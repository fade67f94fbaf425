"""Issue 2's bad inputs: one line on stderr, exit code 2, no traceback — through the real
console script, the way a user meets them."""
from __future__ import annotations

import subprocess
import sys

import pytest

from planner.cli import main


@pytest.fixture
def malformed(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"model_type": "llama", "hidden_size": 4096,')  # truncated JSON
    return str(p)


CASES = [
    (["plan", "--model", "llama-9000"], "unknown model"),
    (["plan", "--model", "7b", "--gpus", "0"], "--gpus"),
    (["plan", "--model", "7b", "--zero", "5"], "--zero"),
    (["plan", "--model", "7b", "--method", "qlora", "--precision", "fp32"], "QLoRA"),
    (["plan", "--model", "MALFORMED"], "malformed JSON"),
    (["plan", "--model", "7b", "--seq-len", "-5"], "--seq-len"),
    (["plan", "--model", "7b", "--micro-batch", "-1"], "--micro-batch"),
    (["plan", "--model", "7b", "--nodes", "0"], "--nodes"),
    (["plan", "--model", "7b", "--gpu", "h1000"], "unknown GPU"),
    (["plan", "--model", "7b", "--offload", "optimizer", "--zero", "0"], "ZeRO"),
    (["plan", "--model", "7b", "--method", "sparse"], "method"),
    (["plan"], "--model"),
    (["plan", "--model", "7b", "--no-such-flag"], "--no-such-flag"),
]


@pytest.mark.parametrize("argv,fragment", CASES, ids=[" ".join(a[1:]) for a, _ in CASES])
def test_bad_input_one_line_exit_2(argv, fragment, malformed, capsys):
    argv = [malformed if a == "MALFORMED" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("tuneplan: error:") and fragment in err[0], err[0]


def test_console_script_has_no_traceback(malformed):
    out = subprocess.run([sys.executable, "-m", "planner.cli", "plan", "--model", malformed],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
