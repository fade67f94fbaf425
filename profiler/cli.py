"""`tuneplan profile run | sweep` (typer sub-app `app`; the main CLI mounts it as `profile`).

Also runnable alone: `python -m profiler.cli run --model tiny --device cpu`.

No torch at import time: `tuneplan plan` imports this module to mount the sub-app and must
stay pure arithmetic. Everything heavy is imported inside the commands.

Exit codes: 0 ok, 1 the step failed (status "error" in measurements.json), 2 bad input
(one line on stderr), 3 out of memory (status "oom").
"""
from __future__ import annotations

import json
import shlex
import sys
from typing import Annotated, Any, Optional

import typer

from planner import cli_options as O
from planner.errors import PlanError

app = typer.Typer(name="profile", help="Run real (or fake-tensor) training steps and compare with the plan.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

Device = Annotated[str, typer.Option("--device", help="auto | cuda | cpu | fake (auto: cuda if present, else cpu "
                                                       "below 1B parameters, else fake).")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Timed steps (default: cuda 10, cpu 3).")]
Warmup = Annotated[Optional[int], typer.Option("--warmup", help="Burn-in steps before timing (default: cuda 3, cpu 1).")]
Out = Annotated[Optional[str], typer.Option("--out", help="Output directory (default runs/<timestamp>-<name>/).")]
Record = Annotated[bool, typer.Option("--record", help="Append a row to tables/measured/<device>.csv.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (weights, batches).")]
Weights = Annotated[Optional[str], typer.Option("--weights", help="Local model directory to load weights from "
                                                                   "(default: random init from the config).")]
Snapshot = Annotated[bool, typer.Option("--snapshot/--no-snapshot", help="cuda: dump the allocator snapshot pickle.")]
Timeline = Annotated[bool, typer.Option("--timeline/--no-timeline", help="Track a step by category for the timeline.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]


def _fmt_bytes(n: Any) -> str:
    if n is None:
        return "—"
    n = float(n)
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{int(n)} B"


def summary_table(m: dict[str, Any]):
    """A rich table of one run: per-phase peaks, prediction vs measurement, speed."""
    from rich.table import Table

    meas = m.get("measured") or {}
    mem = meas.get("memory") or {}
    c = m.get("config") or {}
    t = Table(title=f"profile: {m['model']['name']} {c.get('method')} seq {c.get('seq_len')} mb {c.get('micro_batch')}"
                    f" on {m.get('device')} — {m.get('status')}", title_justify="left")
    t.add_column("what")
    t.add_column("measured", justify="right")
    t.add_column("predicted", justify="right")
    t.add_column("rel. error", justify="right")
    for ph, v in (mem.get("phase_peaks") or {}).items():
        t.add_row(f"{ph} peak (tracked)", _fmt_bytes(v.get("total")), "", "")
    for ph, v in (meas.get("cuda_phase_peaks") or {}).items():
        t.add_row(f"{ph} peak allocated / reserved", f"{_fmt_bytes(v['allocated'])} / {_fmt_bytes(v['reserved'])}", "", "")
    for r in m.get("comparison") or []:
        if r["unit"] == "bytes":
            meas_s, pred_s = _fmt_bytes(r["measured"]), _fmt_bytes(r["predicted"])
        else:
            meas_s, pred_s = f"{r['measured']:,.0f}", f"{r['predicted']:,.0f}"
        err = f"{r['rel_error']:+.1%}" if r.get("rel_error") is not None else "—"
        t.add_row(r["metric"], meas_s, pred_s, err)
    if meas.get("step_time_s"):
        t.add_row("step time (median)", f"{meas['step_time_s']:.4f} s", "", "")
        t.add_row("tokens / s", f"{meas['tokens_per_s']:,.0f}", "", "")
    if meas.get("mfu") is not None:
        t.add_row("MFU / HFU", f"{meas['mfu']:.1%} / {meas.get('hfu', 0):.1%}", "", "")
    if (m.get("predicted") or {}).get("error"):
        t.caption = f"no prediction: {m['predicted']['error']}"
    t.add_row("outputs", m.get("run", {}).get("out_dir", ""), "", "")
    return t


def _command_line(ctx) -> str:
    """The command as given, canonically spelled: `tuneplan profile run` + every option that was
    set away from its default (so the row reproduces the run whichever way it was invoked)."""
    parts = ["tuneplan", "profile", ctx.command.name or "run"]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if v is None or v == p.default or p.name == "json_out":
            continue
        if getattr(p, "is_flag", False) or p.secondary_opts:
            if v:
                parts.append(p.opts[0])
            elif p.secondary_opts:
                parts.append(p.secondary_opts[0])
            continue
        parts += [p.opts[0], shlex.quote(str(v))]
    return " ".join(parts)


@app.command("run", help="Run a few real (cpu / cuda) or fake-tensor training steps of one configuration; "
                         "write measurements.json, timeline.png / .html and compare with the planner.")
def run(
    ctx: typer.Context,
    model: O.Model,
    device: Device = "auto",
    steps: Steps = None,
    warmup: Warmup = None,
    out: Out = None,
    json_out: O.Json = False,
    record: Record = False,
    gpus: O.Gpus = None,
    nodes: O.Nodes = None,
    gpu: O.Gpu = None,
    method: O.Method = None,
    lora_rank: O.LoraRank = None,
    lora_alpha: O.LoraAlpha = None,
    lora_dropout: O.LoraDropout = None,
    lora_target: O.LoraTarget = None,
    double_quant: O.DoubleQuant = None,
    precision: O.Precision = None,
    optimizer: O.Optim = None,
    zero: O.Zero = None,
    offload: O.Offload = None,
    micro_batch: O.MicroBatch = None,
    grad_accum: O.GradAccum = None,
    seq_len: O.SeqLen = None,
    packing: O.Packing = None,
    checkpointing: O.Checkpointing = None,
    attention: O.AttentionOpt = None,
    chunked_ce: O.ChunkedCE = None,
    compile: O.Compile = None,  # noqa: A002 - the flag's name
    seed: Seed = 0,
    weights: Weights = None,
    snapshot: Snapshot = True,
    timeline: Timeline = True,
    quiet: Quiet = False,
) -> None:
    options = dict(locals())  # the config flags; fixed_dimensions reads only those
    cfg = O.config_from_options(options)  # validates: PlanError → one line, exit 2
    from profiler.run import ProfileOOM, profile

    command = _command_line(ctx)
    try:
        m = profile(model, cfg, device=device, steps=steps, warmup=warmup, out=out, record=record, gpu=gpu,
                    seed=seed, weights=weights, snapshot=snapshot, timeline=timeline, command=command,
                    progress=not quiet)
        code = 0 if m["status"] == "ok" else 1
    except ProfileOOM as exc:
        m = exc.measurements or None  # measurements.json (status "oom") was written
        code = 3
        print(f"tuneplan: out of memory: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
    if m is not None:
        from rich.console import Console

        if json_out:
            sys.stdout.write(json.dumps(m, indent=2, default=str) + "\n")
            Console(stderr=True).print(summary_table(m))
        else:
            Console().print(summary_table(m))
        if m["status"] == "error":
            print(f"tuneplan: profile step failed: {m.get('message', '')[:300]}", file=sys.stderr)
    if code:
        raise typer.Exit(code)


@app.command("sweep", help="Run every configuration of a YAML grid (base flags + lists of values → cartesian "
                           "product), each in its own process; failures (OOM, errors) are recorded and the sweep goes on.")
def sweep(
    grid: Annotated[str, typer.Option("--grid", help="YAML file: `base:` flags and `grid:` lists (or top-level lists).")],
    out: Out = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per configuration before it is killed.")] = 900.0,
    record: Record = False,
    json_out: O.Json = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the configurations and commands; run nothing.")] = False,
) -> None:
    from profiler.sweep import load_grid, run_sweep

    configs = load_grid(grid)
    res = run_sweep(configs, out=out, timeout=timeout, record=record, dry_run=dry_run, json_out=json_out)
    if json_out:
        sys.stdout.write(json.dumps(res, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m profiler.cli ...`: same error handling as the tuneplan entry point."""
    from planner.cli import run_app

    return run_app(app, argv, "tuneplan profile")


if __name__ == "__main__":
    sys.exit(main())
