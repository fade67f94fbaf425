"""The recommender: enumerate every dimension the user did not fix, keep what fits, rank by
predicted tokens/s; solvers for the largest micro-batch / sequence length and the fewest GPUs;
an explanation and ranked fixes when nothing fits.

Pure arithmetic (memory model + throughput model); no torch.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from planner.config import Attention, Checkpointing, Method, Offload, Precision, TrainConfig
from planner.errors import PlanError
from planner.model import ModelSpec
from planner.config import validate as _validate
from planner.throughput import LengthStats, ThroughputEstimate, estimate_throughput, prepare

GiB = 2**30
MAX_MICRO_BATCH = 1024
"""Upper end of the micro-batch search (sequences per GPU per forward)."""
MAX_SEQ_LEN = 1 << 21
METHOD_NOTE = ("method was searched: full fine-tuning, freeze (last layers only), LoRA and QLoRA are different "
               "products (LoRA/QLoRA train <1% of the weights and can reach a different quality); fix --method to "
               "compare like with like")
PRODUCT_ORDER = ("full", "lora", "qlora", "freeze")
"""With --method not given, the recommendation is the fastest configuration of the first method in
this order that fits: full fine-tuning is the reference product, LoRA next, QLoRA (quantised base)
after it, freeze (only the last layers train) last. The others' best rows are shown beside it."""
COMPILE_NOTE = "torch.compile was searched: its 1-5 min cold compile per run is not in tokens/s"

MemoryFn = Callable[[ModelSpec, TrainConfig, Any], Any]

# the dimensions search() may enumerate, in the order a person reads them
SEARCHABLE = ("method", "zero", "offload", "micro_batch", "grad_accum", "checkpointing", "packing",
              "chunked_ce", "attention", "compile")
"""Precision (bf16-mixed, fp16-mixed without bf16), optimizer, LoRA rank/targets and seq_len are
never searched: they change what is trained or how it converges, not only speed and memory."""


def _default_memory_fn() -> MemoryFn:
    from planner.memory import estimate_memory
    return estimate_memory


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Candidate:
    cfg: TrainConfig
    memory: Any
    """planner.memory.MemoryEstimate"""
    throughput: ThroughputEstimate
    rank: int = -1
    trades: str = ""

    @property
    def fits(self) -> bool:
        return bool(self.memory.fits)

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "config": self.cfg.to_dict(), "memory": self.memory.to_json(),
                "throughput": self.throughput.to_json(), "fits": self.fits, "trades": self.trades}


@dataclass(frozen=True)
class Fix:
    """One way out when nothing fits."""

    change: str
    """What to change, e.g. "--method qlora"."""
    candidate: Candidate
    slowdown: float | None
    """Requested config's predicted tokens/s ÷ this fix's (> 1 = slower); None when unknown."""

    def describe(self) -> str:
        c = self.candidate
        s = (f"{self.change} fits at {c.memory.peak_device / GiB:.1f} GiB per GPU "
             f"({_fmt_tps(c.throughput.tokens_per_s)} tokens/s")
        if self.slowdown is not None and self.slowdown > 1.05:
            s += f", {self.slowdown:.1f}× slower"
        elif self.slowdown is not None and self.slowdown < 0.95:
            s += f", {1 / self.slowdown:.1f}× faster"
        return s + ")"

    def to_json(self) -> dict[str, Any]:
        return {"change": self.change, "text": self.describe(), "config": self.candidate.cfg.to_dict(),
                "peak_device_bytes": self.candidate.memory.peak_device,
                "tokens_per_s": self.candidate.throughput.tokens_per_s, "slowdown": self.slowdown}


@dataclass(frozen=True)
class NothingFits:
    reason: str
    dominant: str
    """The memory category that dominates the smallest configuration tried."""
    needed_bytes: int
    capacity_bytes: int
    fixes: tuple[Fix, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "dominant": self.dominant, "needed_bytes": self.needed_bytes,
                "capacity_bytes": self.capacity_bytes, "fixes": [f.to_json() for f in self.fixes]}


@dataclass
class SearchResult:
    candidates: list[Candidate]
    """Shown candidates, ranked: fitting ones by tokens/s, then (if none fits) the closest misses."""
    evaluated: int
    """Candidate configurations ranked (memory known + throughput predicted)."""
    fitting: int
    seconds: float
    recommended: int | None
    nothing_fits: NothingFits | None = None
    searched: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    best_by_method: dict[str, Candidate] = field(default_factory=dict)
    memory_calls: int = 0
    """Exact memory-model evaluations (the micro-batch solver's probes + shown candidates)."""

    @property
    def best(self) -> Candidate | None:
        return self.candidates[self.recommended] if self.recommended is not None else None


