"""Fit tables/mfu.csv and tables/throughput_fit.csv from the published rows in tables/published.csv.

    python tables/fit_mfu.py            # writes both files and prints the per-row report
    python tables/fit_mfu.py --check    # prints the report, writes nothing

What is fitted (nothing else; no per-row or per-model factor exists anywhere):
  1. `compile_speedup` (global): the pair torchtitan-2 / torchtitan-1 (same run with and
     without torch.compile).
  2. `comm_efficiency` (global): the achieved fraction of the link bandwidth of ZeRO
     collectives, chosen on a grid to minimise the squared log error of all `mfu` rows
     (only the comm-bound DeepSpeed rows of arXiv 2311.03687 actually constrain it).
  3. `compute_mfu` per (GPU class, method, sequence bucket): for each `mfu` row, the MFU at
     which planner.throughput reproduces the measured tokens/s (bisection, with the fitted
     comm efficiency); a cell is the geometric mean of its rows.
  4. `lora_over_full` (global): LoRA/full MFU ratio where a class has both, used to fill a
     method a class has no row for.
Cells without a row are filled, in this order, and each says how in its `how` column:
interpolation in log2(seq) between fitted buckets of the same class and method (constant
beyond the ends); the other method of the class × lora_over_full; a donor class.

Which published rows are used (column `fit_role` of tables/published.csv, reason in `fit_note`):
  mfu            -> fit MFU cells (and comm efficiency)
  compile        -> fit the compile speed-up
  offload-check  -> predicted and reported, never fitted: they measure PCIe + CPU Adam
  check          -> predicted and reported, never fitted (paged optimizers, unstated config,
                    or physically inconsistent with the stated configuration)
  excluded       -> not predicted (the configuration cannot be what the row says)
  memory-only    -> no throughput

Columns tables/published.csv adds to ../shared/published.csv (whose columns and sources are
kept unchanged): fit_role (above); tokens_per_s_per_gpu (the row's throughput per GPU, taken
from `value` or the notes, divided by the GPU count where the figure is an aggregate);
model_preset / gpu_preset (tuneplan names); assumed (machine-readable `key=value;...`
overrides for what the source does not state, e.g. `seq_len=1024;attention=eager`);
assumptions (why, in words); fit_note (why a row is excluded or only checked).

Outputs: tables/mfu.csv (gpu_class, method, seq_bucket, compute_mfu, low, high, how, rows) and
tables/throughput_fit.csv (name, value, low, high, unit, source). The hand-set priors are in
tables/throughput_priors.csv (same columns), each with its derivation.
"""
from __future__ import annotations

import argparse
import dataclasses
import csv
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.config import TrainConfig  # noqa: E402
from planner.hardware import get_gpu  # noqa: E402
from planner.model import ModelSpec, load_model  # noqa: E402
from planner import throughput as tp  # noqa: E402

TABLES = Path(__file__).resolve().parent
CLASSES = ("hopper", "ampere-dc", "ampere-pro", "ada", "volta")
METHODS = ("full", "lora")
DONOR = {"ampere-pro": "ampere-dc", "ada": "ampere-dc", "volta": "ampere-dc", "hopper": "ampere-dc",
         "ampere-dc": "hopper"}
MAX_PLAUSIBLE_MFU = 0.80
"""A row implying more than this compute MFU is inconsistent with its stated configuration."""

MPT_7B = ModelSpec(
    # MPT-7B: d_model 4096, 32 layers, 32 heads, vocab 50432, tied embeddings, no biases and a
    # non-gated 4h GELU MLP (2·h·4h = 8h² params). ModelSpec models gated MLPs (3·h·f), so
    # f = 8h/3 = 10923 gives the same matmul parameter count within 0.003%.
    name="mpt-7b", model_type="llama", vocab_size=50432, hidden_size=4096, intermediate_size=10923,
    num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, tie_embeddings=True, hf_id="mosaicml/mpt-7b")


@dataclass
class Row:
    id: str
    role: str
    measured: float  # tokens/s per GPU
    model: ModelSpec
    cfg: TrainConfig
    gpu: object
    source: str

    @property
    def cell(self) -> tuple[str, str, int]:
        return (tp.gpu_class(self.gpu), tp._table_method(self.cfg.method), tp.seq_bucket(self.cfg.seq_len))


