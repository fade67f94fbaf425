"""`tuneplan plan`: what fits, how fast, and which configuration to run.

Registered by planner/cli.py as `app.command("plan")(plan)`. Every dimension the user fixes is
fixed; the others are searched (planner.search). Data on stdout (a rich table, or one JSON
object with --json), messages on stderr. Bad input raises PlanError (one line, exit 2).
"""
from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer

from planner.cli_options import (AttentionOpt, Checkpointing, ChunkedCE, Compile, DoubleQuant, Gpu, Gpus, GradAccum,
                                 Json, LoraAlpha, LoraDropout, LoraRank, LoraTarget, Method, MicroBatch, Model, Nodes,
                                 Offload, Optim, Packing, Precision, SeqLen, Zero, fixed_dimensions)
from planner.errors import PlanError

GlobalBatch = Annotated[Optional[int], typer.Option("--global-batch", help="Sequences per optimizer step over all GPUs; grad-accum is derived from it.")]
Tokens = Annotated[Optional[str], typer.Option("--tokens", help="Tokens to train (e.g. 2e9, 500M, 1.5B): prints time and cost.")]
DatasetTokens = Annotated[Optional[str], typer.Option("--dataset-tokens", help="Tokens in the dataset (× --epochs = tokens to train).")]
Epochs = Annotated[float, typer.Option("--epochs", help="Epochs over --dataset-tokens.")]
Price = Annotated[Optional[float], typer.Option("--price-per-gpu-hour", help="Price of one GPU-hour (any currency) for the cost estimate.")]
Lengths = Annotated[Optional[str], typer.Option("--lengths", help="File of example lengths in tokens (one per line, or a JSON list) for padding waste.")]
MeanLen = Annotated[Optional[int], typer.Option("--mean-len", help="Mean example length in tokens (with --max-len, instead of --lengths).")]
MaxLen = Annotated[Optional[int], typer.Option("--max-len", help="Longest example in tokens (with --mean-len).")]
MaxOpt = Annotated[Optional[str], typer.Option("--max", help="Solve for the largest value that fits: micro-batch | seq-len.")]
MinGpusOpt = Annotated[bool, typer.Option("--min-gpus", help="Fewest GPUs of --gpu that fit the configuration.")]
Out = Annotated[Optional[str], typer.Option("--out", help="Write DIR/plan.yaml (+ DIR/ds_config.json with ZeRO) for the recommended configuration.")]
Plot = Annotated[Optional[str], typer.Option("--plot", help="Write a PNG: memory breakdown of the top candidates vs capacity, and tokens/s.")]
Top = Annotated[int, typer.Option("--top", help="How many candidates to show.")]

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str | None, what: str) -> float | None:
    """'2e9', '500M', '1.5B', '2,000,000' -> float; PlanError otherwise."""
    if text is None:
        return None
    t = str(text).strip().replace(",", "").replace("_", "").lower()
    mult = 1.0
    if t and t[-1] in _SUFFIX:
        mult, t = _SUFFIX[t[-1]], t[:-1]
    try:
        v = float(t) * mult
    except ValueError:
        raise PlanError(f"{what} {text!r} is not a number (examples: 2e9, 500M, 1.5B)") from None
    if not v > 0 or v != v or v == float("inf"):
        raise PlanError(f"{what} must be a positive number, got {text!r}")
    return v


def normalize_fixed(fixed: dict[str, Any]) -> dict[str, Any]:
    """Validate each user-fixed dimension on its own and coerce it to TrainConfig's types."""
    from planner.config import TrainConfig
    out: dict[str, Any] = {}
    for k, v in fixed.items():
        probe: dict[str, Any] = {k: v}
        if k == "offload":
            probe["zero"] = 3  # offload alone is legal: the search picks a ZeRO stage for it
        if k == "precision" and str(v).lower() in ("fp32", "32", "float32", "32-true", "fp32-true"):
            probe["method"] = "full"
        cfg = TrainConfig(**probe)
        out[k] = getattr(cfg, k)
    # combinations of fixed dimensions that cannot exist (e.g. --method qlora --precision fp32)
    checks = {k: out[k] for k in out}
    if "offload" in checks and "zero" not in checks:
        checks["zero"] = 3
    TrainConfig(**checks)
    return out


def _err_console():
    from rich.console import Console
    return Console(stderr=True, highlight=False, soft_wrap=True)


