"""Reference matrix of fake-tensor steps -> ``tables/measured/fake_reference.csv``.

    python -m profiler.fake_reference --out tables/measured/fake_reference.csv
    python -m profiler.fake_reference --only autocast=True --merge   # re-run a subset in place

One row per case: the settings, trainable/total parameters, per-phase per-category bytes
(``{phase}_{category}_bytes``), the category breakdown at the global peak
(``peak_{category}_bytes``), timing, and provenance (device="cpu-fake", library versions,
date, command). ``autocast`` True is bf16-mixed (forward + loss under
``torch.autocast(bfloat16)``, as HF Trainer ``bf16=True``); False is pure bf16 (bf16-true).
Bytes are exact integers of *allocated* memory on the HF code path (see
``profiler.fake``); GiB = 2**30 bytes. The file is written atomically (temp + rename).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import pathlib
import shlex
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "tables" / "models"

# Fallbacks if the preset JSONs (tables/models/<name>.json) are absent.
_FALLBACK_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                       tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                       tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=131072,
                       use_sliding_window=False, tie_word_embeddings=False),
}

PHASES = ("forward", "backward", "optimizer")
CATEGORIES = ("parameter", "buffer", "gradient", "optimizer", "activation", "temp", "input", "total")

SETTING_COLUMNS = [
    "model", "method", "lora_rank", "lora_alpha", "lora_target", "lora_fp32_adapters", "dtype",
    "optimizer", "optimizer_impl", "attention", "checkpointing", "micro_batch", "seq_len", "chunked_ce",
    "autocast",
]
COLUMNS = (
    SETTING_COLUMNS
    + ["trainable_params", "total_params", "peak_bytes", "peak_gib", "peak_phase"]
    + [f"peak_{c}_bytes" for c in CATEGORIES if c != "total"]
    + [f"{p}_{c}_bytes" for p in PHASES for c in CATEGORIES]
    + ["seconds", "step_seconds", "step_cpu_seconds",
       "device", "torch", "transformers", "peft", "date", "command", "config_source"]
)


def load_model_config(name: str) -> tuple[dict[str, Any], str]:
    """Preset JSON from tables/models (``_tuneplan`` stripped) or the built-in fallback."""
    p = MODELS_DIR / f"{name}.json"
    if p.exists():
        d = json.loads(p.read_text())
        return {k: v for k, v in d.items() if k != "_tuneplan"}, str(p.relative_to(ROOT))
    return dict(_FALLBACK_CONFIGS[name]), "builtin"


def reference_cases() -> list[dict[str, Any]]:
    """The reference matrix (22 cases)."""
    cases: list[dict[str, Any]] = []
    for model in ("llama-2-7b", "llama-3-8b"):
        for method in ("full", "lora"):
            for attention in ("sdpa", "eager"):
                for ckpt in ("none", "full"):
                    cases.append(dict(model=model, method=method, attention=attention,
                                      checkpointing=ckpt, seq_len=2048, micro_batch=1))
    for method in ("full", "lora"):
        cases.append(dict(model="qwen2.5-7b", method=method, attention="sdpa", checkpointing="none",
                          seq_len=1024, micro_batch=1))
    for s in (512, 4096):
        cases.append(dict(model="llama-2-7b", method="full", attention="sdpa", checkpointing="none",
                          seq_len=s, micro_batch=1))
    # bf16-mixed LoRA (autocast): peft's fp32 adapters save bf16 casts of their inputs
    for model in ("llama-2-7b", "llama-3-8b"):
        cases.append(dict(model=model, method="lora", attention="sdpa", checkpointing="none",
                          seq_len=2048, micro_batch=1, autocast=True))
    return cases


def _norm_value(v: Any) -> str:
    return str(v).strip().lower()


def case_matches(case: dict[str, Any], only: str) -> bool:
    """``--only`` filter. ``key=value[,key=value...]`` compares case settings (missing keys
    take the run defaults, e.g. ``autocast=False``); a bare string matches model names."""
    if not only:
        return True
    if "=" not in only:
        return only in case["model"]
    defaults = dict(autocast=False, micro_batch=1, chunked_ce=False, method="full")
    for part in only.split(","):
        k, _, v = part.partition("=")
        k = k.strip()
        if _norm_value(case.get(k, defaults.get(k, ""))) != _norm_value(v):
            return False
    return True


def row_key(row: dict[str, Any]) -> tuple:
    """Identity of a row (its settings), for ``--merge``; a missing autocast is False."""
    vals = {k: row.get(k, "") for k in SETTING_COLUMNS}
    if vals["autocast"] in ("", None):
        vals["autocast"] = False
    return tuple(_norm_value(vals[k]) for k in SETTING_COLUMNS)


def read_csv(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # files written before the autocast column: those steps ran without it
        if r.get("autocast") in (None, ""):
            r["autocast"] = False
    return rows


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with rows of the same settings replaced by ``new`` (in place), others appended."""
    fresh = {row_key(r): r for r in new}
    out = [fresh.pop(row_key(r), r) for r in old]
    return out + [r for r in new if row_key(r) in fresh]


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    from .fake import fake_step

    case = dict(case)
    model = case.pop("model")
    cfg, source = load_model_config(model)
    kw = dict(dtype="bf16", optimizer="adamw", optimizer_impl="fused", lora_rank=16, lora_alpha=32,
              lora_target="all-linear")
    kw.update(case)
    if kw.get("method") != "lora":
        for k in ("lora_rank", "lora_alpha", "lora_target"):
            kw.pop(k, None)
    r = fake_step(cfg, **kw)
    s = r.settings
    row: dict[str, Any] = {
        "model": model, "method": s["method"], "lora_rank": s["lora_rank"] or "",
        "lora_alpha": s["lora_alpha"] or "", "lora_target": s["lora_target"] or "",
        "lora_fp32_adapters": "" if s["lora_fp32_adapters"] is None else s["lora_fp32_adapters"],
        "dtype": s["dtype"], "optimizer": s["optimizer"], "optimizer_impl": s["optimizer_impl"],
        "attention": s["attention"], "checkpointing": s["checkpointing"], "micro_batch": s["micro_batch"],
        "seq_len": s["seq_len"], "chunked_ce": s["chunked_ce"], "autocast": s["autocast"],
        "trainable_params": r.trainable_params, "total_params": r.total_params,
        "peak_bytes": r.peak_bytes, "peak_gib": round(r.peak_bytes / 2**30, 3), "peak_phase": r.peak_phase,
        "seconds": round(r.seconds, 2), "step_seconds": round(r.step_seconds, 2),
        "step_cpu_seconds": round(r.step_cpu_seconds, 2), "device": "cpu-fake", "config_source": source,
    }
    for c in CATEGORIES:
        if c != "total":
            row[f"peak_{c}_bytes"] = r.by_category_at_peak.get(c, 0)
    for p in PHASES:
        for c in CATEGORIES:
            row[f"{p}_{c}_bytes"] = r.phase_peaks.get(p, {}).get(c, 0)
    return row