def _parse_assumed(text: str) -> dict[str, str]:
    out = {}
    for part in (text or "").split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def load_rows(path: Path = TABLES / "published.csv", link_reading: str = "as-assumed") -> list[Row]:
    """One Row per published id that has a throughput, with its TrainConfig.

    `link_reading="datasheet"` ignores the `intra_node_link=pcie` assumption (for the report)."""
    seen: dict[str, Row] = {}
    with path.open(newline="") as fh:
        for r in csv.DictReader(fh):
            if r["id"] in seen or r["fit_role"] in ("memory-only", "") or not r["tokens_per_s_per_gpu"]:
                continue
            a = _parse_assumed(r["assumed"])
            method = r["method"]
            sharding = r["sharding"]
            zero = {"none": 0, "zero2": 2, "zero3": 3, "fsdp": 3}[sharding]
            offload = a.get("offload", r["offload"] or "none")
            kw = dict(
                method=method, precision={"bf16": "bf16-mixed"}.get(r["precision"], r["precision"]),
                optimizer=a.get("optimizer", {"adamw-fused": "adamw", "": "adamw"}.get(r["optimizer"], r["optimizer"])),
                zero=zero, offload=offload, micro_batch=int(r["micro_batch"]),
                grad_accum=int(a.get("grad_accum", 1)), seq_len=int(a.get("seq_len", r["seq_len"] or 0)),
                packing=r["packing"] == "yes", checkpointing=a.get("checkpointing", r["checkpointing"] or "none"),
                attention=a.get("attention", r["attention"] or "sdpa"), compile=r["compile"] == "yes",
                gpus=int(r["gpus"]), nodes=1,
            )
            if method in ("lora", "qlora"):
                kw["lora_rank"] = int(a.get("lora_rank", r["lora_rank"] or 8))
                kw["lora_target"] = r["lora_targets"] or "all-linear"
                kw["lora_dropout"] = 0.0
            model = MPT_7B if r["model_preset"] == "mpt-7b" else load_model(r["model_preset"])
            gpu = get_gpu(r["gpu_preset"])
            if a.get("intra_node_link") == "pcie" and link_reading == "as-assumed":
                # peer traffic over PCIe (no NVLink): the host link's per-direction bandwidth
                gpu = dataclasses.replace(gpu, intra_node_link="pcie", intra_node_bandwidth_gbps=gpu.pcie_bandwidth_gbps)
            seen[r["id"]] = Row(r["id"], r["fit_role"], float(r["tokens_per_s_per_gpu"]), model,
                                TrainConfig(**kw), gpu, r["source"])
    return list(seen.values())


def predict(row: Row, mfu: float | None = None, **overrides: float) -> float:
    est = tp.estimate_throughput(row.model, row.cfg, row.gpu, mfu_override=mfu, param_overrides=overrides or None)
    return est.tokens_per_s_per_gpu


def implied_mfu(row: Row, **overrides: float) -> float:
    """The compute MFU at which the model reproduces the row (bisection; MFU in (0, 1.5])."""
    lo, hi = 1e-4, 1.5
    if predict(row, hi, **overrides) < row.measured:
        return hi  # cannot be reached: non-compute time alone exceeds the measured step
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if predict(row, mid, **overrides) < row.measured:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def fit_cell(rows: list[Row], **overrides: float) -> float:
    """argmin over m of sum(log(pred(row, m) / measured)^2): a grid in log m, then golden section."""
    if len(rows) == 1:
        return min(implied_mfu(rows[0], **overrides), 1.0)

    def loss(m: float) -> float:
        return sum(math.log(predict(r, m, **overrides) / r.measured) ** 2 for r in rows)

    grid = [0.03 * (1.08 ** k) for k in range(45)]  # 0.03 .. ~0.95
    best = min(grid, key=loss)
    lo, hi = math.log(best / 1.08), math.log(best * 1.08)
    g = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if loss(math.exp(a)) < loss(math.exp(b)):
            hi = b
        else:
            lo = a
    return math.exp((lo + hi) / 2)


