"""Suite `published`: rows of tables/published.csv whose configuration is known well enough.

Memory ("memory"): every line whose metric is a peak memory per GPU is compared when its
*stated* model is a preset, the method is a training method, and micro-batch and sequence
length are stated; the others are listed as excluded with the reason. The configuration is
the CSV's columns + its `assumed` column (assumptions stated next to the row) + the
`published:` section of tables/validate_cases.yaml (which torch counter a source reports,
recipe defaults such as torchtune's chunked CE, hand-written exclusions — each with its
justification).

Throughput: tokens/s per GPU, read exactly as tables/fit_mfu.py reads the rows for its fit
(`fit_mfu.load_rows`). Rows the MFU table (or the compile factor) was fitted on are metric
"throughput" (in-sample: the error shows what one cell per (GPU class, method, sequence
bucket) cannot express); rows never fitted (`fit_role` check / offload-check) are
"throughput_check" (out-of-sample). No constant is fitted here.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from planner.config import TrainConfig
from planner.model import MODELS_DIR, TABLES, aliases
from planner.validate.cases import published_rules
from planner.validate.core import Comparison, GiB, SuiteResult

PUBLISHED_FILE = TABLES / "published.csv"

MEMORY_METRICS = {"peak_memory_per_gpu", "model_states_per_gpu"}
THROUGHPUT_METRICS = {"tokens_per_s", "tokens_per_s_per_gpu"}
UNITS = {"gb": 1e9, "gib": float(GiB), "mb": 1e6, "mib": float(2**20)}

_SHARDING = {"none": 0, "": 0, "ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}
_OFFLOAD = {"none": "none", "": "none", "optimizer": "optimizer", "optimizer+params": "optimizer+params",
            "cpu": "optimizer+params"}
_YES = {"yes", "true", "1", "y"}


def _is_preset(name: str) -> bool:
    key = (name or "").strip().lower()
    return bool(key) and ((MODELS_DIR / f"{key}.json").is_file() or key in aliases())


def _parse_assumed(text: str) -> dict[str, str]:
    """The CSV's `assumed` column ("k=v;k=v"): assumptions stated next to the row (tables/published.csv)."""
    out: dict[str, str] = {}
    for part in (text or "").split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _excluded(rid: str, kind: str, rules: dict[str, Any]) -> str | None:
    excl = rules.get("exclude") or {}
    for key in (f"{rid}/{kind}", rid):
        if key in excl:
            return " ".join(str(excl[key]).split())
    return None