def plan(
    model: Model,
    gpus: Gpus = None,
    nodes: Nodes = None,
    gpu: Gpu = None,
    method: Method = None,
    lora_rank: LoraRank = None,
    lora_alpha: LoraAlpha = None,
    lora_dropout: LoraDropout = None,
    lora_target: LoraTarget = None,
    double_quant: DoubleQuant = None,
    precision: Precision = None,
    optimizer: Optim = None,
    zero: Zero = None,
    offload: Offload = None,
    micro_batch: MicroBatch = None,
    grad_accum: GradAccum = None,
    seq_len: SeqLen = None,
    packing: Packing = None,
    checkpointing: Checkpointing = None,
    attention: AttentionOpt = None,
    chunked_ce: ChunkedCE = None,
    compile: Compile = None,
    global_batch: GlobalBatch = None,
    tokens: Tokens = None,
    dataset_tokens: DatasetTokens = None,
    epochs: Epochs = 1.0,
    price_per_gpu_hour: Price = None,
    lengths: Lengths = None,
    mean_len: MeanLen = None,
    max_len: MaxLen = None,
    max: MaxOpt = None,
    min_gpus: MinGpusOpt = False,
    out: Out = None,
    plot: Plot = None,
    top: Top = 10,
    json_out: Json = False,
) -> int:
    """Plan memory and speed per GPU; rank the configurations that fit."""
    options = dict(locals())  # the config flags; fixed_dimensions reads only those
    from planner import search as S
    from planner.hardware import get_gpu
    from planner.model import resolve_model
    from planner.report import budget, budget_line, plan_json, render_table
    from planner.throughput import LengthStats, read_lengths

    fixed = normalize_fixed(fixed_dimensions(options))
    if top < 1:
        raise PlanError(f"--top must be >= 1, got {top}")
    if max is not None and str(max).strip().lower().replace("_", "-") not in ("micro-batch", "seq-len"):
        raise PlanError(f"--max must be micro-batch or seq-len, got {max!r}")
    if max is not None and min_gpus:
        raise PlanError("--max and --min-gpus solve different questions; give one")
    if epochs <= 0:
        raise PlanError(f"--epochs must be positive, got {epochs}")
    if price_per_gpu_hour is not None and price_per_gpu_hour < 0:
        raise PlanError(f"--price-per-gpu-hour must be >= 0, got {price_per_gpu_hour}")
    train_tokens = parse_count(tokens, "--tokens")
    ds_tokens = parse_count(dataset_tokens, "--dataset-tokens")
    if train_tokens is not None and ds_tokens is not None:
        raise PlanError("give --tokens or --dataset-tokens (× --epochs), not both")
    if ds_tokens is not None:
        train_tokens = ds_tokens * epochs
    if lengths and (mean_len or max_len):
        raise PlanError("give --lengths FILE or --mean-len/--max-len, not both")
    length_stats = None
    if lengths:
        length_stats = read_lengths(lengths)
    elif mean_len is not None or max_len is not None:
        if mean_len is None or max_len is None:
            raise PlanError("--mean-len and --max-len go together")
        length_stats = LengthStats.of({"mean": mean_len, "max": max_len})

    resolved = resolve_model(model)
    spec = resolved.spec
    g = get_gpu(gpu)
    err = _err_console()
    messages: list[str] = [f"model: {resolved.how} — {spec.total_params / 1e9:.2f}B params"]
    say = messages.append  # printed on stderr once the plan stands (an error stays one line)
    n_gpus, n_nodes = fixed.get("gpus", 1), fixed.get("nodes", 1)
    if global_batch is not None and global_batch < n_gpus * n_nodes and not min_gpus:
        raise PlanError(f"--global-batch {global_batch} is smaller than the {n_gpus * n_nodes} GPUs (one sequence each)")
    extra: dict[str, Any] = {}

    if max is not None or min_gpus:
        result, cands, rec = _solve(spec, fixed, g, max, min_gpus, global_batch, length_stats, say, extra)
        if min_gpus and cands:
            n_gpus, n_nodes = cands[0].cfg.gpus, cands[0].cfg.nodes
    else:
        result = S.search(spec, fixed, g, global_batch=global_batch, lengths=length_stats, top=top)
        cands, rec = result.candidates, result.recommended

    best = cands[rec] if rec is not None and cands else None
    if train_tokens is not None and best is not None:
        extra["budget"] = budget(best, train_tokens, price_per_gpu_hour)

    written: dict[str, Any] = {}
    if out:
        if best is None:
            say("--out: nothing fits, so no plan.yaml was written")
        else:
            from planner.deepspeed_config import write_plan
            t = best.throughput
            comment = (f"tuneplan plan for {spec.name} on {best.cfg.world_size}x {g.name}\n"
                       f"predicted: {best.memory.peak_device / 2**30:.1f} GiB per GPU of {g.memory_bytes / 2**30:.1f}, "
                       f"{t.tokens_per_s:,.0f} tokens/s ({t.low:,.0f}-{t.high:,.0f}), MFU {t.mfu:.0%}")
            written = {k: str(v) for k, v in write_plan(out, spec, best.cfg, comment=comment).items()}
            extra["written"] = written
    if plot:
        if not cands:
            say("--plot: no candidates to draw")
        else:
            from planner.report import plot as draw
            draw(plot, spec, g, cands)
            extra["plot"] = plot

    emit = (lambda msg: err.print(msg, markup=False)) if not json_out else (lambda msg: print(msg, file=sys.stderr))
    for msg in messages:
        emit(msg)
    say = emit
    if json_out:
        d = plan_json(spec, resolved.how, g, n_gpus, n_nodes, result, candidates=cands, recommended=rec, extra=extra)
        sys.stdout.write(json.dumps(d, default=_json_default) + "\n")
    else:
        from rich.console import Console
        render_table(spec, resolved.how, g, cands, rec, console=Console(soft_wrap=False))
        if best is not None:
            t = best.throughput
            print(f"recommended: #{rec} {best.cfg.method.value}, {best.cfg.micro_batch}×{best.cfg.grad_accum} "
                  f"per GPU — {t.tokens_per_s:,.0f} tokens/s (range {t.low:,.0f}-{t.high:,.0f}), "
                  f"{best.memory.peak_device / 2**30:.1f} GiB per GPU")
        if "budget" in extra:
            print("time to train " + budget_line(extra["budget"]))
        if result is not None and result.nothing_fits is not None:
            nf = result.nothing_fits
            print(nf.reason)
            for i, f in enumerate(nf.fixes, 1):
                print(f"  fix {i}: {f.describe()}")
            if not nf.fixes:
                print("  no single change found that fits; try a larger GPU type or fewer sequence tokens")
    if result is not None:
        for n in result.notes:
            say(f"note: {n}")
        if result.searched:
            say(f"searched: {', '.join(result.searched)} — {result.evaluated} configurations evaluated, "
                f"{result.fitting} fit, {result.seconds:.2f} s")
    if best is not None:
        for n in best.memory.notes[:4]:
            say(f"memory: {n}")
        for n in best.throughput.notes:
            say(f"speed: {n}")
        say(f"speed bounds: {best.throughput.spread_reason}")
    for k, v in written.items():
        say(f"wrote {v}")
    if out and best is None:
        return 1
    return 0