def _gmean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def fill_table(cells: dict[tuple, list[tuple[str, float]]], lora_ratio: float,
               spreads: dict[tuple, float] | None = None) -> dict[tuple, dict]:
    """Complete (class, method, bucket) table from the fitted cells. `spreads`: per fitted
    cell, the largest |log error| of its rows (bounds are at least +-15%)."""
    table: dict[tuple, dict] = {}
    for key, items in cells.items():
        vals = [m for _, m in items]
        m = _gmean(vals)
        spread = max(0.15, (spreads or {}).get(key, 0.0))
        table[key] = dict(mfu=m, spread=spread, how=f"fit: {len(items)} row(s)", rows=";".join(i for i, _ in items))

    def interpolate(cls: str, method: str) -> None:
        have = sorted(b for (c, me, b) in table if c == cls and me == method and table[(c, me, b)]["how"].startswith("fit"))
        if not have:
            return
        for b in tp.SEQ_BUCKETS:
            if (cls, method, b) in table:
                continue
            lower = [x for x in have if x < b]
            upper = [x for x in have if x > b]
            if lower and upper:
                b0, b1 = lower[-1], upper[0]
                t = (math.log2(b) - math.log2(b0)) / (math.log2(b1) - math.log2(b0))
                m = (1 - t) * table[(cls, method, b0)]["mfu"] + t * table[(cls, method, b1)]["mfu"]
                how = f"interpolated between {b0} and {b1}"
                sp = max(table[(cls, method, b0)]["spread"], table[(cls, method, b1)]["spread"]) + 0.05
            else:
                b0 = lower[-1] if lower else upper[0]
                m = table[(cls, method, b0)]["mfu"]
                how = f"held constant from bucket {b0}"
                sp = table[(cls, method, b0)]["spread"] + 0.1
            table[(cls, method, b)] = dict(mfu=m, spread=sp, how=how, rows=table[(cls, method, b0)]["rows"])

    for cls in CLASSES:
        for method in METHODS:
            interpolate(cls, method)
    for cls in CLASSES:  # a method the class has no row for: the other method × ratio
        for method in METHODS:
            other = "full" if method == "lora" else "lora"
            if any((cls, method, b) in table for b in tp.SEQ_BUCKETS):
                continue
            if not all((cls, other, b) in table for b in tp.SEQ_BUCKETS):
                continue
            f = lora_ratio if method == "lora" else 1 / lora_ratio
            for b in tp.SEQ_BUCKETS:
                src = table[(cls, other, b)]
                table[(cls, method, b)] = dict(mfu=src["mfu"] * f, spread=src["spread"] + 0.1,
                                               how=f"{other} x {f:.3f} (lora_over_full)", rows=src["rows"])
    for cls in CLASSES:  # a class with no row at all: its donor's values, wider bounds
        donor = DONOR[cls]
        for method in METHODS:
            for b in tp.SEQ_BUCKETS:
                if (cls, method, b) not in table and (donor, method, b) in table:
                    src = table[(donor, method, b)]
                    table[(cls, method, b)] = dict(mfu=src["mfu"], spread=src["spread"] + 0.25,
                                                   how=f"borrowed from {donor} (no published row for this class)",
                                                   rows=src["rows"])
    return table