def interpret_memory(row: dict[str, str], rules: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(everything needed to predict a memory row, "") or (None, why it is excluded)."""
    rid, metric = row.get("id", "").strip(), row.get("metric", "").strip()
    why = _excluded(rid, "memory", rules)
    if why:
        return None, why
    over: dict[str, Any] = dict(_parse_assumed(row.get("assumed", "")))
    over.update((rules.get("rows") or {}).get(rid) or {})

    def get(k: str) -> str:
        v = over.get(k, row.get(k))
        return "" if v is None else str(v).strip()

    model = (row.get("model") or "").strip()  # the *stated* model, not an assumed preset
    if not _is_preset(model):
        return None, f"model {model!r} is not stated as a preset (architecture unknown)"
    method = get("method").lower()
    if method not in ("full", "lora", "qlora", "freeze"):
        return None, f"method {method!r} is not a training method the planner models"
    mb, seq = (row.get("micro_batch") or "").strip(), (row.get("seq_len") or "").strip()
    if metric != "model_states_per_gpu" and (not mb or not seq):
        return None, "micro-batch or sequence length not stated (activations depend on both)"
    gpu_type = get("gpu_type")
    gpu_name = (rules.get("gpu_names") or {}).get(gpu_type) or (row.get("gpu_preset") or "").strip() or None
    gpus = int(float(get("gpus") or 1))
    per_node = int(over.get("gpus_per_node", min(gpus, 8)))
    precision = (rules.get("precision_names") or {}).get(get("precision"), get("precision")) or "bf16-mixed"
    optimizer = (rules.get("optimizer_names") or {}).get(get("optimizer"), get("optimizer")) or "adamw"
    cfg_kwargs: dict[str, Any] = dict(
        method=method, precision=precision, optimizer=optimizer, zero=_SHARDING.get(get("sharding").lower(), 0),
        offload=_OFFLOAD.get(get("offload").lower(), get("offload")), micro_batch=int(float(mb or 1)),
        seq_len=int(float(seq or 2048)), packing=get("packing").lower() in _YES,
        checkpointing=get("checkpointing") or "none", attention=get("attention") or "sdpa",
        compile=get("compile").lower() in _YES, gpus=per_node, nodes=max(1, gpus // per_node),
        chunked_ce=get("chunked_ce").lower() in _YES,
    )
    if method in ("lora", "qlora"):
        if get("lora_rank"):
            cfg_kwargs["lora_rank"] = int(float(get("lora_rank")))
        if get("lora_targets"):
            cfg_kwargs["lora_target"] = get("lora_targets")
        cfg_kwargs["lora_dropout"] = float(over.get("lora_dropout", 0.0))
    if get("grad_accum"):
        cfg_kwargs["grad_accum"] = int(float(get("grad_accum")))
    try:
        cfg = TrainConfig(**cfg_kwargs)
    except Exception as exc:  # PlanError: an impossible combination in the row
        return None, f"configuration not expressible: {' '.join(str(exc).split())}"
    unit = get("unit").lower()
    if unit not in UNITS:
        return None, f"unit {unit!r} is not a memory unit"
    value = float(get("value")) * UNITS[unit]
    measured_as = over.get("measured_as") or ("model_states" if metric == "model_states_per_gpu"
                                              else rules.get("default_measured_as", "peak_reserved"))
    return dict(id=rid, metric=metric, model=model, cfg=cfg, gpu=gpu_name, value=value, measured_as=measured_as,
                source=row.get("source", ""),
                why=" ".join(str(over.get("why") or row.get("assumptions") or "").split())), ""


def predict_memory(item: dict[str, Any]) -> float:
    from planner.hardware import get_gpu
    from planner.memory import estimate_memory
    from planner.model import load_model

    spec = load_model(item["model"])
    gpu = get_gpu(item["gpu"]) if item["gpu"] else None
    est = estimate_memory(spec, item["cfg"], gpu)
    how = item["measured_as"]
    if how == "model_states":
        return float(est.parameters + est.gradients + est.optimizer + est.master_weights)
    if how not in ("peak_allocated", "peak_reserved", "peak_device"):
        raise ValueError(f"measured_as {how!r}: use peak_allocated | peak_reserved | peak_device | model_states")
    return float(getattr(est, how))


def throughput_rows() -> list[Any]:
    """tables/fit_mfu.py's reading of the throughput rows (one per id, tokens/s per GPU, its TrainConfig):
    the same interpretation the MFU table was fitted with."""
    from tables import fit_mfu

    return fit_mfu.load_rows(PUBLISHED_FILE)


def predict_throughput(row: Any) -> float:
    from planner.throughput import estimate_throughput

    return float(estimate_throughput(row.model, row.cfg, row.gpu).tokens_per_s_per_gpu)


def read_rows(path: Path | None = None) -> list[dict[str, str]]:
    p = path or PUBLISHED_FILE
    with p.open(newline="", encoding="utf-8") as fh:
        return [r for r in csv.DictReader(fh) if (r.get("id") or "").strip()]


def _err(exc: Exception) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def run_suite(*, case_filter: str | None = None, cases_file: str | None = None, **_: Any) -> SuiteResult:
    res = SuiteResult(name="published")
    t0 = time.perf_counter()
    if not PUBLISHED_FILE.is_file():
        res.messages.append("no rows: tables/published.csv does not exist")
        return res
    rules = published_rules(cases_file)
    keep = (lambda key: case_filter.lower() in key.lower()) if case_filter else (lambda key: True)
    rows = read_rows()

    # -- memory: every line whose metric is a memory number
    for row in rows:
        metric = row.get("metric", "").strip()
        key = f"{row['id'].strip()}/memory"
        if not keep(key):
            continue
        if metric not in MEMORY_METRICS:
            if metric not in THROUGHPUT_METRICS and not (row.get("tokens_per_s_per_gpu") or "").strip():
                res.excluded.append((f"{row['id'].strip()}/{metric}", f"metric {metric!r} is not something the "
                                     "planner predicts"))
            continue
        item, why = interpret_memory(row, rules)
        if item is None:
            res.excluded.append((key, why))
            continue
        try:
            pred = predict_memory(item)
        except Exception as exc:
            res.errors.append(f"{key}: {_err(exc)}")
            continue
        note = f"vs {item['measured_as']}" + (f"; {item['why']}" if item["why"] else "")
        res.rows.append(Comparison(key, "published", "memory", item["value"], pred, "bytes", item["source"], note))

    # -- throughput: tokens/s per GPU, as tables/fit_mfu.py reads the rows
    try:
        trows = throughput_rows()
    except Exception as exc:
        res.errors.append(f"throughput rows (tables/fit_mfu.py load_rows): {_err(exc)}")
        trows = []
    listed = {tr.id for tr in trows}
    for tr in trows:
        key = f"{tr.id}/throughput"
        if not keep(key):
            continue
        why = _excluded(tr.id, "throughput", rules)
        if why:
            res.excluded.append((key, why))
            continue
        try:
            pred = predict_throughput(tr)
        except Exception as exc:
            res.errors.append(f"{key}: {_err(exc)}")
            continue
        fitted = tr.role in ("mfu", "compile")
        metric = "throughput" if fitted else "throughput_check"
        note = (f"fit_role {tr.role}: " + ("the MFU table / compile factor was fitted on this row (in-sample)"
                                           if fitted else "never fitted (out-of-sample check)"))
        res.rows.append(Comparison(key, "published", metric, tr.measured, pred, "tokens/s/GPU", tr.source, note))
    # ids with a speed that tables/fit_mfu.py does not read (fit_role "excluded"): say why
    seen: set[str] = set()
    for row in rows:
        rid = row["id"].strip()
        key = f"{rid}/throughput"
        if rid in listed or rid in seen or not keep(key) or (row.get("fit_role") or "").strip() != "excluded":
            continue
        seen.add(rid)
        why = _excluded(rid, "throughput", rules) or \
            f"tables/published.csv fit_role excluded: {' '.join((row.get('fit_note') or '').split())}"
        res.excluded.append((key, why))
    res.seconds = time.perf_counter() - t0
    return res