def write_csv_atomic(rows: list[dict[str, Any]], out: pathlib.Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in COLUMNS})
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with __import__("contextlib").suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiler.fake_reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "tables" / "measured" / "fake_reference.csv"))
    ap.add_argument("--only", default="",
                    help="run a subset: cases whose model name contains this string, or key=value[,key=value] "
                         "on the case settings (e.g. autocast=True, model=llama-3-8b,method=lora)")
    ap.add_argument("--merge", action="store_true",
                    help="merge into the existing --out file: replace rows with the same settings, keep the rest")
    ap.add_argument("--limit", type=int, default=0, help="run at most N cases (smoke test)")
    args = ap.parse_args(argv)

    cases = [c for c in reference_cases() if case_matches(c, args.only)]
    if not cases:
        ap.error(f"--only {args.only!r} matches no reference case")
    if args.limit:
        cases = cases[: args.limit]
    vers = _versions()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    command = "python -m profiler.fake_reference " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows = []
    t0 = time.perf_counter()
    for i, case in enumerate(cases, 1):
        row = run_case(case)
        row.update(vers, date=stamp, command=command)
        rows.append(row)
        G = 2**30
        print(f"[{i}/{len(cases)}] {row['model']:<11} {row['method']:<4} {row['attention']:<5} "
              f"{'amp ' if row['autocast'] else ''}"
              f"ckpt={row['checkpointing']:<4} s={row['seq_len']:<5} peak {row['peak_bytes'] / G:6.2f} GiB "
              f"(act {row['peak_activation_bytes'] / G:5.2f}, param {row['peak_parameter_bytes'] / G:5.2f}, "
              f"grad {row['peak_gradient_bytes'] / G:5.2f}, opt {row['peak_optimizer_bytes'] / G:5.2f}, "
              f"temp {row['peak_temp_bytes'] / G:5.2f}) in {row['peak_phase']}; "
              f"{row['seconds']:.1f} s total, step {row['step_seconds']:.1f} s",
              file=sys.stderr, flush=True)
    out = pathlib.Path(args.out)
    n_new = len(rows)
    if args.merge:
        rows = merge_rows(read_csv(out), rows)
    write_csv_atomic(rows, out)
    print(f"wrote {len(rows)} rows ({n_new} new) to {args.out} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
