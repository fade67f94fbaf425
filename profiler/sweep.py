"""`tuneplan profile sweep --grid FILE.yaml`: many configurations, one process each.

Grid file (YAML)::

    base:                  # flags of `profile run`, dashes or underscores
      model: tiny
      device: cpu
      steps: 2
    grid:                  # lists of values: the cartesian product of these
      method: [full, lora]
      checkpointing: [none, full]
    configs:               # optional: extra configurations (each on top of base)
      - {method: qlora, seq_len: 256}
    timeout: 600           # optional: seconds per configuration

Without `base` / `grid` keys, scalar top-level keys are the base and list-valued ones the
grid axes. Every configuration runs as `python -m profiler.cli run ... --json` in its own
process with a time limit, so an out-of-memory error, a crash or a hang ends that
configuration only: its row records `status` (ok | oom | error | timeout) and the message,
and the sweep goes on. Results: `<out>/sweep.csv` (rewritten atomically after every
configuration, so a killed sweep keeps what it finished), `<out>/sweep.jsonl`, and each
configuration's own output directory `<out>/<NNN>-<id>/`.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from planner.errors import PlanError

__all__ = ["load_grid", "expand", "options_to_argv", "run_one", "run_sweep", "config_id", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent
ALIASES = {"per_device_train_batch_size": "micro_batch", "gradient_accumulation_steps": "grad_accum",
           "cutoff_len": "seq_len", "lora_r": "lora_rank", "gradient_checkpointing": "checkpointing",
           "attn_implementation": "attention", "torch_compile": "compile", "json": None, "out": None}
_SKIP_ID = {"device", "steps", "warmup", "quiet", "snapshot", "timeline", "seed", "record", "gpu"}


def _run_params() -> dict[str, Any]:
    """`profile run`'s click parameters by python name."""
    import typer.main

    from profiler.cli import app

    cmd = typer.main.get_command(app).commands["run"]
    return {p.name: p for p in cmd.params}


def _norm_key(key: str, params: dict[str, Any], where: str) -> str | None:
    k = str(key).strip().lstrip("-").replace("-", "_")
    if k in ALIASES:
        return ALIASES[k]
    if k == "json_out":
        return None
    if k not in params:
        known = ", ".join(sorted(n for n in params if n != "json_out"))
        raise PlanError(f"{where}: unknown option {key!r} (profile run options: {known})")
    return k


def options_to_argv(options: dict[str, Any], params: dict[str, Any] | None = None) -> list[str]:
    """{"seq_len": 512, "packing": True} → ["--seq-len", "512", "--packing"]."""
    params = params or _run_params()
    argv: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        p = params[key]
        if getattr(p, "is_flag", False) or p.secondary_opts:
            v = value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")
            if v:
                argv.append(p.opts[0])
            elif p.secondary_opts:
                argv.append(p.secondary_opts[0])
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        argv += [p.opts[0], str(value)]
    return argv


def config_id(options: dict[str, Any], base: dict[str, Any] | None = None) -> str:
    """A short readable id from the options that differ from the base (or all of them)."""
    parts = []
    for k, v in options.items():
        if k in _SKIP_ID or (base is not None and base.get(k) == v and k != "model"):
            continue
        if isinstance(v, bool):
            parts.append(k.replace("_", "-") if v else f"no-{k.replace('_', '-')}")
        else:
            parts.append(f"{k.replace('_', '-')}={v}" if k != "model" else str(v))
    s = "_".join(parts) or "base"
    return "".join(c if c.isalnum() or c in "=.,_-+" else "-" for c in s)[:120]


