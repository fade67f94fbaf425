"""Planning is arithmetic: importing and running the planner must not import torch."""
import json
import subprocess
import sys


def test_plan_does_not_import_torch():
    code = (
        "import sys, json\n"
        "from planner.cli import main\n"
        "rc = main(['plan', '--model', '7b', '--gpus', '8', '--json'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'deepspeed', 'matplotlib') if m in sys.modules]\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy}), file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    last = json.loads(out.stderr.strip().splitlines()[-1])
    assert last == {"rc": 0, "heavy": []}, out.stderr[-2000:]
