"""How a plan is shown: a rich table for people (stdout), one JSON object for machines, a PNG.

Messages (the preset used, notes, what was searched) go to stderr; data goes to stdout.
matplotlib is imported only when a plot is asked for.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from planner.config import Checkpointing, Offload
from planner.model import ModelSpec
from planner.search import Candidate, SearchResult

GiB = 2**30


def gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def fmt_tps(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def fmt_hours(h: float) -> str:
    if not math.isfinite(h):
        return "never"
    if h < 1:
        return f"{h * 60:.0f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.1f} days"


def hardware_json(gpu: Any, gpus: int, nodes: int) -> dict[str, Any]:
    return {"gpu": gpu.name, "vendor_name": gpu.vendor_name, "memory_bytes": gpu.memory_bytes,
            "memory_gib": round(gpu.memory_bytes / GiB, 2), "gpus_per_node": gpus, "nodes": nodes,
            "world_size": gpus * nodes, "bf16_tflops": gpu.bf16_tflops, "fp16_tflops": gpu.fp16_tflops,
            "hbm_bandwidth_gbps": gpu.hbm_bandwidth_gbps, "intra_node_link": gpu.intra_node_link,
            "intra_node_bandwidth_gbps": gpu.intra_node_bandwidth_gbps,
            "inter_node_bandwidth_gbps": gpu.inter_node_bandwidth_gbps, "pcie_bandwidth_gbps": gpu.pcie_bandwidth_gbps,
            "supports_flash_attn": gpu.supports_flash_attn}


def budget(c: Candidate, tokens: float, price_per_gpu_hour: float | None) -> dict[str, Any]:
    """Time (and cost) to train `tokens` real tokens with candidate `c`, expected and bounds."""
    t = c.throughput.time_for_tokens(tokens)
    out: dict[str, Any] = {"tokens": tokens, "hours": t["expected_h"], "hours_low": t["fast_h"],
                           "hours_high": t["slow_h"], "gpu_hours": t["expected_h"] * c.cfg.world_size}
    if price_per_gpu_hour is not None:
        out.update(price_per_gpu_hour=price_per_gpu_hour, cost=out["gpu_hours"] * price_per_gpu_hour,
                   cost_low=t["fast_h"] * c.cfg.world_size * price_per_gpu_hour,
                   cost_high=t["slow_h"] * c.cfg.world_size * price_per_gpu_hour)
    return out


def budget_line(b: dict[str, Any]) -> str:
    s = (f"{b['tokens']:.3g} tokens: {fmt_hours(b['hours'])} (range {fmt_hours(b['hours_low'])} - "
         f"{fmt_hours(b['hours_high'])}), {b['gpu_hours']:,.0f} GPU-hours")
    if "cost" in b:
        s += f", ${b['cost']:,.0f} (${b['cost_low']:,.0f} - ${b['cost_high']:,.0f})"
    return s


def plan_json(model: ModelSpec, how: str, gpu: Any, gpus: int, nodes: int, result: SearchResult | None, *,
              candidates: list[Candidate] | None = None, recommended: int | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The --json object (issue 2's contract + throughput)."""
    cands = candidates if candidates is not None else (result.candidates if result else [])
    rec = recommended if candidates is not None else (result.recommended if result else None)
    d: dict[str, Any] = {
        "model": dict(model.summary(), resolved=how),
        "hardware": hardware_json(gpu, gpus, nodes),
        "candidates": [c.to_json() for c in cands],
        "recommended": rec,
        "search": ({"evaluated": result.evaluated, "fitting": result.fitting, "seconds": round(result.seconds, 4),
                    "memory_model_calls": result.memory_calls,
                    "searched": list(result.searched)} if result else None),
        "nothing_fits": result.nothing_fits.to_json() if result and result.nothing_fits else None,
        "notes": list(result.notes) if result else [],
    }
    if extra:
        d.update(extra)
    return d


def _zero_text(c: Candidate) -> str:
    z = "DDP" if c.cfg.zero == 0 else f"ZeRO-{c.cfg.zero}"
    if c.cfg.offload == Offload.OPTIMIZER:
        z += " +opt→CPU"
    elif c.cfg.offload == Offload.OPTIMIZER_PARAMS:
        z += " +all→CPU"
    return z


def _method_text(c: Candidate) -> str:
    m = c.cfg.method.value
    if c.cfg.is_adapter:
        m += f" r{c.cfg.lora_rank}"
    return m


def _vs_best(c: Candidate, best: Candidate | None) -> str:
    if best is None or c is best or not best.throughput.tokens_per_s:
        return ""
    r = c.throughput.tokens_per_s / best.throughput.tokens_per_s - 1
    txt = "same" if abs(r) < 0.005 else f"{r:+.0%}"
    return txt + (" *" if c.cfg.method != best.cfg.method else "")


