"""The GPU measurement matrix of issue 7, in one command per device call.

    python -m profiler.gpu_matrix --out $OUT --part 1/4          # on the GPU machine
    python -m profiler.gpu_matrix --list                        # the plan, here (no GPU needed)
    python -m profiler.gpu_matrix --out /tmp/m --device cpu --only q05-full-s512   # smoke test on CPU
    python -m profiler.gpu_matrix --import DIR                  # rows → tables/measured/<gpu>.csv

Models: Qwen2.5-0.5B, Llama-3.2-1B, Qwen2.5-3B, Llama-2-7B, Llama-3.1-8B, Qwen2.5-7B (152k
vocabulary), Qwen2.5-14B and Llama-2-13B (LoRA / QLoRA). Methods: full (≤ 3B; 7B with an
8-bit / paged optimizer, and one ZeRO-2 optimizer-offload case), LoRA r16 all-linear and
q_proj,v_proj, QLoRA NF4 + double quant. Toggles: checkpointing none / full, sdpa vs
flash (sdpa's flash backend when flash-attn is absent) and eager, seq 512 / 2048 / 8192,
micro-batch 1 / 4, packing, compile (subset), chunked CE.

Each configuration runs as its own `python -m profiler.cli run --device cuda` process with
a time limit, so an OOM or a crash costs one row (kept, status oom / error) and the matrix
goes on. `--budget` stops launching configurations when the next one would not finish in
time; those rows say "skipped: budget" and `--only` / `--part` can run them later.

Outputs in --out (at most 4 files per part, so two parts fit one device call's 8 files):
matrix-<part>.csv (one row per configuration, the tables/measured columns + config_id),
rows-<part>.jsonl (per-row JSON: the full measurements.json of each configuration, timeline
points dropped), runs-<part>.tar.gz (each configuration's directory: measurements.json,
timeline.png, timeline.html, stderr.log; snapshot pickles only with --snapshots),
log-<part>.txt. Progress is printed line by line (flushed) as configurations finish.

Runs with torch 2.4+ (the GPU machines have torch 2.11, transformers 5.17): nothing
torch-2.13-specific. bitsandbytes and deepspeed are not installed there: their rows are
marked "skipped" unless the wheels were carried (device README, Notes).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MatrixConfig", "matrix", "split_parts", "main"]


@dataclass(frozen=True)
class MatrixConfig:
    id: str
    options: dict[str, Any] = field(hash=False)
    """`profile run` options (python names)."""
    why: str = ""

    @property
    def model(self) -> str:
        return self.options["model"]

    def needs(self) -> list[str]:
        o = self.options
        out = []
        if o.get("method") == "qlora" or str(o.get("optimizer", "")).endswith("8bit"):
            out.append("bitsandbytes")
        if o.get("zero") or o.get("offload"):
            out.append("deepspeed")
        return out

    def est_seconds(self) -> float:
        """Rough wall time on an H100: process start + build + steps (+ compile / JIT builds)."""
        size = {"qwen2.5-0.5b": 0.5, "llama-3.2-1b": 1.2, "qwen2.5-3b": 3.1, "llama-2-7b": 6.7,
                "llama-3.1-8b": 8.0, "qwen2.5-7b": 7.6, "qwen2.5-14b": 14.8, "llama-2-13b": 13.0}.get(self.model, 1)
        o = self.options
        t = 22 + 2.5 * size + 0.6 * size * o.get("seq_len", 2048) * o.get("micro_batch", 1) / 2048
        if o.get("compile"):
            t += 70
        if o.get("offload"):
            t += 200
        if o.get("method") == "qlora":
            t += 1.5 * size
        return t


def _c(cid: str, model: str, why: str = "", **opts: Any) -> MatrixConfig:
    o = {"model": model, "method": "full", "seq_len": 2048, "micro_batch": 1, "checkpointing": "none",
         "attention": "sdpa"}
    o.update(opts)
    if o["method"] in ("lora", "qlora"):
        o.setdefault("lora_rank", 16)
        o.setdefault("lora_target", "all-linear")
    return MatrixConfig(cid, o, why)


def matrix(quick: bool = False) -> list[MatrixConfig]:
    """The configurations, in run order (small models first, the offload case last)."""
    q05, l1, q3 = "qwen2.5-0.5b", "llama-3.2-1b", "qwen2.5-3b"
    l7, l8, q7, q14, l13 = "llama-2-7b", "llama-3.1-8b", "qwen2.5-7b", "qwen2.5-14b", "llama-2-13b"
    qv = "q_proj,v_proj"
    full = [
        # -- Qwen2.5-0.5B: every toggle on a cheap model
        _c("q05-full-s512", q05, "baseline, short rows", seq_len=512),
        _c("q05-full-s2048", q05, "baseline"),
        _c("q05-full-s2048-mb4", q05, "micro-batch 4", micro_batch=4),
        _c("q05-full-s2048-ckpt", q05, "checkpointing", checkpointing="full"),
        _c("q05-full-s8192-ckpt", q05, "long rows", seq_len=8192, checkpointing="full"),
        _c("q05-full-s2048-cce", q05, "chunked CE, 152k vocab", chunked_ce=True),
        _c("q05-full-s2048-mb4-pack", q05, "packing", micro_batch=4, packing=True),
        _c("q05-full-s2048-eager", q05, "eager attention (s² scores)", attention="eager"),
        _c("q05-full-s2048-flash", q05, "flash (flash-attn or sdpa's flash backend)", attention="flash"),
        _c("q05-full-s512-compile", q05, "torch.compile", seq_len=512, compile=True),
        _c("q05-lora-s2048", q05, "LoRA all-linear", method="lora"),
        _c("q05-lora-qv-s2048", q05, "LoRA q,v", method="lora", lora_target=qv),
        _c("q05-qlora-s2048", q05, "QLoRA", method="qlora"),
        # -- Llama-3.2-1B
        _c("l1-full-s2048", l1, "baseline"),
        _c("l1-full-s512-mb4", l1, "short rows, micro-batch 4", seq_len=512, micro_batch=4),
        _c("l1-full-s8192-ckpt", l1, "long rows", seq_len=8192, checkpointing="full"),
        _c("l1-full-s2048-pack", l1, "packing", packing=True),
        _c("l1-lora-s2048-mb4", l1, "LoRA micro-batch 4", method="lora", micro_batch=4),
        _c("l1-lora-s2048-compile", l1, "LoRA + compile", method="lora", compile=True),
        _c("l1-qlora-s2048", l1, "QLoRA", method="qlora"),
        # -- Qwen2.5-3B
        _c("q3-full-s512", q3, "full, short rows", seq_len=512),
        _c("q3-full-s2048-ckpt", q3, "full + checkpointing", checkpointing="full"),
        _c("q3-lora-s2048", q3, "LoRA", method="lora"),
        _c("q3-lora-s2048-mb4-ckpt", q3, "LoRA mb4 + checkpointing", method="lora", micro_batch=4,
           checkpointing="full"),
        _c("q3-lora-qv-s8192-ckpt", q3, "LoRA q,v long rows", method="lora", lora_target=qv, seq_len=8192,
           checkpointing="full"),
        _c("q3-qlora-s2048-mb4", q3, "QLoRA mb4", method="qlora", micro_batch=4),
        # -- Llama-2-7B
        _c("l7-lora-s2048", l7, "LoRA all-linear", method="lora"),
        _c("l7-lora-qv-s2048", l7, "LoRA q,v", method="lora", lora_target=qv),
        _c("l7-lora-s2048-mb4-ckpt", l7, "LoRA mb4 + checkpointing", method="lora", micro_batch=4,
           checkpointing="full"),
        _c("l7-qlora-s2048", l7, "QLoRA", method="qlora"),
        _c("l7-qlora-s8192-ckpt", l7, "QLoRA long rows", method="qlora", seq_len=8192, checkpointing="full"),
        _c("l7-full-s2048", l7, "full bf16 + AdamW: expected OOM on 80 GB", method="full"),
        _c("l7-full-s2048-ckpt-8bit", l7, "full, 8-bit AdamW, checkpointing", optimizer="adamw-8bit",
           checkpointing="full"),
        # -- Llama-3.1-8B (128k vocab)
        _c("l8-lora-s2048", l8, "LoRA", method="lora"),
        _c("l8-lora-s2048-cce", l8, "LoRA + chunked CE", method="lora", chunked_ce=True),
        _c("l8-lora-s512-mb4", l8, "LoRA short rows mb4", method="lora", seq_len=512, micro_batch=4),
        _c("l8-lora-s8192-ckpt", l8, "LoRA long rows", method="lora", seq_len=8192, checkpointing="full"),
        _c("l8-lora-s2048-pack", l8, "LoRA packing", method="lora", packing=True),
        _c("l8-qlora-s2048-mb4-ckpt", l8, "QLoRA mb4 + checkpointing", method="qlora", micro_batch=4,
           checkpointing="full"),
        _c("l8-lora-s2048-compile", l8, "LoRA + compile", method="lora", compile=True),
        # -- Qwen2.5-7B (152k vocab)
        _c("q7-lora-s2048", q7, "LoRA, big vocabulary", method="lora"),
        _c("q7-lora-s2048-cce", q7, "LoRA + chunked CE", method="lora", chunked_ce=True),
        _c("q7-qlora-s2048", q7, "QLoRA", method="qlora"),
        _c("q7-lora-qv-s8192-ckpt", q7, "LoRA q,v long rows", method="lora", lora_target=qv, seq_len=8192,
           checkpointing="full"),
        _c("q7-full-s512-ckpt-paged8bit", q7, "full, paged 8-bit AdamW", optimizer="paged-adamw-8bit",
           seq_len=512, checkpointing="full"),
        # -- 13-14B adapters
        _c("q14-lora-s2048-ckpt", q14, "14B LoRA", method="lora", checkpointing="full"),
        _c("q14-qlora-s2048", q14, "14B QLoRA", method="qlora"),
        _c("q14-qlora-s8192-ckpt", q14, "14B QLoRA long rows", method="qlora", seq_len=8192, checkpointing="full"),
        _c("l13-qlora-s2048-mb4-ckpt", l13, "13B QLoRA mb4", method="qlora", micro_batch=4, checkpointing="full"),
        _c("l13-lora-s2048-ckpt", l13, "13B LoRA", method="lora", checkpointing="full"),
        # -- optimizer offload (DeepSpeed ZeRO-2, one process; JIT-builds cpu_adam)
        _c("l7-full-s2048-ckpt-zero2-offload", l7, "ZeRO-Offload (DeepSpeedCPUAdam)", zero=2, offload="optimizer",
           checkpointing="full"),
    ]
    if not quick:
        return full
    keep = ("q05-full-s512", "q05-full-s2048-ckpt", "q05-lora-s2048", "q05-full-s2048-mb4-pack",
            "l1-qlora-s2048", "q05-full-s2048-cce")
    return [c for c in full if c.id in keep]


def split_parts(configs: list[MatrixConfig], n: int) -> list[list[MatrixConfig]]:
    """`n` contiguous parts of about equal estimated time (order kept)."""
    total = sum(c.est_seconds() for c in configs)
    parts: list[list[MatrixConfig]] = [[] for _ in range(n)]
    acc, k = 0.0, 0
    for c in configs:
        t = c.est_seconds()
        if k < n - 1 and parts[k] and acc + t / 2 > total * (k + 1) / n:
            k += 1
        parts[k].append(c)
        acc += t
    return parts


def _local_options(c: MatrixConfig) -> dict[str, Any]:
    """--device cpu smoke test: the same configuration on the tiny model, short rows."""
    o = dict(c.options)
    o.update(model="tiny", seq_len=min(int(o.get("seq_len", 64)), 64), micro_batch=1)
    o.pop("compile", None)
    return o


def _say(msg: str, log) -> None:
    print(msg, flush=True)
    if log is not None:
        log.write(msg + "\n")
        log.flush()


def _measurements_for_jsonl(m: dict[str, Any]) -> dict[str, Any]:
    return m  # timeline points are not in measurements.json (only in the HTML)


def run_matrix(configs: list[MatrixConfig], out: Path, tag: str, *, device: str, timeout: float, budget: float,
               steps: int, warmup: int, snapshots: bool) -> list[dict[str, Any]]:
    from profiler.sweep import run_one, sweep_row, write_csv

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"tuneplan-matrix-{tag}-"))
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    have = {m: importlib.util.find_spec(m) is not None for m in ("bitsandbytes", "deepspeed", "flash_attn")}
    log = (out / f"log-{tag}.txt").open("a")
    _say(f"gpu_matrix {tag}: {len(configs)} configurations, device {device}, budget {budget:.0f} s, "
         f"per-config timeout {timeout:.0f} s; installed: {have}", log)
    csv_path, jsonl_path = out / f"matrix-{tag}.csv", out / f"rows-{tag}.jsonl"
    for i, c in enumerate(configs):
        opts = c.options if device == "cuda" else _local_options(c)
        elapsed = time.perf_counter() - t0
        missing = [m for m in c.needs() if not have.get(m)]
        res: dict[str, Any]
        if missing:
            res = {"status": "skipped", "message": f"skipped: {', '.join(missing)} not installed (carry the wheels)",
                   "seconds": 0.0, "out_dir": ""}
        elif elapsed + min(c.est_seconds(), timeout) > budget:
            res = {"status": "skipped", "message": f"skipped: budget ({elapsed:.0f} s used of {budget:.0f} s)",
                   "seconds": 0.0, "out_dir": ""}
        else:
            extra = ["--device", device, "--steps", str(steps), "--warmup", str(warmup)]
            if not snapshots:
                extra.append("--no-snapshot")
            left = budget - elapsed
            res = run_one(opts, work / c.id, timeout=max(30.0, min(timeout, left)), extra_argv=extra)
        row = sweep_row(c.id, opts, res)
        row["why"] = c.why
        rows.append(row)
        write_csv(csv_path, rows)
        m = res.get("measurements")
        with jsonl_path.open("a") as fh:
            fh.write(json.dumps({"config_id": c.id, "why": c.why, "options": opts, "status": res["status"],
                                 "message": res.get("message", ""), "seconds": res.get("seconds"),
                                 "measurements": _measurements_for_jsonl(m) if m else None}, default=str) + "\n")
        summ = ((m or {}).get("measured") or {})
        pa, pr = summ.get("peak_allocated_bytes"), summ.get("peak_reserved_bytes")
        mem = f" alloc {pa / 2**30:.2f} GiB reserved {pr / 2**30:.2f} GiB" if pa and pr else ""
        tps = f" {summ['tokens_per_s']:,.0f} tok/s" if summ.get("tokens_per_s") else ""
        _say(f"[{i + 1}/{len(configs)} {time.perf_counter() - t0:5.0f}s] {c.id}: {res['status']}{mem}{tps} "
             f"{str(res.get('message', ''))[:140]}", log)
    # bundle the per-configuration directories into one file (the device returns at most 8 files,
    # 16 MiB each): without the HTML pages if the bundle would be too large
    tar_path = out / f"runs-{tag}.tar.gz"
    for skip in ((), (".html",), (".html", ".png")):
        with tarfile.open(tar_path, "w:gz") as tar:
            for c in configs:
                d = work / c.id
                if not d.exists():
                    continue
                for f in sorted(d.iterdir()):
                    if (f.suffix == ".pickle" and not snapshots) or f.suffix in skip:
                        continue
                    tar.add(f, arcname=f"{c.id}/{f.name}")
        if tar_path.stat().st_size < 15 * 2**20:
            break
        _say(f"runs bundle over 15 MiB: dropping {', '.join(skip) or 'nothing'} and more", log)
    shutil.rmtree(work, ignore_errors=True)
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
    _say(f"gpu_matrix {tag} done in {time.perf_counter() - t0:.0f} s: {counts}; wrote {csv_path.name}, "
         f"{jsonl_path.name}, runs-{tag}.tar.gz", log)
    _print_table(rows)
    log.close()
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    def g(v: Any) -> str:
        try:
            return f"{float(v) / 2**30:6.2f}"
        except (TypeError, ValueError):
            return "     —"

    print(f"{'config':34} {'status':8} {'alloc':>6} {'resv':>6} {'nvml':>6} {'pred_a':>6} {'pred_r':>6} {'tok/s':>8}")
    for r in rows:
        tps = r.get("tokens_per_s")
        try:
            tps = f"{float(tps):8.0f}"
        except (TypeError, ValueError):
            tps = "       —"
        print(f"{str(r['config_id'])[:34]:34} {str(r['status'])[:8]:8} {g(r.get('peak_allocated_bytes'))} "
              f"{g(r.get('peak_reserved_bytes'))} {g(r.get('nvml_peak_bytes'))} "
              f"{g(r.get('predicted_peak_allocated_bytes'))} {g(r.get('predicted_peak_reserved_bytes'))} {tps}",
              flush=True)


def import_rows(src: Path, measured_dir: str | None = None) -> list[Path]:
    """Append the rows of matrix-*.csv files under `src` to tables/measured/<gpu>.csv."""
    from profiler.record import append_rows, measured_dir as mdir

    files = sorted(src.glob("matrix-*.csv")) if src.is_dir() else [src]
    written = []
    by_file: dict[Path, list[dict[str, Any]]] = {}
    for f in files:
        with f.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("status") == "skipped" or row.get("device") != "cuda":
                    continue
                key = row.get("gpu") or "cuda"
                by_file.setdefault(mdir(measured_dir) / f"{key}.csv", []).append(row)
    for path, rows in by_file.items():
        append_rows(path, rows)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiler.gpu_matrix", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output directory (on the device machine: $OUT)")
    ap.add_argument("--quick", action="store_true", help="a 6-configuration subset")
    ap.add_argument("--part", default="1/1", help="K/N: run the K-th of N parts of about equal estimated time")
    ap.add_argument("--only", help="comma-separated configuration ids (overrides --part)")
    ap.add_argument("--list", "--dry-run", dest="list", action="store_true", help="print the plan; run nothing")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cuda (the matrix); cpu = smoke test on the tiny model")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for this call; later configs are skipped")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--snapshots", action="store_true", help="keep the CUDA allocator snapshot pickles")
    ap.add_argument("--import", dest="import_dir", help="append matrix-*.csv rows under DIR to tables/measured/")
    a = ap.parse_args(argv)

    if a.import_dir:
        for p in import_rows(Path(a.import_dir)):
            print(f"appended rows to {p}")
        return 0
    configs = matrix(quick=a.quick)
    try:
        k, n = (int(x) for x in a.part.split("/"))
        assert 1 <= k <= n
    except (ValueError, AssertionError):
        print(f"gpu_matrix: error: --part must be K/N with 1 <= K <= N, got {a.part!r}", file=sys.stderr)
        return 2
    if a.only:
        want = [s.strip() for s in a.only.split(",") if s.strip()]
        unknown = [w for w in want if w not in {c.id for c in configs}]
        if unknown:
            print(f"gpu_matrix: error: unknown configuration id(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
        chosen, tag = [c for c in configs if c.id in want], "only"
    else:
        parts = split_parts(configs, n)
        chosen, tag = parts[k - 1], f"part{k}of{n}" if n > 1 else "all"
    if a.quick:
        tag = "quick" if tag == "all" else f"quick-{tag}"
    if a.list:
        parts = split_parts(configs, n)
        for pi, part in enumerate(parts, 1):
            est = sum(c.est_seconds() for c in part)
            print(f"part {pi}/{n}: {len(part)} configurations, ~{est:.0f} s estimated")
            for c in part:
                from profiler.sweep import options_to_argv

                flag = " <- selected" if c in chosen else ""
                need = f" [needs {', '.join(c.needs())}]" if c.needs() else ""
                print(f"  {c.id:36} ~{c.est_seconds():4.0f}s  {' '.join(options_to_argv(c.options))}{need}{flag}")
        print(f"total: {len(configs)} configurations")
        return 0
    if not a.out:
        print("gpu_matrix: error: --out is required (use --list to see the plan)", file=sys.stderr)
        return 2
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_matrix: error: torch sees no CUDA GPU (use --list, or --device cpu for a smoke test)",
                  file=sys.stderr)
            return 2
    run_matrix(chosen, Path(a.out), tag, device=a.device, timeout=a.timeout, budget=a.budget, steps=a.steps,
               warmup=a.warmup, snapshots=a.snapshots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
