"""Multi-process launch: the exact `torchrun` / `deepspeed` command for a training run.

Every rank runs `python -m trainer.run OUT/train_options.json` (the options the CLI
resolved, written once), so what a launched run trains is what a one-process run trains.

- one node: `torchrun --standalone --nproc_per_node G -m trainer.run OPTS` (default), or
  `deepspeed --num_gpus G --module trainer.run OPTS` with `--launcher deepspeed`;
- several nodes: `deepspeed --hostfile H --num_nodes N --num_gpus G --master_addr A --module trainer.run OPTS`
  (pdsh fans out from the first node), or with `--launcher torchrun` one command per node
  (`--nnodes N --node_rank R --master_addr A --master_port P`) that `--print-launch` prints
  for each node to run;
- CPU (no CUDA): G = --gpus processes, `DS_ACCELERATOR=cpu`, gloo (DESIGN.md §5),
  `OMP_NUM_THREADS = cores / G` so the ranks do not oversubscribe the cores.

`TORCH_EXTENSIONS_DIR` (DeepSpeed's JIT-built ops: the CPU shared-memory comm op takes ~25 s
to build once) and `TORCHINDUCTOR_CACHE_DIR` point to a cache that persists between runs:
`$TUNEPLAN_CACHE_DIR`, else `.cache/` in the repository root.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from planner.errors import PlanError

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    env = os.environ.get("TUNEPLAN_CACHE_DIR")
    return Path(env) if env else REPO_ROOT / ".cache"


def cuda_available() -> bool:
    """Without importing torch (the CLI stays light): a visible NVIDIA device node + driver."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        import torch  # only when launching: the caller is about to train anyway

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Variables set on top of the caller's environment."""
    per_node: list[list[str]] = field(default_factory=list)
    """torchrun multi-node: one argv per node (node_rank 0..N-1); empty otherwise."""
    launcher: str = "torchrun"

    def shell(self, argv: list[str] | None = None) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        cmd = " ".join(shlex.quote(a) for a in (argv or self.argv))
        return f"{env} {cmd}".strip()

    def describe(self) -> str:
        if self.per_node:
            return "\n".join(f"# node {r}\n{self.shell(a)}" for r, a in enumerate(self.per_node))
        return self.shell()


def launch_env(device: str, nproc: int) -> dict[str, str]:
    cache = cache_root()
    env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or str(cache / "torch_extensions"),
        "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(cache / "inductor"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        cores = os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // max(1, nproc)))
    # `-m trainer.run` must import this checkout even when it is not pip-installed
    pp = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in pp.split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([pp] if pp else []))
    return env


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _deepspeed() -> list[str]:
    exe = shutil.which("deepspeed")
    if not exe:
        raise PlanError("the deepspeed launcher is not on PATH: pip install deepspeed, or use --launcher torchrun")
    return [exe]


def build_launch(options_json: str | os.PathLike, *, gpus: int, nodes: int = 1, launcher: str | None = None,
                 hostfile: str | None = None, master_addr: str | None = None, master_port: int = 29500,
                 device: str | None = None) -> LaunchPlan:
    """The command that starts `gpus × nodes` ranks of `python -m trainer.run OPTIONS_JSON`."""
    device = device or ("cuda" if cuda_available() else "cpu")
    if gpus < 1 or nodes < 1:
        raise PlanError("--gpus and --nodes must be >= 1")
    if launcher is None:
        launcher = "deepspeed" if (nodes > 1 and hostfile) else "torchrun"
    if launcher not in ("torchrun", "deepspeed"):
        raise PlanError(f"--launcher {launcher!r}: choose torchrun or deepspeed")
    if hostfile is not None and not Path(hostfile).is_file():
        raise PlanError(f"--hostfile {hostfile}: no such file")
    env = launch_env(device, gpus)
    target = ["-m", "trainer.run", str(options_json)]
    if launcher == "deepspeed":
        argv = _deepspeed()
        if hostfile:
            argv += ["--hostfile", str(hostfile)]
        if nodes > 1:
            argv += ["--num_nodes", str(nodes)]
            if master_addr:
                argv += ["--master_addr", master_addr]
        argv += ["--num_gpus", str(gpus), "--master_port", str(master_port)]
        argv += ["--module", "trainer.run", str(options_json)]
        return LaunchPlan(argv, env, launcher="deepspeed")
    base = _torchrun()
    if nodes == 1:
        return LaunchPlan(base + ["--standalone", "--nproc_per_node", str(gpus)] + target, env)
    addr = master_addr or "MASTER_ADDR"
    per_node = [base + ["--nnodes", str(nodes), "--node_rank", str(r), "--nproc_per_node", str(gpus),
                        "--master_addr", addr, "--master_port", str(master_port)] + target for r in range(nodes)]
    return LaunchPlan(per_node[0], env, per_node=per_node)


def run_launch(plan: LaunchPlan) -> int:
    """Run the launch command (this node only) and return its exit code."""
    import subprocess

    if plan.per_node:
        raise PlanError("a torchrun launch over several nodes must be started on every node: run the commands "
                        "`--print-launch` prints, or give --hostfile to use the deepspeed launcher")
    env = dict(os.environ) | plan.env
    proc = subprocess.run(plan.argv, env=env)
    return proc.returncode