def expand(spec: dict[str, Any], where: str = "grid") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(configurations, settings) from a grid mapping."""
    if not isinstance(spec, dict):
        raise PlanError(f"{where}: a grid file holds a mapping (base / grid / configs)")
    params = _run_params()
    settings = {k: spec[k] for k in ("timeout",) if k in spec}
    if "base" in spec or "grid" in spec or "configs" in spec:
        base_raw, grid_raw, extra = spec.get("base") or {}, spec.get("grid") or {}, spec.get("configs") or []
    else:
        base_raw = {k: v for k, v in spec.items() if not isinstance(v, list) and k not in settings}
        grid_raw = {k: v for k, v in spec.items() if isinstance(v, list)}
        extra = []
    base: dict[str, Any] = {}
    for k, v in base_raw.items():
        nk = _norm_key(k, params, where)
        if nk:
            base[nk] = v
    axes: dict[str, list] = {}
    for k, v in grid_raw.items():
        nk = _norm_key(k, params, where)
        if nk:
            axes[nk] = list(v) if isinstance(v, (list, tuple)) else [v]
    configs: list[dict[str, Any]] = []
    names = list(axes)
    for combo in itertools.product(*(axes[n] for n in names)) if names else [()]:
        configs.append({**base, **dict(zip(names, combo))})
    if not names and extra:
        configs = []
    for i, e in enumerate(extra):
        if not isinstance(e, dict):
            raise PlanError(f"{where}: configs[{i}] must be a mapping")
        cfg = dict(base)
        for k, v in e.items():
            nk = _norm_key(k, params, where)
            if nk:
                cfg[nk] = v
        configs.append(cfg)
    for c in configs:
        if "model" not in c:
            raise PlanError(f"{where}: every configuration needs a model (set base.model)")
    return configs, settings


def load_grid(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    p = Path(path)
    try:
        spec = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise PlanError(f"{p}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise PlanError(f"{p}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    configs, settings = expand(spec, str(p))
    base = (spec.get("base") if isinstance(spec, dict) and "base" in spec else None) or {}
    return {"configs": configs, "settings": settings, "base": {k.replace("-", "_"): v for k, v in base.items()},
            "path": str(p)}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("tuneplan:"):
            return ln
    return lines[-1] if lines else ""


def run_one(options: dict[str, Any], out_dir: Path, *, timeout: float, record: bool = False,
            extra_argv: Iterable[str] = (), params: dict[str, Any] | None = None) -> dict[str, Any]:
    """One configuration in its own process. Returns {status, message, returncode, seconds, measurements?}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = options_to_argv(options, params)
    cmd = [sys.executable, "-m", "profiler.cli", "run", *argv, "--out", str(out_dir), "--json", "--quiet",
           *(["--record"] if record else []), *extra_argv]
    t0 = time.perf_counter()
    res: dict[str, Any] = {"command": " ".join(cmd[2:]), "out_dir": str(out_dir)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stderr = None, (exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr) or ""
        res.update(status="timeout", message=f"killed after {timeout:.0f} s", returncode=None)
    res["seconds"] = time.perf_counter() - t0
    (out_dir / "stderr.log").write_text(stderr or "")
    mpath = out_dir / "measurements.json"
    m = None
    if mpath.exists():
        try:
            m = json.loads(mpath.read_text())
        except ValueError:
            m = None
    if rc is not None:
        res["returncode"] = rc
        if m is not None and m.get("status") not in (None, "running"):
            res["status"], res["message"] = m["status"], m.get("message", "")
        elif rc == 3:
            res["status"], res["message"] = "oom", _last_line(stderr)
        elif rc < 0:
            res["status"], res["message"] = "error", f"killed by signal {-rc}" + (
                " (host out of memory?)" if -rc == 9 else "") + (f": {_last_line(stderr)}" if stderr else "")
        elif rc != 0:
            res["status"], res["message"] = "error", _last_line(stderr) or f"exit code {rc}"
        else:
            res["status"], res["message"] = "ok", ""
        if m is not None and m.get("status") == "running":  # died mid-run (crash): keep what it wrote
            res["status"] = "oom" if "out of memory" in stderr.lower() else "error"
            res["message"] = _last_line(stderr) or f"exit code {rc}"
    if m is not None:
        res["measurements"] = m
    return res


def sweep_row(cid: str, options: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    """A flat CSV row: the measured-table columns (profiler.record) + the sweep's own."""
    from profiler.record import row_from_measurement

    row: dict[str, Any] = {"config_id": cid}
    m = res.get("measurements")
    if m is not None:
        row.update(row_from_measurement(m))
        for r in m.get("comparison") or []:
            if r.get("rel_error") is not None:
                row[f"rel_error_{r['metric']}"] = f"{r['rel_error']:.4f}"
    for k, v in options.items():
        if k not in row or row[k] in ("", None):
            row[k] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    row["status"] = res.get("status")
    row["message"] = " ".join(str(res.get("message", "")).split())[:500]
    row["returncode"] = res.get("returncode")
    row["wall_s"] = f"{res.get('seconds', 0):.1f}"
    row["out_dir"] = res.get("out_dir")
    row["sweep_command"] = res.get("command")
    return row


def write_csv(path: Path, rows: list[dict[str, Any]], lead: Iterable[str] = ("config_id", "status", "message")) -> None:
    from profiler.record import COLUMNS, append_rows

    tmp_target = Path(path)
    if tmp_target.exists():
        tmp_target.unlink()
    cols = list(lead) + [c for c in COLUMNS if c not in lead]
    append_rows(tmp_target, rows, cols)


def run_sweep(grid: dict[str, Any], *, out: str | os.PathLike | None = None, timeout: float | None = None,
              record: bool = False, dry_run: bool = False, json_out: bool = False,
              extra_argv: Iterable[str] = ()) -> dict[str, Any]:
    from rich.console import Console

    console = Console(stderr=True)
    configs = grid["configs"]
    timeout = float(timeout or grid.get("settings", {}).get("timeout") or 900)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out_dir = Path(out) if out else Path("runs") / f"{stamp}-sweep"
    params = _run_params()
    base = grid.get("base") or {}
    ids = []
    for i, c in enumerate(configs):
        ids.append(f"{i:03d}-{config_id(c, base if len(configs) > 1 else None)}")
    if dry_run:
        for cid, c in zip(ids, configs):
            console.print(f"{cid}: tuneplan profile run {' '.join(options_to_argv(c, params))}")
        return {"configs": [{"id": cid, "options": c, "argv": options_to_argv(c, params)} for cid, c in zip(ids, configs)],
                "out_dir": str(out_dir), "dry_run": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    results = []
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console) as prog:
        task = prog.add_task("", total=len(configs))
        for cid, c in zip(ids, configs):
            prog.update(task, description=cid)
            res = run_one(c, out_dir / cid, timeout=timeout, record=record, extra_argv=extra_argv, params=params)
            row = sweep_row(cid, c, res)
            rows.append(row)
            results.append({"id": cid, "options": c, "status": res["status"], "message": res.get("message", ""),
                            "out_dir": res["out_dir"], "seconds": res["seconds"]})
            with (out_dir / "sweep.jsonl").open("a") as fh:
                fh.write(json.dumps({"id": cid, "options": c, **{k: v for k, v in res.items() if k != "measurements"},
                                     "row": row}, default=str) + "\n")
            write_csv(out_dir / "sweep.csv", rows)
            prog.console.print(f"{cid}: [bold]{res['status']}[/bold] {str(res.get('message', ''))[:120]} "
                               f"({res['seconds']:.0f} s)")
            prog.advance(task)
    _print_table(console if json_out else Console(), rows)
    return {"out_dir": str(out_dir), "csv": str(out_dir / "sweep.csv"), "results": results}


def _print_table(console, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    def gib(v: Any) -> str:
        try:
            return f"{float(v) / 2**30:.2f}"
        except (TypeError, ValueError):
            return "—"

    def num(v: Any, fmt: str) -> str:
        try:
            return format(float(v), fmt)
        except (TypeError, ValueError):
            return "—"

    t = Table(title="sweep results", caption="memory in GiB (2^30 bytes): peak allocated / reserved, tracked "
              "peak, the planner's predicted peak allocated", title_justify="left", caption_justify="left")
    for col in ("config", "status", "alloc", "resv", "tracked", "pred", "step s", "tok/s"):
        if col == "config":
            t.add_column(col, overflow="fold", min_width=20, ratio=1)
        else:
            t.add_column(col, justify="left" if col == "status" else "right", no_wrap=True)
    for r in rows:
        t.add_row(str(r["config_id"]), str(r["status"]), gib(r.get("peak_allocated_bytes")),
                  gib(r.get("peak_reserved_bytes")), gib(r.get("tracked_peak_bytes")),
                  gib(r.get("predicted_peak_allocated_bytes")), num(r.get("step_time_s"), ".3f"),
                  num(r.get("tokens_per_s"), ",.0f"))
    console.print(t)