def fit(rows: list[Row], verbose: bool = True) -> dict:
    log = print if verbose else (lambda *a, **k: None)
    base = {r.id: r for r in rows}
    # 1. compile speed-up from the torchtitan pair (eager MFU from torchtitan-1 at any comm eff.:
    #    both rows are compute-bound)
    compile_speedup = 1.0
    if "torchtitan-1" in base and "torchtitan-2" in base:
        m1 = implied_mfu(base["torchtitan-1"], compile_speedup=1.0)
        lo, hi = 0.5, 3.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if predict(base["torchtitan-2"], m1, compile_speedup=mid) < base["torchtitan-2"].measured:
                lo = mid
            else:
                hi = mid
        compile_speedup = (lo + hi) / 2
    fit_rows = [r for r in rows if r.role == "mfu"]

    def cells_at(eff: float, exclude: str | None = None) -> dict[tuple, list[tuple[str, float]]]:
        """{cell: [(row id, cell MFU)]}: one MFU per cell, the one that minimises the squared log
        error of the cell's rows (= the implied MFU when the cell has one row)."""
        groups: dict[tuple, list[Row]] = {}
        for r in fit_rows:
            if r.id != exclude:
                groups.setdefault(r.cell, []).append(r)
        out = {}
        for key, rs in groups.items():
            m = fit_cell(rs, comm_efficiency=eff, compile_speedup=compile_speedup)
            out[key] = [(r.id, m) for r in rs]
        return out

    def ratio(table_cells: dict) -> float:
        """lora/full MFU where a class has both (full interpolated to the lora row's bucket)."""
        rs = []
        t0 = fill_table(table_cells, 1.0)
        for (c, me, b), items in table_cells.items():
            if me == "lora" and (c, "full", b) in t0 and not t0[(c, "full", b)]["how"].startswith("lora"):
                rs.append(_gmean([m for _, m in items]) / t0[(c, "full", b)]["mfu"])
        return _gmean(rs) if rs else 0.85

    def loss(eff: float) -> float:
        cells = cells_at(eff)
        tot = 0.0
        for r in fit_rows:
            m = _gmean([v for _, v in cells[r.cell]])
            tot += math.log(predict(r, m, comm_efficiency=eff, compile_speedup=compile_speedup) / r.measured) ** 2
        return tot

    grid = [round(0.02 * 1.15 ** k, 4) for k in range(0, 29)]
    losses = {e: loss(e) for e in grid if e <= 1.0}
    eff = min(losses, key=losses.get)
    log(f"comm_efficiency grid: best {eff:.3f} (loss {losses[eff]:.3f}); "
        + ", ".join(f"{e:.2f}:{l:.2f}" for e, l in sorted(losses.items())[::4]))
    cells = cells_at(eff)
    lora_ratio = ratio(cells)
    spreads: dict[tuple, float] = {}
    for r in fit_rows:
        m = cells[r.cell][0][1]
        err = abs(math.log(predict(r, m, comm_efficiency=eff, compile_speedup=compile_speedup) / r.measured))
        spreads[r.cell] = max(spreads.get(r.cell, 0.0), err)
    table = fill_table(cells, lora_ratio, spreads)

    # report: in-sample and leave-one-out error of every row with a throughput
    report = []
    for r in rows:
        if r.role in ("excluded",):
            continue
        key = r.cell
        m_in = table[key]["mfu"] if key in table else None
        pred_in = predict(r, m_in, comm_efficiency=eff, compile_speedup=compile_speedup) if m_in else float("nan")
        if r.role == "mfu":
            loo_cells = cells_at(eff, exclude=r.id)
            loo_table = fill_table(loo_cells, ratio(loo_cells))
            m_loo = loo_table.get(key, {}).get("mfu")
            pred_loo = predict(r, m_loo, comm_efficiency=eff, compile_speedup=compile_speedup) if m_loo else float("nan")
        else:
            pred_loo = pred_in
        implied = implied_mfu(r, comm_efficiency=eff, compile_speedup=compile_speedup)
        report.append(dict(id=r.id, role=r.role, cell=key, measured=r.measured, predicted=pred_in,
                           predicted_loo=pred_loo, err=pred_in / r.measured - 1, err_loo=pred_loo / r.measured - 1,
                           implied_mfu=implied))
    # implied CPU-Adam rates of the offload rows (for the prior's bounds)
    implied_cpu = {}
    for r in rows:
        if r.role == "offload-check" and r.cell in table:
            m = table[r.cell]["mfu"]
            lo, hi = 1e6, 1e12
            for _ in range(80):
                mid = math.sqrt(lo * hi)
                if predict(r, m, comm_efficiency=eff, compile_speedup=compile_speedup, cpu_adam_rate=mid) < r.measured:
                    lo = mid
                else:
                    hi = mid
            implied_cpu[r.id] = math.sqrt(lo * hi)
    return dict(compile_speedup=compile_speedup, comm_efficiency=eff, lora_ratio=lora_ratio, table=table,
                cells=cells, report=report, implied_cpu=implied_cpu)