def _fmt_tps(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


# ----------------------------------------------------------------------------- enumeration

def default_precision(gpu: Any) -> Precision:
    """bf16-mixed where the GPU has bf16 tensor cores, else fp16-mixed (V100)."""
    return Precision.BF16_MIXED if getattr(gpu, "bf16_tflops", 0) else Precision.FP16_MIXED


def _zero_offload_pairs(world: int, zero: int | None, offload: Offload | None) -> list[tuple[int, Offload]]:
    if world == 1:
        # one GPU: ZeRO only helps together with CPU offload (nothing to shard with)
        pairs = [(0, Offload.NONE), (2, Offload.OPTIMIZER), (3, Offload.OPTIMIZER), (3, Offload.OPTIMIZER_PARAMS)]
    else:
        pairs = [(0, Offload.NONE), (1, Offload.NONE), (1, Offload.OPTIMIZER), (2, Offload.NONE), (2, Offload.OPTIMIZER),
                 (3, Offload.NONE), (3, Offload.OPTIMIZER), (3, Offload.OPTIMIZER_PARAMS)]
    if zero is not None:
        pairs = [(z, o) for z, o in pairs if z == zero]
        if not pairs:  # e.g. --zero 1 on one GPU: evaluate exactly what was asked
            pairs = [(zero, Offload.NONE)] + ([(zero, Offload.OPTIMIZER)] if zero else []) + \
                    ([(zero, Offload.OPTIMIZER_PARAMS)] if zero == 3 else [])
    if offload is not None:
        pairs = [(z, o) for z, o in pairs if o == offload]
        if not pairs and zero is not None:
            pairs = [(zero, offload)]
    return pairs


_ENUMS = {"method": Method, "precision": Precision, "offload": Offload, "checkpointing": Checkpointing,
          "attention": Attention}


def coerce_fixed(fixed: Mapping[str, Any]) -> dict[str, Any]:
    """Drop None values; turn strings into TrainConfig's enums ("lora" -> Method.LORA)."""
    from planner.config import Optimizer
    out = {}
    for k, v in dict(fixed).items():
        if v is None:
            continue
        enum = _ENUMS.get(k) or (Optimizer if k == "optimizer" else None)
        out[k] = enum.parse(v, k) if enum is not None else v
    return out


def _values(fixed: Mapping[str, Any], name: str, options: Iterable[Any]) -> list[Any]:
    return [fixed[name]] if name in fixed else list(options)


def _base_config(fixed: Mapping[str, Any], gpu: Any) -> TrainConfig:
    kw = {k: v for k, v in fixed.items() if k not in ("method", "zero", "offload", "micro_batch", "grad_accum",
                                                     "checkpointing", "packing", "chunked_ce", "attention", "compile")}
    kw.setdefault("precision", default_precision(gpu))
    return TrainConfig(**kw)


def structures(fixed: Mapping[str, Any], gpu: Any, *, world: int, lengths: Any = None) -> tuple[list[dict], list[str]]:
    """Every combination of the non-micro-batch dimensions; and the names of what is searched."""
    searched: list[str] = []

    def vals(name: str, options: list[Any]) -> list[Any]:
        v = _values(fixed, name, options)
        if name not in fixed and len(options) > 1:
            searched.append(name)
        return v

    methods = vals("method", [Method.FULL, Method.FREEZE, Method.LORA, Method.QLORA])
    zero = fixed.get("zero")
    offload = Offload.parse(fixed["offload"], "offload") if "offload" in fixed else None
    pairs = _zero_offload_pairs(world, zero, offload)
    if zero is None or offload is None:
        if len(pairs) > 1:
            searched.append("zero/offload")
    ckpts = vals("checkpointing", [Checkpointing.NONE, Checkpointing.SELECTIVE, Checkpointing.FULL])
    attn_opts = ([Attention.FLASH] if getattr(gpu, "supports_flash_attn", False) else []) + [Attention.SDPA, Attention.EAGER]
    attns = vals("attention", attn_opts)
    chunked = vals("chunked_ce", [False, True])
    packs = vals("packing", [False, True] if lengths is not None else [False])
    # torch.compile is a speed knob searched alongside the others; when the user pinned every
    # other dimension they described one run: compile stays off unless they said --compile
    comps = vals("compile", [False, True] if searched or "micro_batch" not in fixed else [False])
    out = []
    for m, (z, o), ck, at, ce, pk, co in itertools.product(methods, pairs, ckpts, attns, chunked, packs, comps):
        out.append(dict(method=m, zero=z, offload=o, checkpointing=ck, attention=at, chunked_ce=ce, packing=pk,
                        compile=co))
    return out, searched


def _with(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """cfg with micro_batch / grad_accum changed, without re-running TrainConfig validation
    (the search only changes positive integers on an already validated config; ~20x cheaper
    than dataclasses.replace)."""
    new = object.__new__(TrainConfig)
    d = new.__dict__
    d.update(cfg.__dict__)
    d.update(changes)
    return new


def _grad_accum(fixed: Mapping[str, Any], global_batch: int | None, micro_batch: int, world: int) -> int:
    if "grad_accum" in fixed:
        return int(fixed["grad_accum"])
    if global_batch:
        return max(1, math.ceil(global_batch / (micro_batch * world)))
    return 1


class _Evaluator:
    """Memory + throughput with a per-search cache (the micro-batch solver re-visits configs).

    Cache keys are (structure id, micro-batch) where the caller has a structure, else the config."""

    def __init__(self, model: ModelSpec, gpu: Any, memory_fn: MemoryFn | None, lengths: Any):
        self.model, self.gpu = model, gpu
        self.memory_fn = memory_fn or _default_memory_fn()
        self.lengths = LengthStats.of(lengths)
        self.mem_cache: dict[Any, Any] = {}
        self.evaluated = 0

    def memory(self, cfg: TrainConfig, key: Any = None) -> Any:
        k = cfg if key is None else key
        m = self.mem_cache.get(k)
        if m is None:
            m = self.mem_cache[k] = self.memory_fn(self.model, cfg, self.gpu)
            self.evaluated += 1
        return m

    def fits(self, cfg: TrainConfig, key: Any = None) -> bool:
        return bool(self.memory(cfg, key).fits)

    def candidate(self, cfg: TrainConfig, bounds: bool = False, mem: Any = None, prepared: Any = None) -> Candidate:
        mem = mem if mem is not None else self.memory(cfg)
        thr = estimate_throughput(self.model, cfg, self.gpu, mem, lengths=self.lengths, bounds=bounds,
                                  prepared=prepared)
        return Candidate(cfg, mem, thr)

    def known(self, key: Any) -> Any:
        return self.mem_cache.get(key)

    def ranked(self, cfg: TrainConfig, mem: Any, prepared: Any) -> "_Ranked":
        """A ranking record: tokens/s from the structure's step model (full rows), or the full
        estimate when padding depends on the micro-batch."""
        if prepared.step_model is not None:
            return _Ranked(cfg, mem, _Tps(prepared.tokens_per_s(cfg.micro_batch, cfg.grad_accum)))
        return _Ranked(cfg, mem, self.candidate(cfg, mem=mem, prepared=prepared).throughput)


@dataclass(frozen=True)
class _Tps:
    tokens_per_s: float


@dataclass(frozen=True)
class _Ranked:
    """What ranking needs of a candidate; shown candidates become full `Candidate`s."""

    cfg: TrainConfig
    memory: Any
    throughput: Any

    @property
    def fits(self) -> bool:
        return bool(self.memory.fits)


@dataclass(frozen=True)
class BoundedMemory:
    """Memory of a micro-batch below an evaluated one, for ranking only (shown candidates are
    re-evaluated exactly). Peak memory is monotone and convex in the micro-batch (a max over
    phases of lines in b, plus a proportional fragmentation term), so the evaluated larger
    micro-batch's peak — or the chord from micro-batch 1 to it — lies above it: `peak_device`
    and `high` are upper bounds, headroom a lower bound, and `fits` is exact."""

    peak_device: int
    capacity: int
    high: int = 0
    fits: bool = True
    interpolated: bool = True

    @property
    def headroom_bytes(self) -> int:
        return self.capacity - self.peak_device


def _max_micro_batch(ev: _Evaluator, make: Callable[[int], TrainConfig], upper: int = MAX_MICRO_BATCH,
                     sid: Any = None, hint: int | None = None) -> int:
    """Largest micro-batch b <= upper with make(b) fitting (0 if b = 1 does not fit).

    Exact: the result b fits and b + 1 does not (or b = upper). Memory is monotone and convex
    in b (a max over phases of lines, activations and logits growing with b), which makes
    a root finder cheap: the first guess comes from micro-batch 1's per-sequence bytes, then
    regula falsi between the largest fitting and the smallest failing micro-batch (the chord
    of a convex function crosses the capacity left of the true crossing, so its guess fits),
    or secant extrapolation while no failing micro-batch is known. ~3-4 evaluations.
    `hint`: the answer of a sibling configuration (same but torch.compile or flash/sdpa): when
    hint fits and hint + 1 does not, that is the answer here too (2 evaluations, still exact).
    """
    def mem(b: int) -> Any:
        return ev.memory(make(b), None if sid is None else (sid, b))

    if hint is not None and 1 <= hint <= upper:
        if mem(hint).fits and (hint == upper or not mem(hint + 1).fits):
            return hint

    m1 = mem(1)
    if not m1.fits:
        return 0
    if upper == 1:
        return 1
    cap = m1.capacity
    lo, plo = 1, float(m1.peak_device)
    hi, phi = None, 0.0
    scale = m1.peak_device / m1.peak_allocated if getattr(m1, "peak_allocated", 0) else 1.0
    per_seq = (getattr(m1, "activations", 0) + getattr(m1, "logits", 0)) * scale
    g = upper if per_seq <= 0 else int(1 + (cap - plo) // per_seq)
    prev_lo, prev_plo = None, None
    for _ in range(64):
        top = upper if hi is None else hi - 1
        g = max(lo + 1, min(top, g))
        m = mem(g)
        if m.fits:
            prev_lo, prev_plo = lo, plo
            lo, plo = g, float(m.peak_device)
            if lo >= upper or (hi is not None and hi == lo + 1):
                return lo
        else:
            hi, phi = g, float(m.peak_device)
            if hi == lo + 1:
                return lo
        if hi is not None:  # regula falsi between lo (fits) and hi (does not)
            g = lo + int((cap - plo) * (hi - lo) // max(phi - plo, 1.0))
        else:  # secant extrapolation from the last two fitting points
            slope = (plo - prev_plo) / (lo - prev_lo) if prev_lo is not None and lo > prev_lo else per_seq
            g = upper if slope <= 0 else lo + int((cap - plo) // slope)
        if g <= lo:
            g = lo + 1
    # not converged (non-convex memory): bisect the bracket
    hi = hi if hi is not None else upper + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mem(mid).fits:
            lo = mid
        else:
            hi = mid
    return lo


def _micro_batches(max_mb: int) -> list[int]:
    """Powers of 2 up to the largest that fits, plus that largest."""
    if max_mb <= 0:
        return [1]
    out = [1 << k for k in range(0, max_mb.bit_length()) if (1 << k) <= max_mb]
    if out[-1] != max_mb:
        out.append(max_mb)
    return out


def _simplicity(cfg: TrainConfig) -> int:
    """Tie-break: fewer moving parts first (flags off, default kernel, lower ZeRO stage)."""
    return (cfg.zero + (2 if cfg.offload != Offload.NONE else 0) + (1 if cfg.checkpointing != Checkpointing.NONE else 0)
            + (1 if cfg.chunked_ce else 0) + (1 if cfg.attention != Attention.SDPA else 0) + (1 if cfg.packing else 0)
            + (1 if cfg.compile else 0))


def safe_fit(mem: Any) -> bool:
    """Fits even at the memory model's upper bound (`high`), not only at the expected value."""
    return bool(mem.fits) and getattr(mem, "high", 0) <= mem.capacity


_TIE = math.log(1.005)


def _rank_key(c: Candidate) -> tuple:
    """Fitting first; among them those that fit at the memory upper bound before those that fit
    only at the expected value (a recommendation that may OOM is the worst answer); then
    tokens/s, then fewer moving parts, then headroom."""
    if c.fits:
        tps = c.throughput.tokens_per_s
        # speeds within 0.5% are a tie (the model is not that precise): fewer moving parts win
        return (0, 0 if safe_fit(c.memory) else 1, -int(math.log(max(tps, 1e-9)) / _TIE), _simplicity(c.cfg), -tps,
                -c.memory.headroom_bytes)
    return (1, 0, c.memory.peak_device, -c.throughput.tokens_per_s)


DIM_LABEL = {"method": "method", "zero": "ZeRO", "offload": "offload", "micro_batch": "micro-batch",
             "grad_accum": "grad-accum", "checkpointing": "checkpointing", "attention": "attention",
             "chunked_ce": "chunked CE", "packing": "packing", "compile": "torch.compile", "precision": "precision"}


def _dim_text(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{DIM_LABEL[name]} {'on' if value else 'off'}"
    return f"{DIM_LABEL[name]} {value}"


def trades(c: Candidate, best: Candidate) -> str:
    """What this candidate gives up or gains against the recommended one, in one line."""
    if c is best:
        return "recommended: fastest that fits"
    parts = []
    r = c.throughput.tokens_per_s / best.throughput.tokens_per_s if best.throughput.tokens_per_s else 1.0
    if abs(r - 1) >= 0.005:
        parts.append(f"{(r - 1) * 100:+.0f}% tokens/s")
    else:
        parts.append("same speed")
    dh = (c.memory.headroom_bytes - best.memory.headroom_bytes) / GiB
    if abs(dh) >= 0.1:
        parts.append(f"{dh:+.1f} GiB headroom")
    diffs = [_dim_text(k, getattr(c.cfg, k)) for k in DIM_LABEL if getattr(c.cfg, k) != getattr(best.cfg, k)]
    if c.cfg.method != best.cfg.method:
        parts.append("different product")
    return ", ".join(parts) + (": " + ", ".join(diffs) if diffs else "")


# ----------------------------------------------------------------------------- search

def search(model: ModelSpec, fixed: Mapping[str, Any], gpu: Any, *, global_batch: int | None = None,
           lengths: Any = None, top: int = 10, memory_fn: MemoryFn | None = None,
           explain: bool = True) -> SearchResult:
    """Enumerate the dimensions not in `fixed` (TrainConfig field names -> values), rank what fits.

    `fixed` also carries gpus / nodes / seq_len / lora_* / optimizer / precision / compile
    when the user set them. With every searchable dimension fixed the result holds exactly
    one candidate, fitting or not.
    """
    t0 = time.perf_counter()
    fixed = coerce_fixed(fixed)
    base = _base_config(fixed, gpu)
    world = base.world_size
    if global_batch is not None:
        if global_batch < 1:
            raise PlanError(f"--global-batch must be a positive integer, got {global_batch}")
        if "micro_batch" in fixed and "grad_accum" in fixed and \
                fixed["micro_batch"] * fixed["grad_accum"] * world != global_batch:
            raise PlanError(f"--global-batch {global_batch} != micro-batch × grad-accum × GPUs "
                            f"({fixed['micro_batch']} × {fixed['grad_accum']} × {world})")
        if global_batch < world:
            raise PlanError(f"--global-batch {global_batch} is smaller than the {world} GPUs (one sequence each)")
    ev = _Evaluator(model, gpu, memory_fn, lengths)
    structs, searched = structures(fixed, gpu, world=world, lengths=lengths)
    if "micro_batch" not in fixed:
        searched.append("micro_batch")
    if "grad_accum" not in fixed and global_batch:
        searched.append("grad_accum")
    notes: list[str] = []
    if "method" not in fixed:
        notes.append(METHOD_NOTE)
    if "compile" in searched:
        notes.append(COMPILE_NOTE)
    if "packing" not in fixed and lengths is None:
        notes.append("packing not searched: without --lengths the padding waste it removes is unknown (rows assumed full)")
    mb_upper = MAX_MICRO_BATCH
    if global_batch:
        mb_upper = max(1, min(mb_upper, global_batch // world))

    all_cands: list[_Ranked] = []
    first_error: PlanError | None = None
    solved: dict[tuple, int] = {}  # sibling structures' answers, used as exact-checked hints
    family_ends: dict[tuple, tuple] = {}  # sibling's (memory at micro-batch 1, at its largest)
    for sid, st in enumerate(structs):
        proto = _with(base, **st)
        try:
            _validate(proto)
        except PlanError as exc:
            first_error = first_error or exc
            continue  # an impossible combination (validate() rejects it)
        prep = prepare(model, proto, gpu, full_rows=proto.packing or ev.lengths is None)

        def make(b: int, proto: TrainConfig = proto) -> TrainConfig:
            return _with(proto, micro_batch=b, grad_accum=_grad_accum(fixed, global_batch, b, world))

        if "micro_batch" in fixed:
            b = int(fixed["micro_batch"])
            all_cands.append(ev.ranked(make(b), ev.memory(make(b), (sid, b)), prep))
            continue
        family = (st["method"], st["zero"], st["offload"], st["checkpointing"], st["chunked_ce"], st["packing"],
                  st["attention"] == Attention.EAGER)
        mx = _max_micro_batch(ev, make, mb_upper, sid, hint=solved.get(family))
        solved.setdefault(family, mx)
        mbs = _micro_batches(mx)
        hi_mem = ev.known((sid, mx)) if mx > 1 else None
        # micro-batches below the largest are never evaluated exactly for ranking (shown ones
        # are): memory is monotone in b, so the largest's peak bounds theirs; where the largest
        # fits only at the expected value, a chord from micro-batch 1 (convexity) decides
        # whether the smaller ones fit at the upper bound
        lo_mem = ev.known((sid, 1))
        if lo_mem is None and hi_mem is not None and mx > 2 and not safe_fit(hi_mem):
            # a sibling (compile / flash-sdpa variant) with the same memory at the largest
            # micro-batch lends its micro-batch-1 point (ranking marks only; no fit depends on it)
            sib = family_ends.get(family)
            if sib is not None and sib[1].peak_device == hi_mem.peak_device and sib[1].high == hi_mem.high:
                lo_mem = sib[0]
            else:
                lo_mem = ev.memory(make(1), (sid, 1))
        if hi_mem is not None and lo_mem is not None:
            family_ends.setdefault(family, (lo_mem, hi_mem))
        for b in mbs:
            cfg_b = make(b)
            mem = ev.known((sid, b))
            if mem is None and hi_mem is not None:
                if lo_mem is not None:
                    t = (b - 1) / (mx - 1)
                    peak = int(lo_mem.peak_device + t * (hi_mem.peak_device - lo_mem.peak_device))
                    high = int(lo_mem.high + t * (hi_mem.high - lo_mem.high))
                else:
                    peak, high = int(hi_mem.peak_device), int(hi_mem.high)
                mem = BoundedMemory(peak, hi_mem.capacity, max(high, peak))
            elif mem is None:
                mem = ev.memory(cfg_b, (sid, b))
            all_cands.append(ev.ranked(cfg_b, mem, prep))

    if not all_cands:
        raise first_error or PlanError("no configuration to evaluate")
    all_cands.sort(key=_rank_key)
    fitting = [c for c in all_cands if c.fits]
    best_by_method: dict[str, Candidate] = {}
    for c in fitting:
        best_by_method.setdefault(c.cfg.method.value, c)

    shown: list[Candidate] = []
    if fitting:
        # the product: the user's method, or (not fixed) the most capable method that fits;
        # within it, rank by tokens/s; other methods' best follow, marked "different product"
        product = next(m for m in PRODUCT_ORDER if m in best_by_method)
        seen_shapes: set = set()
        for c in fitting:  # skip rows that only differ in a speed-neutral flag from a shown one
            if c.cfg.method.value != product:
                continue
            shape = (c.cfg.zero, c.cfg.offload, c.cfg.micro_batch, c.cfg.checkpointing, c.cfg.compile,
                     round(c.throughput.tokens_per_s, 3))
            if shape in seen_shapes:
                continue
            seen_shapes.add(shape)
            shown.append(c)
            if len(shown) >= top:
                break
        others = sorted((c for m, c in best_by_method.items() if m != product),
                        key=lambda c: -c.throughput.tokens_per_s)
        shown.extend(others)
        shown = [ev.candidate(c.cfg, bounds=True) for c in shown]  # low/high only for what is shown
        best = shown[0]
        shown = [Candidate(c.cfg, c.memory, c.throughput, i, trades(c, best)) for i, c in enumerate(shown)]
        recommended = 0
        nothing = None
        if "method" not in fixed and len(best_by_method) > 1:
            fastest = fitting[0]
            if fastest.cfg.method.value != product:
                notes.append(f"recommended method {product}: the most capable that fits; {fastest.cfg.method.value} "
                             f"would run {fastest.throughput.tokens_per_s / best.throughput.tokens_per_s:.1f}× faster "
                             f"but trains something else (see its row)")
    else:
        recommended = None
        shown = [Candidate(x.cfg, x.memory, x.throughput, i, "does not fit")
                 for i, x in enumerate(ev.candidate(c.cfg, bounds=True) for c in all_cands[:min(top, 3)])]
        nothing = explain_nothing_fits(model, fixed, gpu, all_cands, global_batch=global_batch, lengths=lengths,
                                       memory_fn=ev.memory_fn) if explain else None
    return SearchResult(candidates=shown, evaluated=len(all_cands), fitting=len(fitting),
                        memory_calls=ev.evaluated,
                        seconds=time.perf_counter() - t0, recommended=recommended, nothing_fits=nothing,
                        searched=tuple(searched), notes=notes,
                        best_by_method={k: next(s for s in shown if s.cfg == v.cfg) for k, v in best_by_method.items()})


# ----------------------------------------------------------------------------- solvers

def max_micro_batch(model: ModelSpec, cfg: TrainConfig, gpu: Any, *, memory_fn: MemoryFn | None = None,
                    upper: int = MAX_MICRO_BATCH) -> int:
    """Largest micro-batch that fits with everything else as in `cfg` (0: not even 1 fits)."""
    ev = _Evaluator(model, gpu, memory_fn, None)
    return _max_micro_batch(ev, lambda b: _with(cfg, micro_batch=b), upper)


def max_seq_len(model: ModelSpec, cfg: TrainConfig, gpu: Any, *, memory_fn: MemoryFn | None = None,
                upper: int = MAX_SEQ_LEN) -> int:
    """Largest sequence length (tokens, exact) that fits with everything else as in `cfg`; 0 if
    none does. Memory grows monotonically with the length, so: double until it does not fit,
    then bisect — the answer s fits and s + 1 does not."""
    ev = _Evaluator(model, gpu, memory_fn, None)

    def fits(s: int) -> bool:
        return ev.fits(_with(cfg, seq_len=s))

    if not fits(1):
        return 0
    lo = 1
    hi = 2
    while hi <= upper and fits(hi):
        lo, hi = hi, hi * 2
    if hi > upper:
        return upper if fits(upper) else _bisect(fits, lo, upper)
    return _bisect(fits, lo, hi)


def _bisect(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """lo fits, hi does not -> the largest fitting value."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class MinGpus:
    gpus: int
    nodes: int
    candidate: Candidate

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes


def _world_sizes(gpus_per_node: int, max_nodes: int) -> Iterable[tuple[int, int]]:
    for g in range(1, gpus_per_node + 1):
        yield g, 1
    for n in range(2, max_nodes + 1):
        yield gpus_per_node, n


def min_gpus(model: ModelSpec, fixed: Mapping[str, Any], gpu: Any, *, gpus_per_node: int = 8, max_nodes: int = 64,
             global_batch: int | None = None, lengths: Any = None,
             memory_fn: MemoryFn | None = None) -> MinGpus | None:
    """Fewest GPUs of this type on which the configuration fits.

    Dimensions not in `fixed` are free except the method (full when not given: a smaller
    method is a different product, not a way to fit). For each world size (1..8 GPUs on one
    node, then whole nodes) the memory-smallest setting of the free dimensions is checked
    first; at the first size where it fits, the fastest fitting configuration is searched.
    """
    fixed = {k: v for k, v in coerce_fixed(fixed).items() if k not in ("gpus", "nodes")}
    fixed.setdefault("method", Method.FULL)
    ev_fn = memory_fn or _default_memory_fn()
    for g, n in _world_sizes(gpus_per_node, max_nodes):
        trial = dict(fixed, gpus=g, nodes=n)
        lean = _leanest(trial, gpu, g * n)
        try:
            cfg = _base_config(trial, gpu).replace(**lean)
        except PlanError:
            continue
        if not ev_fn(model, cfg, gpu).fits:
            continue
        res = search(model, trial, gpu, global_batch=global_batch, lengths=lengths, top=1, memory_fn=ev_fn,
                     explain=False)
        if res.best is not None:
            return MinGpus(g, n, res.best)
    return None


def _leanest(fixed: Mapping[str, Any], gpu: Any, world: int) -> dict[str, Any]:
    """The memory-smallest value of every dimension the user did not fix."""
    zero = fixed.get("zero")
    off = Offload.parse(fixed["offload"], "offload") if "offload" in fixed else None
    pairs = _zero_offload_pairs(world, zero, off)
    order = {Offload.NONE: 0, Offload.OPTIMIZER: 1, Offload.OPTIMIZER_PARAMS: 2}
    z, o = max(pairs, key=lambda p: (order[p[1]], p[0]))
    lean = dict(method=fixed.get("method", Method.FULL), zero=z, offload=o,
                checkpointing=fixed.get("checkpointing", Checkpointing.FULL),
                attention=fixed.get("attention", Attention.FLASH if getattr(gpu, "supports_flash_attn", False)
                                    else Attention.SDPA),
                chunked_ce=fixed.get("chunked_ce", True), packing=fixed.get("packing", False),
                micro_batch=fixed.get("micro_batch", 1), grad_accum=fixed.get("grad_accum", 1))
    return lean


# ----------------------------------------------------------------------------- nothing fits

CATEGORY_TEXT = {
    "model states": "model states (weights, gradients, optimizer, fp32 master)",
    "activations": "activations saved for backward",
    "logits": "logits + cross-entropy transient",
    "buffers": "ZeRO/FSDP buffers",
    "overhead": "CUDA context, workspaces, NCCL",
    "fragmentation": "allocator fragmentation",
}


def dominant_term(mem: Any) -> tuple[str, int]:
    parts = {
        "model states": mem.parameters + mem.gradients + mem.optimizer + mem.master_weights,
        "activations": mem.activations, "logits": mem.logits, "buffers": mem.buffers,
        "overhead": mem.overhead, "fragmentation": mem.fragmentation,
    }
    name = max(parts, key=parts.get)
    return name, int(parts[name])


_CONTEXT_DIMS = ("gpus", "nodes", "seq_len", "precision", "optimizer", "lora_rank", "lora_alpha", "lora_dropout",
                 "lora_target", "double_quant", "freeze_trainable_layers")
"""Fixed values that describe the job rather than a knob (kept by every fix unless it names them)."""

_FLAG = {"method": "--method", "zero": "--zero", "offload": "--offload", "micro_batch": "--micro-batch",
         "grad_accum": "--grad-accum", "checkpointing": "--checkpointing", "attention": "--attention",
         "seq_len": "--seq-len", "gpus": "--gpus", "nodes": "--nodes"}


def _change_text(fixed: Mapping[str, Any], cfg: TrainConfig, skip: Iterable[str] = ()) -> str:
    """The flags that turn the user's fixed dimensions into `cfg` ("--method qlora --checkpointing full")."""
    parts = []
    for k in ("method", "zero", "offload", "micro_batch", "grad_accum", "checkpointing", "attention", "chunked_ce",
              "packing", "compile", "seq_len", "gpus", "nodes"):
        if k in skip:
            continue
        v = getattr(cfg, k)
        if k not in fixed:
            # a free dimension: mention only the memory levers people ask about, when they are on
            on = {"method": True, "zero": v != 0, "offload": v != Offload.NONE,
                  "checkpointing": v != Checkpointing.NONE, "chunked_ce": bool(v)}.get(k, False)
            if not on:
                continue
        elif fixed[k] == v or str(fixed[k]) == str(v):
            continue
        if isinstance(v, bool):
            flag = {"chunked_ce": "chunked-ce", "packing": "packing", "compile": "compile"}[k]
            parts.append(f"--{flag}" if v else f"--no-{flag}")
        else:
            parts.append(f"{_FLAG[k]} {v.value if hasattr(v, 'value') else v}")
    return " ".join(parts)


def explain_nothing_fits(model: ModelSpec, fixed: Mapping[str, Any], gpu: Any, tried: list[Candidate], *,
                         global_batch: int | None = None, lengths: Any = None,
                         memory_fn: MemoryFn | None = None, max_fixes: int = 6) -> NothingFits:
    """Why nothing fits (the dominant term of the smallest configuration tried) and the nearest
    fixes, ranked by speed: unfix one dimension at a time, shorten the sequence, more GPUs, a
    bigger GPU."""
    closest = min(tried, key=lambda c: c.memory.peak_device)
    mem = closest.memory
    dom, dom_bytes = dominant_term(mem)
    reason = (f"nothing fits on {getattr(gpu, 'name', 'this GPU')} ({mem.capacity / GiB:.1f} GiB): the smallest "
              f"configuration tried needs {mem.peak_device / GiB:.1f} GiB per GPU; "
              f"{CATEGORY_TEXT[dom]} dominate{'s' if dom in ('logits',) else ''} with {dom_bytes / GiB:.1f} GiB")
    # the reference speed: the user's configuration as asked (fastest of the tried ones)
    ref = max((c.throughput.tokens_per_s for c in tried), default=0.0)
    fixes: list[Fix] = []
    seen: set = set()
    base = _base_config(fixed, gpu)

    def add(res: SearchResult | None, change: str | None = None) -> None:
        if res is None or res.best is None:
            return
        b = res.best
        text = change or _change_text(fixed, b.cfg)
        key = (b.cfg, getattr(b.memory, "capacity", 0))
        if key in seen or text in seen:
            return
        seen.update((key, text))
        slow = ref / b.throughput.tokens_per_s if ref and b.throughput.tokens_per_s else None
        fixes.append(Fix(text, b, slow))

    def sub(keep: Iterable[str] | None = None, the_gpu: Any = None, **changes: Any) -> SearchResult | None:
        """Search again with `changes` and only the `keep` dimensions still fixed (None: all)."""
        f = {k: v for k, v in fixed.items() if keep is None or k in keep or k in _CONTEXT_DIMS}
        for k, v in changes.items():
            if v is None:
                f.pop(k, None)
            else:
                f[k] = v
        try:
            return search(model, f, the_gpu or gpu, global_batch=global_batch, lengths=lengths, top=1,
                          memory_fn=memory_fn, explain=False)
        except PlanError:
            return None

    method = Method.parse(fixed["method"], "method") if "method" in fixed else None
    searchable_fixed = [k for k in fixed if k not in _CONTEXT_DIMS and k != "method"]
    # 1. one fixed dimension at a time
    for dim in searchable_fixed:
        add(sub(**{dim: None}))
    if "zero" in fixed and "offload" in fixed:
        add(sub(zero=None, offload=None))
    # 2. keep the method, free everything else
    if searchable_fixed:
        add(sub(keep=("method",)))
    # 3. a smaller method (LoRA, QLoRA), the rest free
    for m in (Method.LORA, Method.QLORA):
        if method is not None and m != method and not (method == Method.QLORA and m == Method.LORA):
            add(sub(keep=(), method=m))
    # 4. a shorter sequence, the method kept, the rest at its leanest
    try:
        keep_m = {k: v for k, v in fixed.items() if k in _CONTEXT_DIMS or k == "method"}
        lean_cfg = base.replace(**_leanest(keep_m, gpu, base.world_size))
        sl = max_seq_len(model, lean_cfg, gpu, memory_fn=memory_fn, upper=max(1, lean_cfg.seq_len - 1))
        if sl >= 64:
            sl = sl // 64 * 64 if sl >= 128 else sl
            add(sub(keep=("method",), seq_len=sl))
    except PlanError:
        pass
    # 5. more GPUs of this type (method kept, the rest free)
    try:
        mg = min_gpus(model, {k: v for k, v in fixed.items() if k == "method" or k in _CONTEXT_DIMS}, gpu,
                      global_batch=global_batch, lengths=lengths, memory_fn=memory_fn)
    except PlanError:
        mg = None
    if mg is not None and mg.world_size > base.world_size:
        slow = ref / mg.candidate.throughput.tokens_per_s if ref and mg.candidate.throughput.tokens_per_s else None
        fixes.append(Fix(f"--gpus {mg.gpus}" + (f" --nodes {mg.nodes}" if mg.nodes > 1 else "")
                         + (" " + _change_text(fixed, mg.candidate.cfg, skip=("gpus", "nodes"))).rstrip(),
                         mg.candidate, slow))
    # 6. a GPU with more memory (method kept, the rest free)
    try:
        from planner.hardware import gpu_table
        bigger = sorted((g for g in gpu_table().values() if g.memory_bytes > gpu.memory_bytes),
                        key=lambda g: g.memory_bytes)
        for g in bigger[:3]:
            r = sub(keep=("method",), the_gpu=g)
            if r is not None and r.best is not None:
                add(r, f"--gpu {g.name} " + _change_text(fixed, r.best.cfg))
                break
    except PlanError:
        pass
    fixes.sort(key=lambda f: -f.candidate.throughput.tokens_per_s)
    return NothingFits(reason, dom, int(mem.peak_device), int(mem.capacity), tuple(fixes[:max_fixes]))


__all__ = ["search", "SearchResult", "Candidate", "NothingFits", "Fix", "max_micro_batch", "max_seq_len",
           "min_gpus", "MinGpus", "trades", "default_precision", "dominant_term"]