def render_table(model: ModelSpec, how: str, gpu: Any, cands: Iterable[Candidate], recommended: int | None, *,
                 title_extra: str = "", console: Any = None) -> None:
    """One row per candidate; the recommended row is marked ★ (and bold). `*` in the last
    column: a different method (a different product)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if console.width < 132 and not console.is_terminal:
        console.width = 132  # piped output: do not squeeze the table into 80 columns
    cands = list(cands)
    first = cands[0].cfg if cands else None
    cap = gpu.memory_bytes
    best = cands[recommended] if recommended is not None and cands else None
    title = (f"{model.name} ({fmt_params(model.total_params)} params) on "
             f"{first.world_size if first else '?'}× {gpu.name}"
             + (f", seq {first.seq_len}" if first else "") + title_extra)
    t = Table(title=title, title_justify="left", header_style="bold", pad_edge=False, expand=False,
              caption=f"GiB/GPU: peak per GPU (nvidia-smi view) of {gib(cap)} GiB (! = fits only at the expected "
                      "value, not at the upper bound; ✗ = does not fit); free: headroom; vs ★: tokens/s against the "
                      "recommended row (* = different method)", caption_justify="left")
    for col, kw in (("#", {"justify": "right"}), ("method", {}), ("sharding", {}), ("mb×ga", {"justify": "right"}),
                    ("ckpt", {}), ("pack", {}), ("attn", {}), ("CE", {}), ("compile", {}),
                    ("GiB/GPU", {"justify": "right"}), ("free", {"justify": "right"}),
                    ("tokens/s", {"justify": "right"}), ("MFU", {"justify": "right"}), ("vs ★", {"justify": "right"})):
        t.add_column(col, no_wrap=True, **kw)
    for i, c in enumerate(cands):
        mark = "★" if i == recommended else ""
        m = c.memory
        ck = {Checkpointing.NONE: "-", Checkpointing.FULL: "full", Checkpointing.SELECTIVE: "sel"}[c.cfg.checkpointing]
        row = [f"{mark}{c.rank if c.rank >= 0 else i}", _method_text(c), _zero_text(c),
               f"{c.cfg.micro_batch}×{c.cfg.grad_accum}", ck, "yes" if c.cfg.packing else "-", c.cfg.attention.value,
               "chunk" if c.cfg.chunked_ce else "-", "yes" if c.cfg.compile else "-",
               f"{gib(m.peak_device)}" + ("" if not c.fits or m.high <= cap else "!") + ("" if c.fits else " ✗"),
               f"{m.headroom_bytes / GiB:+.1f}",
               fmt_tps(c.throughput.tokens_per_s), f"{c.throughput.mfu:.0%}", _vs_best(c, best)]
        t.add_row(*row, style=("bold" if i == recommended else (None if c.fits else "red")))
    console.print(t)


def plot(path: str, model: ModelSpec, gpu: Any, cands: list[Candidate], *, top: int = 8) -> str:
    """Stacked bars of the per-GPU memory breakdown of the top candidates, the capacity line,
    and their tokens/s (second axis). Written atomically; returns the path."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from planner.deepspeed_config import atomic_write

    cands = cands[:top]
    cats = [("parameters", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer"),
            ("master_weights", "fp32 master"), ("activations", "activations"), ("logits", "logits + CE"),
            ("buffers", "ZeRO/FSDP buffers"), ("fragmentation", "fragmentation"), ("overhead", "CUDA ctx/NCCL")]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(cands) + 4.5), 5.5))
    xs = list(range(len(cands)))
    bottom = [0.0] * len(cands)
    colors = plt.get_cmap("tab10").colors
    for k, (attr, label) in enumerate(cats):
        vals = [getattr(c.memory, attr) / GiB for c in cands]
        if not any(vals):
            continue
        ax.bar(xs, vals, bottom=bottom, label=label, color=colors[k % len(colors)], width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.axhline(gpu.memory_bytes / GiB, color="black", linestyle="--", linewidth=1.2,
               label=f"capacity {gpu.memory_bytes / GiB:.1f} GiB")
    # categories do not all peak at the same moment: the peak (max over phases) is marked apart
    ax.scatter(xs, [c.memory.peak_device / GiB for c in cands], marker="_", s=900, linewidths=2.5, color="black",
               zorder=5, label="peak per GPU (max over phases)")
    labels = [f"#{c.rank}\n{c.cfg.method.value}\n{_zero_text(c)}\nmb{c.cfg.micro_batch}×{c.cfg.grad_accum}"
              f"\nckpt {c.cfg.checkpointing.value}" + ("\ncompile" if c.cfg.compile else "") for c in cands]
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel("GiB per GPU (stacked: each category at its own peak)")
    ax.set_ylim(0, max(gpu.memory_bytes / GiB, max(bottom), max(c.memory.peak_device / GiB for c in cands)) * 1.12)
    ax.set_title(f"{model.name} on {cands[0].cfg.world_size if cands else '?'}× {gpu.name}: memory and speed")
    ax2 = ax.twinx()
    ax2.plot(xs, [c.throughput.tokens_per_s for c in cands], "o-", color="crimson", label="tokens/s")
    for x, c in zip(xs, cands):
        ax2.annotate(fmt_tps(c.throughput.tokens_per_s), (x, c.throughput.tokens_per_s), textcoords="offset points",
                     xytext=(0, 6), ha="center", fontsize=7, color="crimson")
    ax2.set_ylabel("tokens/s (all GPUs)", color="crimson")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left", bbox_to_anchor=(1.12, 1.0), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


__all__ = ["render_table", "plan_json", "plot", "budget", "budget_line", "hardware_json", "fmt_tps", "gib"]