def write(result: dict) -> None:
    table = result["table"]
    with (TABLES / "mfu.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["gpu_class", "method", "seq_bucket", "compute_mfu", "low", "high", "how", "rows"])
        for cls in CLASSES:
            for method in METHODS:
                for b in tp.SEQ_BUCKETS:
                    c = table[(cls, method, b)]
                    lo, hi = c["mfu"] * math.exp(-c["spread"]), min(MAX_PLAUSIBLE_MFU, c["mfu"] * math.exp(c["spread"]))
                    w.writerow([cls, method, b, f"{c['mfu']:.4f}", f"{lo:.4f}", f"{max(hi, c['mfu']):.4f}", c["how"], c["rows"]])
    e = result["comm_efficiency"]
    with (TABLES / "throughput_fit.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["name", "value", "low", "high", "unit", "source"])
        w.writerow(["comm_efficiency", f"{e:.4f}", f"{e / 2:.4f}", f"{max(e, 0.8):.4f}", "fraction of link bandwidth",
                    "fitted by tables/fit_mfu.py on the mfu rows (grid, squared log error); only the DeepSpeed ZeRO-2/3 "
                    "rows of arXiv 2311.03687 (8xA800, mb 1, seq 1024) are communication-bound, so they set it. "
                    "High bound: nccl-tests bus bandwidth prior (0.8)."])
        c = result["compile_speedup"]
        w.writerow(["compile_speedup", f"{c:.4f}", "1.0", f"{c * c:.4f}", "x compute speed",
                    "fitted by tables/fit_mfu.py: torchtitan-2 (compile) / torchtitan-1 (eager), Llama-3.1-8B 8xH100"])
        r = result["lora_ratio"]
        w.writerow(["lora_over_full", f"{r:.4f}", f"{r:.4f}", f"{r:.4f}", "ratio of compute MFU",
                    "fitted by tables/fit_mfu.py: geometric mean over classes with both a LoRA and a full row"])


def print_report(result: dict) -> None:
    print(f"compile_speedup {result['compile_speedup']:.3f}  comm_efficiency {result['comm_efficiency']:.3f}  "
          f"lora_over_full {result['lora_ratio']:.3f}")
    print("implied MFU: the compute MFU that alone would reproduce the row (> 1.5: unreachable, the row is faster "
          "than its modelled communication allows)")
    print(f"{'row':22} {'role':14} {'cell':28} {'measured':>9} {'pred':>9} {'err':>7} {'LOO err':>8} {'implied MFU':>11}")
    for x in result["report"]:
        cell = f"{x['cell'][0]}/{x['cell'][1]}/{x['cell'][2]}"
        flag = "  <- implies more than a plausible MFU: inconsistent with its stated setup" \
            if x["implied_mfu"] > MAX_PLAUSIBLE_MFU and x["role"] == "check" else ""
        implied = f"{x['implied_mfu']:11.3f}" if x["implied_mfu"] < 1.5 else f"{'(> 1.5)':>11}"
        print(f"{x['id']:22} {x['role']:14} {cell:28} {x['measured']:9.1f} {x['predicted']:9.1f} {x['err']:+7.1%} "
              f"{x['err_loo']:+8.1%} {implied}{flag}")
    fitted = [x for x in result["report"] if x["role"] == "mfu"]
    print(f"median |error| fitted rows: in-sample {statistics.median(abs(x['err']) for x in fitted):.1%}, "
          f"leave-one-out {statistics.median(abs(x['err_loo']) for x in fitted):.1%}")
    others = [x for x in result["report"] if x["role"] != "mfu" and not math.isnan(x["err"])]
    if others:
        print(f"median |error| check/offload rows: {statistics.median(abs(x['err']) for x in others):.1%}")
    for k, v in result["implied_cpu"].items():
        print(f"{k}: implied CPU-Adam rate {v:.3g} params/s per node")
    print("MFU cells (fitted):")
    for key, items in sorted(result["cells"].items()):
        print(f"  {key}: " + ", ".join(f"{i}={m:.3f}" for i, m in items))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="print the report; write nothing")
    args = ap.parse_args(argv)
    alt = fit(load_rows(link_reading="datasheet"), verbose=False)
    alt_fit = [x for x in alt["report"] if x["role"] == "mfu"]
    print(f"[alternative reading: A800 rows over NVLink] comm_efficiency {alt['comm_efficiency']:.3f}, median |error| "
          f"in-sample {statistics.median(abs(x['err']) for x in alt_fit):.1%}, "
          f"leave-one-out {statistics.median(abs(x['err_loo']) for x in alt_fit):.1%}")
    result = fit(load_rows())
    print_report(result)
    if not args.check:
        write(result)
        tp.mfu_table.cache_clear(); tp.priors.cache_clear()
        print(f"wrote {TABLES / 'mfu.csv'} and {TABLES / 'throughput_fit.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