def _solve(spec, fixed, g, max_kind, min_gpus_flag, global_batch, length_stats, say, extra):
    """--max micro-batch|seq-len and --min-gpus: (SearchResult or None, candidates, recommended)."""
    from planner import search as S
    from planner.config import TrainConfig
    from planner.throughput import estimate_throughput

    memory_fn = S._default_memory_fn()

    def cand(cfg: TrainConfig) -> S.Candidate:
        mem = memory_fn(spec, cfg, g)
        return S.Candidate(cfg, mem, estimate_throughput(spec, cfg, g, mem, lengths=length_stats), 0,
                           "solver result")

    if min_gpus_flag:
        r = S.min_gpus(spec, fixed, g, global_batch=global_batch, lengths=length_stats)
        if r is None:
            say(f"--min-gpus: nothing fits on up to 64 nodes of 8× {g.name}")
            extra["solver"] = {"min_gpus": None}
            return None, [], None
        c = S.Candidate(r.candidate.cfg, r.candidate.memory, r.candidate.throughput, 0,
                        f"fewest GPUs: {r.gpus} per node × {r.nodes} node(s)")
        extra["solver"] = {"min_gpus": r.world_size, "gpus_per_node": r.gpus, "nodes": r.nodes}
        say(f"fewest {g.name} that fit: {r.world_size} ({r.gpus} per node × {r.nodes} node(s))")
        return None, [c], 0

    base = dict(fixed)
    base.setdefault("precision", S.default_precision(g))
    defaults_used = [k for k in ("method", "zero", "checkpointing", "attention", "chunked_ce", "micro_batch", "seq_len")
                     if k not in fixed]
    kind = str(max_kind).strip().lower().replace("_", "-")
    if kind == "micro-batch":
        base.pop("micro_batch", None)
        cfg = TrainConfig(**base)
        m = S.max_micro_batch(spec, cfg, g, memory_fn=memory_fn)
        extra["solver"] = {"max_micro_batch": m}
        if m == 0:
            say(f"--max micro-batch: not even micro-batch 1 fits ({', '.join(defaults_used)} at defaults)")
            return None, [S.Candidate(cfg, memory_fn(spec, cfg, g), estimate_throughput(spec, cfg, g), 0,
                                      "micro-batch 1 does not fit")], None
        say(f"largest micro-batch that fits: {m} (micro-batch {m + 1} does not)"
            + (f"; not searched, at defaults: {', '.join(d for d in defaults_used if d != 'micro_batch')}"
               if defaults_used else ""))
        return None, [cand(cfg.replace(micro_batch=m))], 0
    base.pop("seq_len", None)
    cfg = TrainConfig(**base)
    s = S.max_seq_len(spec, cfg, g, memory_fn=memory_fn)
    extra["solver"] = {"max_seq_len": s}
    if s == 0:
        say("--max seq-len: nothing fits even at 1 token per sequence")
        return None, [], None
    say(f"longest sequence that fits: {s} tokens ({s + 1} does not)"
        + (f"; at defaults: {', '.join(d for d in defaults_used if d != 'seq_len')}" if defaults_used else ""))
    if spec.max_position_embeddings and s > spec.max_position_embeddings:
        say(f"note: {s} exceeds the model's max_position_embeddings ({spec.max_position_embeddings})")
    return None, [cand(cfg.replace(seq_len=s))], 0


def _json_default(o: Any) -> Any:
    if hasattr(o, "value"):
        return o.value
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


__all__ = ["plan", "parse_count", "normalize_fixed"]
