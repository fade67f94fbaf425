"""Throughput model: FLOPs per token, compute time at a calibrated MFU, ZeRO communication,
CPU offload, QLoRA dequantisation and padding waste -> tokens/s for one configuration.

Pure arithmetic over `ModelSpec`, `TrainConfig` and `GPUSpec`; no torch.

Where the numbers come from
- `tables/mfu.csv` (written by `tables/fit_mfu.py` from `tables/published.csv`): the
  fraction of dense peak that the *compute* part reaches, per (GPU class, method, sequence
  bucket). Each cell says which published rows it came from, or how it was filled.
- `tables/throughput_fit.csv` (written by the same script): the global constants fitted
  on the same rows (collective efficiency, torch.compile speed-up, LoRA/full MFU ratio).
- `tables/throughput_priors.csv`: hand-set priors with their derivation (overlap fraction,
  PCIe / HBM efficiency, CPU-Adam rate, dequantisation bytes, launch overhead).
There is no per-row or per-model correction anywhere.

Step time of one optimizer step on one GPU (G = grad-accum micro-batches):

    step = G·(compute + launch overhead + dequant) + exposed comm + offload + optimizer step

tokens/s counts real (non-pad) tokens only.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping

from planner.config import Attention, Checkpointing, Method, Offload, Optimizer, Precision, TrainConfig, LORA_ALL_LINEAR
from planner.errors import PlanError
from planner.model import TABLES, ModelSpec, bytes_per_param_nf4

GB = 1e9

# ----------------------------------------------------------------------------- tables

SEQ_BUCKETS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
"""MFU table sequence buckets (tokens per row); a length maps to the nearest in log2."""

GPU_CLASSES = {
    # class: GPUs whose kernels (tensor-core generation, SRAM, clocks) behave alike
    "hopper": ("h100", "h200", "h800", "h20", "gh200"),
    "ampere-dc": ("a100", "a800", "a30"),
    "ampere-pro": ("a6000", "a10g", "a10", "a40", "rtx3090", "a5000", "a4000"),
    "ada": ("l40s", "l40", "l20", "l4", "rtx4090", "rtx6000-ada"),
    "volta": ("v100",),
}


def gpu_class(gpu_or_name: Any) -> str:
    """The MFU-table class of a GPU ("hopper", "ampere-dc", ...); "other" if unknown."""
    return _gpu_class(str(getattr(gpu_or_name, "name", gpu_or_name)).lower())


@lru_cache(maxsize=128)
def _gpu_class(name: str) -> str:
    stem = name.split("-")[0]
    for cls, stems in GPU_CLASSES.items():
        if stem in stems:
            return cls
    return "other"


@lru_cache(maxsize=4096)
def seq_bucket(seq_len: int) -> int:
    """Nearest bucket in log2 (1500 -> 2048, 1400 -> 1024), clamped to the table's range."""
    x = math.log2(max(1, seq_len))
    return min(SEQ_BUCKETS, key=lambda b: (abs(math.log2(b) - x), b))


@dataclass(frozen=True)
class MfuCell:
    mfu: float
    low: float
    high: float
    how: str
    rows: str


def _read_csv(name: str) -> list[dict[str, str]]:
    path = TABLES / name
    if not path.is_file():
        raise PlanError(f"{path} is missing; run `python tables/fit_mfu.py` to write it")
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@lru_cache(maxsize=1)
def mfu_table() -> dict[tuple[str, str, int], MfuCell]:
    out: dict[tuple[str, str, int], MfuCell] = {}
    for r in _read_csv("mfu.csv"):
        out[(r["gpu_class"], r["method"], int(r["seq_bucket"]))] = MfuCell(
            float(r["compute_mfu"]), float(r["low"]), float(r["high"]), r["how"], r.get("rows", ""))
    return out


@lru_cache(maxsize=1)
def priors() -> dict[str, tuple[float, float, float]]:
    """name -> (expected, low, high) from tables/throughput_priors.csv and throughput_fit.csv."""
    out = {r["name"]: (float(r["value"]), float(r["low"]), float(r["high"])) for r in _read_csv("throughput_priors.csv")}
    fit = TABLES / "throughput_fit.csv"
    if fit.is_file():
        out.update({r["name"]: (float(r["value"]), float(r["low"]), float(r["high"])) for r in _read_csv("throughput_fit.csv")})
    return out


def _prior(name: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
    return priors().get(name, default)


_TABLE_METHOD = {"full": "full", "freeze": "full", "lora": "lora", "qlora": "lora"}


def _table_method(method: Method | str) -> str:
    m = method.value if isinstance(method, Method) else Method.parse(method, "method").value
    return _TABLE_METHOD[m]


@lru_cache(maxsize=256)
def _cell(cls: str, table_method: str, bucket: int) -> MfuCell:
    key = (cls if cls in GPU_CLASSES else "ampere-dc", table_method, bucket)
    cell = mfu_table().get(key)
    if cell is None:
        raise PlanError(f"tables/mfu.csv has no cell for {key}; rerun tables/fit_mfu.py")
    if cls not in GPU_CLASSES:
        return MfuCell(cell.mfu, cell.low * 0.7, min(0.9, cell.high * 1.2),
                       f"unknown GPU class: borrowed ampere-dc ({cell.how})", cell.rows)
    return cell


def mfu_for(gpu: Any, method: Method | str, seq_len: int) -> MfuCell:
    """Compute-MFU cell for (GPU class, method, seq bucket). freeze uses full's cell, qlora
    uses lora's (its dequantisation is modelled separately)."""
    return _cell(gpu_class(gpu), _table_method(method), seq_bucket(seq_len))


# ----------------------------------------------------------------------------- lengths

@dataclass(frozen=True)
class LengthStats:
    """A distribution of example lengths (tokens), for padding waste when packing is off.

    Rows are padded to the longest example in the micro-batch (HF DataCollatorWithPadding /
    LLaMA-Factory's collator: dynamic padding), examples longer than seq_len are truncated.
    """

    lengths: tuple[int, ...] = field(default=(), repr=False, compare=False)
    """Sorted example lengths (empty when only mean/max are known)."""
    mean: float = 0.0
    max: int = 0
    count: int = 0
    _cache: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    @staticmethod
    def of(value: Any) -> "LengthStats | None":
        if value is None or isinstance(value, LengthStats):
            return value
        if isinstance(value, Mapping):
            mean, mx = float(value["mean"]), int(value["max"])
            if mean <= 0 or mx < mean:
                raise PlanError(f"length statistics need 0 < mean <= max, got mean={mean}, max={mx}")
            return LengthStats((), mean, mx, 0)
        if isinstance(value, tuple) and len(value) == 2 and not all(isinstance(v, int) for v in value):
            return LengthStats.of({"mean": value[0], "max": value[1]})
        lengths = sorted(int(v) for v in value)
        if not lengths or lengths[0] <= 0:
            raise PlanError("--lengths needs positive token counts, one per example")
        return LengthStats(tuple(lengths), sum(lengths) / len(lengths), lengths[-1], len(lengths))

    def padding(self, seq_len: int, micro_batch: int) -> tuple[float, float]:
        """(mean real tokens per row, mean padded tokens per row) for rows of at most seq_len.

        1. each example is truncated to seq_len: l' = min(l, seq_len);
        2. a micro-batch of b rows is padded to the longest of its b examples, so the padded
           row length is E[max of b draws]; for the empirical distribution with sorted
           x_1..x_n: P(max <= x_i) = (i/n)^b, E[max] = sum_i x_i·((i/n)^b - ((i-1)/n)^b);
        3. with only (mean, max): b = 1 pads nothing; b > 1 assumes the longest row of the
           micro-batch reaches min(max, seq_len) (pessimistic for small b).
        """
        key = (seq_len, micro_batch)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._padding(seq_len, micro_batch)
        return hit

    def _padding(self, seq_len: int, micro_batch: int) -> tuple[float, float]:
        if self.lengths:
            xs = [min(x, seq_len) for x in self.lengths]
            n = len(xs)
            real = sum(xs) / n
            if micro_batch == 1:
                return real, real
            prev = 0.0
            padded = 0.0
            for i, x in enumerate(xs, 1):
                cdf = (i / n) ** micro_batch
                padded += x * (cdf - prev)
                prev = cdf
            return real, padded
        real = min(self.mean, float(seq_len))
        return (real, real) if micro_batch == 1 else (real, float(min(self.max, seq_len)))


def read_lengths(path: str) -> LengthStats:
    """A --lengths FILE: token counts, one per line (or comma/space separated); '#' comments;
    a .json file may hold a list of counts or {"mean": m, "max": x}."""
    from pathlib import Path
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as exc:
        raise PlanError(f"--lengths {path}: cannot read ({exc.strerror})") from None
    if p.suffix == ".json":
        import json
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PlanError(f"--lengths {path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and "lengths" in data:
            data = data["lengths"]
        return LengthStats.of(data)
    values: list[int] = []
    for ln, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ")
        for tok in line.split():
            try:
                values.append(int(float(tok)))
            except ValueError:
                raise PlanError(f"--lengths {path}:{ln}: {tok!r} is not a token count") from None
    if not values:
        raise PlanError(f"--lengths {path}: no token counts found")
    return LengthStats.of(values)


# ----------------------------------------------------------------------------- FLOPs

@dataclass(frozen=True)
class FlopBreakdown:
    """Training FLOPs per processed token, split by where they happen."""

    forward: float
    """Forward matmuls of the linears (decoder + lm_head, LoRA adapters included)."""
    backward: float
    """Backward matmuls of the linears: input gradients + weight gradients (trainable only)."""
    attention_forward: float
    """QK^T and PV in forward (causal halving applied when the kernel skips masked blocks)."""
    attention_backward: float
    recompute: float
    """Extra forward work of activation checkpointing (full: layer forwards; selective: attention)."""

    @property
    def model(self) -> float:
        """Model FLOPs (what MFU counts): forward + backward, no recompute."""
        return self.forward + self.backward + self.attention_forward + self.attention_backward

    @property
    def hardware(self) -> float:
        """What the GPU executes: model FLOPs + recompute."""
        return self.model + self.recompute

    @property
    def backward_share(self) -> float:
        """Fraction of executed FLOPs in the backward pass (the window that hides grad reduction)."""
        hw = self.hardware
        return (self.backward + self.attention_backward + self.recompute) / hw if hw else 0.0


def _targets(cfg: TrainConfig) -> frozenset[str] | None:
    """LoRA target module names; None means all-linear (peft: every Linear but the output layer)."""
    t = tuple(cfg.lora_target)
    if any(x in (LORA_ALL_LINEAR, "all", "all_linear") for x in t):
        return None
    return frozenset(t)


@dataclass(frozen=True)
class _Coeffs:
    fwd: float            # forward linear FLOPs per token
    bwd: float            # backward linear FLOPs per token
    attn_fwd: float       # sum over layers run forward of 4·h_q  (× s × causal = FLOPs/token)
    attn_bwd: float       # sum over layers reached by backward of 8·h_q
    recompute_linear: float  # forward linear FLOPs of layers reached by backward
    attn_recompute: float    # sum over those layers of 4·h_q
    trainable: int        # trainable parameters (incl. adapters, norms, embeddings as trained)
    adapter: int          # LoRA/QLoRA adapter parameters
    quantized: int        # NF4 weights (QLoRA): decoder linears, not lm_head / embeddings / MoE router
    layers_in_backward: int
    total: int            # model.total_params (cached: ModelSpec recomputes it on every access)


@lru_cache(maxsize=512)
def _coeffs(model: ModelSpec, method: Method, rank: int, targets: frozenset | None,
            freeze_layers: int, input_requires_grad: bool) -> _Coeffs:
    """Walk the decoder once and count, per token, every matmul of a training step.

    Derivation (per token, per weight matrix W of shape in×out; torchtitan style):
      1. forward  Y = X·W: one multiply-add per weight element = 2·in·out FLOPs;
      2. backward input gradient dX = dY·Wᵀ: 2·in·out, computed only when X requires grad
         (the first decoder layer of a LoRA/freeze model gets inputs from a frozen embedding,
         so its q/k/v/gate/up skip dX unless `enable_input_require_grads()` was called);
      3. backward weight gradient dW = Xᵀ·dY: 2·in·out, computed only when W trains.
      => full fine-tuning 6·N (2 fwd + 4 bwd); LoRA/QLoRA 4·N on the frozen base (no weight-
         gradient matmuls on frozen weights) + 6·N_adapter (A: in×r, B: r×out);
      4. freeze (last k layers train): backward stops at the first trainable layer — layers
         below it have neither trainable weights nor inputs that require grad, so autograd
         never reaches them: 2·N for the bottom layers, 4-6·N above; lm_head stays frozen
         (2·V·h for its dX) as in LLaMA-Factory's freeze tuning;
      5. attention core per token per layer, forward: QKᵀ is 2·s·d per head, PV another 2·s·d
         -> 4·s·h_q (h_q = heads·head_dim); backward dQ, dK, dP, dV = 2× forward = 8·s·h_q
         (minus dQ/dK/dV where that input needs no grad); sum 12·L·h_q·s. Causal kernels that skip masked blocks (flash, SDPA's flash /
         mem-efficient backends with is_causal) do half; eager computes the full s×s;
      6. recompute with full checkpointing: one more forward of every layer the backward
         reaches (linears + attention forward); selective: the attention core forward only;
      7. MoE layers: router (E×h) + top-k experts of a gated MLP (3·h·f each) per token;
      8. embeddings, norms, RoPE, softmax, activation functions: no matmul (< 1% at 7B).
    """
    L, h = model.num_layers, model.hidden_size
    hq = model.q_dim
    full = method == Method.FULL
    adapters = method in (Method.LORA, Method.QLORA)
    first_trainable = (L - min(freeze_layers, L)) if method == Method.FREEZE else 0

    fwd = bwd = attn_fwd = attn_bwd = rec_lin = attn_rec = 0.0
    trainable = adapter = quantized = 0
    in_bwd_layers = 0
    x_rg = full or input_requires_grad  # does the hidden state entering layer 0 require grad?

    def linear(in_f: int, out_f: int, name: str, x_rg: bool, w_train: bool) -> tuple[float, float, bool, int]:
        """(forward, backward FLOPs per token, output requires grad, adapter params)."""
        f = 2.0 * in_f * out_f
        b = (f if x_rg else 0.0) + (f if w_train else 0.0)
        n_ad = 0
        if adapters and (targets is None or name in targets):
            r = rank
            n_ad = r * (in_f + out_f)
            # lora_A (in×r): fwd, dW always, dX when x requires grad; lora_B (r×out): fwd, dX, dW
            f += 2.0 * r * in_f + 2.0 * r * out_f
            b += 2.0 * r * in_f * (2 if x_rg else 1) + 4.0 * r * out_f
        return f, b, (x_rg or w_train or n_ad > 0), n_ad

    for i in range(L):
        layer_train = full or (method == Method.FREEZE and i >= first_trainable)
        lf = lb = 0.0
        if model.fused_qkv:
            qkv = [("qkv_proj", h, model.q_dim + 2 * model.kv_dim)]
        else:
            qkv = [("q_proj", h, model.q_dim), ("k_proj", h, model.kv_dim), ("v_proj", h, model.kv_dim)]
        # the input norm's weight trains with the layer, so its output requires grad then
        xin_rg = x_rg or layer_train
        rgs = []
        for name, a, b_ in qkv:
            f, b, rg, n_ad = linear(a, b_, name, xin_rg, layer_train)
            lf += f; lb += b; rgs.append(rg); adapter += n_ad
        q_rg, k_rg, v_rg = (rgs * 3)[:3] if len(rgs) == 1 else rgs
        att_rg = q_rg or k_rg or v_rg
        # attention backward, per unit of s: dQ = dS·K and dK = dSᵀ·Q (2·h_q each, when
        # needed), dP = dO·Vᵀ (2·h_q, needed for either), dV = Pᵀ·dO (2·h_q)
        att_b = 2.0 * hq * (q_rg + k_rg + (q_rg or k_rg) + v_rg)
        f, b, o_rg, n_ad = linear(model.q_dim, h, "o_proj", att_rg, layer_train)
        lf += f; lb += b; adapter += n_ad
        h_rg = x_rg or o_rg
        mlp_in_rg = h_rg or layer_train
        if model.is_moe_layer(i):
            e, k, fm = model.num_experts, model.experts_per_token, model.moe_intermediate_size
            router = 2.0 * e * h
            experts = k * 2.0 * 3 * h * fm
            lf += router + experts
            # dX of router and experts when their input requires grad, dW when the layer trains
            # (fused 3-D expert weights are not nn.Linear: LoRA "all-linear" leaves them alone)
            mlp_rg = mlp_in_rg or layer_train
            lb += (router + experts) * ((1 if mlp_in_rg else 0) + (1 if layer_train else 0))
        else:
            mlp_rg = False
            if model.fused_gate_up:
                gu = [("gate_up_proj", h, 2 * model.intermediate_size)]
            else:
                gu = [("gate_proj", h, model.intermediate_size), ("up_proj", h, model.intermediate_size)]
            for name, a, b_ in gu:
                f, b, rg, n_ad = linear(a, b_, name, mlp_in_rg, layer_train)
                lf += f; lb += b; mlp_rg |= rg; adapter += n_ad
            f, b, d_rg, n_ad = linear(model.intermediate_size, h, "down_proj", mlp_rg, layer_train)
            lf += f; lb += b; mlp_rg |= d_rg; adapter += n_ad
        out_rg = h_rg or mlp_rg
        fwd += lf
        attn_fwd += 4.0 * hq
        if out_rg:  # the backward reaches this layer
            in_bwd_layers += 1
            bwd += lb
            attn_bwd += att_b
            rec_lin += lf
            attn_rec += 4.0 * hq
        if layer_train:
            trainable += model.layer_params(i)
        if method == Method.QLORA:
            quantized += sum(l.in_features * l.out_features for l in model.layer_linears(i))
        x_rg = out_rg

    # lm_head (a matmul even when tied to the embedding): forward 2·V·h; dX when the final
    # hidden state requires grad; dW only in full fine-tuning.
    head = 2.0 * model.vocab_size * h
    fwd += head
    bwd += (head if x_rg else 0.0) + (head if full else 0.0)
    total = model.total_params
    if full:
        trainable = total
    elif method != Method.FREEZE:  # freeze: the trainable decoder layers counted above
        trainable = adapter
    return _Coeffs(fwd, bwd, attn_fwd, attn_bwd, rec_lin, attn_rec, trainable, adapter, quantized, in_bwd_layers, total)


def _input_requires_grad(cfg: TrainConfig) -> bool:
    """LLaMA-Factory (use_reentrant_gc, default) and peft's prepare_model_for_kbit_training call
    `model.enable_input_require_grads()` when gradient checkpointing is on: the embedding output
    then requires grad and the backward runs down to layer 0 even for LoRA / freeze."""
    return cfg.method != Method.FULL and cfg.checkpointing != Checkpointing.NONE


def causal_factor(attention: Attention | str) -> float:
    """1/2 when the kernel skips fully masked blocks of a causal mask, 1 when it computes all s×s."""
    return 1.0 if Attention.parse(attention, "attention") == Attention.EAGER else 0.5


def coefficients(model: ModelSpec, cfg: TrainConfig) -> _Coeffs:
    return _coeffs(model, cfg.method, cfg.lora_rank, _targets(cfg) if cfg.is_adapter else None,
                   cfg.freeze_trainable_layers, _input_requires_grad(cfg))


def flops_per_token(model: ModelSpec, cfg: TrainConfig, *, seq_len: float | None = None,
                    causal: bool | None = None, _c: _Coeffs | None = None) -> FlopBreakdown:
    """FLOPs per processed token of one training step (see `_coeffs` for the derivation).

    `seq_len`: the attention context (defaults to cfg.seq_len). `causal=False` counts the
    full s×s attention (what torch's FlopCounterMode reports for SDPA); default: causal
    halving unless the kernel is eager.
    """
    c = _c or coefficients(model, cfg)
    s = float(seq_len if seq_len is not None else cfg.seq_len)
    cf = (causal_factor(cfg.attention) if causal is None else (0.5 if causal else 1.0))
    af, ab = c.attn_fwd * s * cf, c.attn_bwd * s * cf
    if cfg.checkpointing == Checkpointing.FULL:
        rec = c.recompute_linear + c.attn_recompute * s * cf
    elif cfg.checkpointing == Checkpointing.SELECTIVE:
        rec = c.attn_recompute * s * cf
    else:
        rec = 0.0
    return FlopBreakdown(c.fwd, c.bwd, af, ab, rec)


def trainable_params(model: ModelSpec, cfg: TrainConfig) -> int:
    return coefficients(model, cfg).trainable


# ----------------------------------------------------------------------------- result

@dataclass(frozen=True)
class ThroughputEstimate:
    """Predicted speed of one configuration (all times per optimizer step, per GPU)."""

    tokens_per_s: float
    """Real (non-pad) tokens per second, all GPUs together."""
    tokens_per_s_per_gpu: float
    step_time_s: float
    """One optimizer step (grad_accum micro-batches)."""
    compute_s: float
    """Matmul + attention time at the table's compute MFU (recompute included)."""
    comm_s: float
    """Communication not hidden behind compute."""
    offload_s: float
    """PCIe transfers + CPU optimizer step (ZeRO-Offload)."""
    dequant_s: float
    """QLoRA NF4 -> bf16 dequantisation."""
    overhead_s: float
    """Kernel-launch overhead + the GPU optimizer step."""
    mfu: float
    """Achieved model-FLOPs utilisation: model FLOPs/token × tokens/s per GPU / peak (no recompute)."""
    compute_mfu: float
    """The table's efficiency of the compute part alone (recompute counted as work)."""
    flops_per_token: float
    """Model FLOPs per real token (forward + backward, no recompute)."""
    hardware_flops_per_token: float
    padding_efficiency: float
    """Real tokens / processed tokens (1.0 with packing)."""
    comm_total_s: float = 0.0
    """All communication before overlap."""
    tokens_per_step: float = 0.0
    """Real tokens per optimizer step, all GPUs."""
    low: float = 0.0
    """Pessimistic tokens/s (all GPUs)."""
    high: float = 0.0
    """Optimistic tokens/s (all GPUs)."""
    spread_reason: str = ""
    mfu_source: str = ""
    notes: tuple = ()

    def time_for_tokens(self, tokens: float) -> dict[str, float]:
        """Hours to train `tokens` real tokens: expected, and the low/high speed bounds."""
        def hours(tps: float) -> float:
            return tokens / tps / 3600 if tps > 0 else math.inf
        return {"expected_h": hours(self.tokens_per_s), "fast_h": hours(self.high), "slow_h": hours(self.low)}

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens_per_s": self.tokens_per_s, "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "step_time_s": self.step_time_s, "mfu": self.mfu, "compute_mfu": self.compute_mfu,
            "flops_per_token": self.flops_per_token, "hardware_flops_per_token": self.hardware_flops_per_token,
            "compute_s": self.compute_s, "comm_s": self.comm_s, "comm_total_s": self.comm_total_s,
            "offload_s": self.offload_s, "dequant_s": self.dequant_s, "overhead_s": self.overhead_s,
            "padding_efficiency": self.padding_efficiency, "tokens_per_step": self.tokens_per_step,
            "bounds_tokens_per_s": {"low": self.low, "expected": self.tokens_per_s, "high": self.high},
            "spread_reason": self.spread_reason, "mfu_source": self.mfu_source, "notes": list(self.notes),
        }


# ----------------------------------------------------------------------------- model

@dataclass(frozen=True)
class Params:
    """One set of model constants (expected, or the optimistic / pessimistic bound)."""

    mfu: float
    comm_efficiency: float
    overlap_fraction: float
    pcie_efficiency: float
    hbm_efficiency: float
    cpu_adam_rate: float
    dequant_bytes: float
    launch_overhead: float
    optimizer_bytes: float
    eager_bytes: float
    compile_speedup: float
    zero3_overhead: float = 5e-4


def _param_sets(cell: MfuCell) -> dict[str, Params]:
    def p(name: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
        return _prior(name, default)
    comm = p("comm_efficiency", (0.5, 0.1, 0.8))
    nccl = p("nccl_link_efficiency", (0.8, 0.5, 0.9))
    ov = p("overlap_fraction", (0.8, 0.5, 0.95))
    pcie = p("pcie_efficiency", (0.8, 0.6, 0.9))
    hbm = p("hbm_efficiency", (0.7, 0.5, 0.85))
    cpu = p("cpu_adam_params_per_s_per_node", (2e9, 3.3e8, 1.2e10))
    deq = p("dequant_bytes_per_param_pass", (2.52, 2.0, 4.5))
    launch = p("micro_step_overhead_s_per_layer", (2e-4, 0.0, 1e-3))
    opt = p("optimizer_step_bytes_per_param", (30, 24, 40))
    eag = p("eager_softmax_bytes_per_score", (12, 8, 20))
    comp = p("compile_speedup", (1.15, 1.0, 1.3))
    z3 = p("zero3_fetch_overhead_s_per_layer_pass", (5e-4, 1e-4, 2e-3))
    exp = Params(cell.mfu, comm[0], ov[0], pcie[0], hbm[0], cpu[0], deq[0], launch[0], opt[0], eag[0], comp[0], z3[0])
    low = Params(cell.low, comm[1], ov[1], pcie[1], hbm[1], cpu[1], deq[2], launch[2], opt[2], eag[2], comp[1], z3[2])
    high = Params(cell.high, max(comm[2], nccl[0]), ov[2], pcie[2], hbm[2], cpu[2], deq[1], launch[1], opt[1], eag[1],
                  comp[2], z3[1])
    return {"expected": exp, "low": low, "high": high}


@lru_cache(maxsize=256)
def _param_sets_cached(cls: str, table_method: str, bucket: int) -> tuple[dict[str, Params], MfuCell]:
    cell = _cell(cls, table_method, bucket)
    return _param_sets(cell), cell


def _param_sets_for(gpu: Any, cfg: TrainConfig) -> tuple[dict[str, Params], MfuCell]:
    return _param_sets_cached(gpu_class(gpu), _table_method(cfg.method), seq_bucket(cfg.seq_len))


def link_bandwidth_gbps(gpu: Any, cfg: TrainConfig) -> float:
    """Per-GPU, per-direction bandwidth of the slowest link a ring collective crosses:
    NVLink/PCIe inside one node, the network once the ring spans nodes."""
    return gpu.intra_node_bandwidth_gbps if cfg.nodes == 1 else min(gpu.inter_node_bandwidth_gbps,
                                                                      gpu.intra_node_bandwidth_gbps)


def _param_bytes(model: ModelSpec, cfg: TrainConfig, c: _Coeffs) -> float:
    """Bytes of the (16-bit or NF4) weights a ZeRO-3 all-gather moves, whole model."""
    wb = 4.0 if cfg.precision == Precision.FP32 else 2.0
    if cfg.method == Method.QLORA:
        nf4 = bytes_per_param_nf4(cfg.double_quant)
        return c.quantized * nf4 + (c.total - c.quantized) * wb + c.adapter * wb
    return (c.total + c.adapter) * wb


@dataclass(frozen=True)
class _StepModel:
    """Everything about one optimizer step that does not depend on the micro-batch size or the
    number of micro-batches (one configuration structure, one parameter set). `run(b_tokens,
    rows, G)` is then a handful of multiplications: the search calls it thousands of times."""

    compute_per_token: float   # s per processed token: executed FLOPs / (peak × MFU × compile)
    eager_per_row: float       # s per row: eager attention's s×s score traffic through HBM
    bwd_share: float
    launch: float              # s per micro-batch: launch overhead + ZeRO-3 fetch hooks
    dequant: float             # s per micro-batch: NF4 dequantisation
    zero: int
    rs_grads: float            # s: reduce-scatter of trainable gradients (one micro-batch / step)
    ag_train: float            # s: all-gather of the updated trainable weights
    ag_all: float              # s: ZeRO-3 all-gather of every weight (one pass)
    hide: float                # overlap fraction
    multi_gpu: bool
    offload_step: float        # s per step: weights up + CPU Adam
    offload_per_mb: float      # s per micro-batch: gradients down (ZeRO-2/3) + parameter fetches
    offload_once: float        # s per step: gradients down (ZeRO-1)
    opt_step: float            # s per step: optimizer on the GPU

    def run(self, tokens_mb: float, rows_mb: float, G: int) -> tuple:
        """(step, compute, exposed comm, total comm, offload, dequant, overhead) in seconds."""
        compute_mb = tokens_mb * self.compute_per_token
        bwd_mb = compute_mb * self.bwd_share
        fwd_mb = compute_mb - bwd_mb
        compute_mb += rows_mb * self.eager_per_row
        exposed = total = 0.0
        if self.multi_gpu:
            hide, rs, ag = self.hide, self.rs_grads, self.ag_train
            if self.zero == 0:
                # DDP: all-reduce (2Ψ·(n-1)/n) once per step (no_sync while accumulating),
                # bucketed behind the last micro-batch's backward.
                total = rs + ag
                exposed = max(0.0, total - hide * bwd_mb)
            elif self.zero == 1:
                # ZeRO-1: reduce-scatter at the accumulation boundary (behind the last backward),
                # then all-gather of the updated partitions after the optimizer step (exposed).
                total = rs + ag
                exposed = max(0.0, rs - hide * bwd_mb) + ag
            elif self.zero == 2:
                # ZeRO-2 keeps only its gradient partition, so DeepSpeed reduce-scatters during
                # every micro-batch's backward; all-gather of updated weights once per step.
                total = G * rs + ag
                exposed = G * max(0.0, rs - hide * bwd_mb) + ag
            else:
                # ZeRO-3 / FSDP, per micro-batch: all-gather every weight for forward and again
                # for backward (a checkpointed layer's recompute reuses the backward gather) and
                # reduce-scatter trainable gradients: 3Ψ for full fine-tuning. Prefetched, so
                # each hides behind its own phase's compute.
                fwd_c, bwd_c = self.ag_all, self.ag_all + rs
                total = G * (fwd_c + bwd_c)
                exposed = G * (max(0.0, fwd_c - hide * fwd_mb) + max(0.0, bwd_c - hide * bwd_mb))
        offload = self.offload_step + self.offload_once + G * self.offload_per_mb
        step = G * (compute_mb + self.launch + self.dequant) + exposed + offload + self.opt_step
        return step, G * compute_mb, exposed, total, offload, G * self.dequant, G * self.launch + self.opt_step


def _step_model(model: ModelSpec, cfg: TrainConfig, gpu: Any, c: _Coeffs, fl: FlopBreakdown, p: Params) -> _StepModel:
    """Build the per-structure constants of one optimizer step (derivations inline)."""
    n = cfg.world_size
    peak = gpu.peak_tflops(cfg.precision.value) * 1e12
    speed = p.compile_speedup if cfg.compile else 1.0
    hbm = gpu.hbm_bandwidth_gbps * GB * p.hbm_efficiency
    # -- compute: executed FLOPs (recompute included) at the table's efficiency
    compute_per_token = fl.hardware / (peak * p.mfu * speed)
    # eager attention also streams the s×s scores through HBM (flash keeps them on chip):
    # per row, per layer reached, per head: s² scores × bytes, again for the recompute
    eager_per_row = 0.0
    if cfg.attention == Attention.EAGER:
        passes = 1 + (1 if cfg.checkpointing != Checkpointing.NONE else 0)
        eager_per_row = c.layers_in_backward * model.num_heads * float(cfg.seq_len) ** 2 * p.eager_bytes * passes / hbm
    launch = p.launch_overhead * model.num_layers / speed
    passes = 1 + (1 if c.layers_in_backward else 0) + (1 if cfg.checkpointing == Checkpointing.FULL else 0)
    if cfg.zero == 3 and n > 1:
        # parameter fetch/release hooks of every layer on every pass (forward, backward, recompute)
        launch += p.zero3_overhead * model.num_layers * passes
    # -- QLoRA: dequantise every NF4 weight once per pass (forward, backward, recompute)
    dequant = c.quantized * p.dequant_bytes * passes / hbm if cfg.method == Method.QLORA else 0.0

    # -- communication (ring collectives): a reduce-scatter or all-gather of X bytes sends
    #    X·(n-1)/n bytes per GPU; an all-reduce is a reduce-scatter + an all-gather.
    psi_t = float(c.trainable)
    gbytes = 4.0 if cfg.precision == Precision.FP32 else 2.0  # gradients travel in the compute dtype
    rs = ag = ag_all = 0.0
    if n > 1:
        ring = (n - 1) / n
        bw = link_bandwidth_gbps(gpu, cfg) * GB * p.comm_efficiency
        rs = ring * psi_t * gbytes / bw   # reduce-scatter of trainable gradients
        ag = ring * psi_t * gbytes / bw   # all-gather of updated trainable weights
        ag_all = ring * _param_bytes(model, cfg, c) / bw

    # -- CPU offload
    off_step = off_mb = off_once = 0.0
    if cfg.offload != Offload.NONE:
        pcie = gpu.pcie_bandwidth_gbps * GB * p.pcie_efficiency
        part = psi_t / (n if cfg.zero >= 1 else 1)
        # gradients of this rank's partition go down in 16-bit: per micro-batch for ZeRO-2/3
        # (partitioned gradients are accumulated on the CPU), once per step for ZeRO-1;
        # updated 16-bit weights come back up once per step.
        down = part * gbytes / pcie
        if cfg.zero >= 2:
            off_mb += down
        else:
            off_once += down
        # CPU Adam: every trainable parameter of the node once per step, on the node's CPUs.
        off_step += part * gbytes / pcie + psi_t / cfg.nodes / p.cpu_adam_rate
        if cfg.offload == Offload.OPTIMIZER_PARAMS:
            # ZeRO-Infinity (CPU): each rank fetches its weight partition before every forward
            # and backward all-gather (not overlapped: it precedes the gather).
            off_mb += 2 * _param_bytes(model, cfg, c) / n / pcie

    # -- optimizer step on the GPU (memory bound), skipped when the CPU runs it
    opt_s = 0.0
    if cfg.offload == Offload.NONE:
        per_gpu = psi_t / (n if cfg.zero >= 1 else 1)
        scale = {Optimizer.ADAMW_8BIT: 0.5, Optimizer.PAGED_ADAMW_8BIT: 0.5, Optimizer.SGD: 0.4}.get(cfg.optimizer, 1.0)
        opt_s = per_gpu * p.optimizer_bytes * scale / hbm
    return _StepModel(compute_per_token, eager_per_row, fl.backward_share, launch, dequant, cfg.zero, rs, ag, ag_all,
                      p.overlap_fraction, n > 1, off_step, off_mb, off_once, opt_s)


def _run(model: ModelSpec, cfg: TrainConfig, gpu: Any, c: _Coeffs, fl: FlopBreakdown, p: Params,
         processed_tokens_mb: float) -> dict[str, float]:
    """Time of one optimizer step on one GPU under one parameter set."""
    sm = _step_model(model, cfg, gpu, c, fl, p)
    rows = processed_tokens_mb / max(cfg.seq_len, 1)
    step, comp, exp, tot, off, deq, ovh = sm.run(processed_tokens_mb, rows, cfg.grad_accum)
    return {"step": step, "compute": comp, "comm": exp, "comm_total": tot, "offload": off, "dequant": deq,
            "overhead": ovh}


@dataclass(frozen=True)
class Prepared:
    """What estimate_throughput needs that does not depend on micro-batch / grad-accum: the
    search prepares it once per configuration structure and reuses it for every micro-batch."""

    coeffs: _Coeffs
    sets: dict
    cell: MfuCell
    step_model: _StepModel | None = None
    """Expected-parameter step model for full rows (packing, or no length distribution)."""
    world: int = 1
    seq_len: int = 0

    def tokens_per_s(self, micro_batch: int, grad_accum: int) -> float:
        """Real tokens/s of the structure at (micro_batch, grad_accum) — full rows only."""
        tokens_mb = micro_batch * self.seq_len
        step = self.step_model.run(tokens_mb, micro_batch, grad_accum)[0]
        return self.world * grad_accum * tokens_mb / step


def prepare(model: ModelSpec, cfg: TrainConfig, gpu: Any, *, full_rows: bool = True) -> Prepared:
    """Per-structure constants; `full_rows` (packing or no --lengths) also builds the fast step
    model the search ranks with."""
    sets, cell = _param_sets_for(gpu, cfg)
    c = coefficients(model, cfg)
    sm = None
    if full_rows:
        fl = flops_per_token(model, cfg, seq_len=cfg.seq_len, _c=c)
        sm = _step_model(model, cfg, gpu, c, fl, sets["expected"])
    return Prepared(c, sets, cell, sm, cfg.world_size, cfg.seq_len)


def estimate_throughput(model: ModelSpec, cfg: TrainConfig, gpu: Any, mem: Any = None, *,
                        lengths: Any = None, bounds: bool = True, mfu_override: float | None = None,
                        param_overrides: Mapping[str, float] | None = None,
                        prepared: Prepared | None = None) -> ThroughputEstimate:
    """Predicted tokens/s (real tokens) of `cfg` on `gpu`.

    `lengths`: example token counts (list), `{"mean": m, "max": x}`, or a `LengthStats`, for
    the padding waste when packing is off. `bounds=False` skips the low/high runs (the search
    ranks thousands of candidates and computes bounds only for those it shows). `mfu_override` / `param_overrides` exist for the
    fitting script (tables/fit_mfu.py) and tests; the planner never uses them.
    """
    c = prepared.coeffs if prepared is not None else coefficients(model, cfg)
    stats = lengths if (lengths is None or isinstance(lengths, LengthStats)) else LengthStats.of(lengths)
    notes: list[str] = []
    # -- what one micro-batch processes, and how much of it is real
    if cfg.packing or stats is None:
        real_row = padded_row = float(cfg.seq_len)
        if not cfg.packing and stats is None:
            notes.append("no length distribution given: rows assumed full (no padding waste)")
    else:
        real_row, padded_row = stats.padding(cfg.seq_len, cfg.micro_batch)
    eff = real_row / padded_row if padded_row else 1.0
    # attention context: the padded row length (packed rows are attended as one sequence
    # unless the kernel is varlen — counted as full rows, an upper bound)
    fl = flops_per_token(model, cfg, seq_len=padded_row, _c=c)

    if mfu_override is not None:
        cell = MfuCell(mfu_override, mfu_override, mfu_override, "override", "")
        sets = _param_sets(cell)
    elif prepared is not None:
        sets, cell = prepared.sets, prepared.cell
    else:
        sets, cell = _param_sets_for(gpu, cfg)
    if param_overrides:
        import dataclasses as _dc
        sets = {k: _dc.replace(v, **dict(param_overrides)) for k, v in sets.items()}
    processed_mb = cfg.micro_batch * padded_row
    runs = ({k: _run(model, cfg, gpu, c, fl, p, processed_mb) for k, p in sets.items()} if bounds
            else {"expected": _run(model, cfg, gpu, c, fl, sets["expected"], processed_mb)})
    exp = runs["expected"]
    real_step = cfg.world_size * cfg.grad_accum * cfg.micro_batch * real_row
    tps = real_step / exp["step"]
    per_gpu = tps / cfg.world_size
    peak = gpu.peak_tflops(cfg.precision.value) * 1e12
    fpt_model = fl.model
    mfu = fpt_model * per_gpu / peak  # counts real tokens only: padding is wasted work

    if bounds:
        low = real_step / runs["low"]["step"]
        high = real_step / runs["high"]["step"]
        reasons = [f"compute MFU {cell.low:.0%}-{cell.high:.0%} ({cell.how})"]
        if exp["comm_total"] > 0:
            reasons.append("collective efficiency fitted on DeepSpeed rows (low) vs nccl-tests bus bandwidth (high)")
        if exp["offload"] > 0:
            reasons.append("CPU-Adam rate: published offload rows disagree 35x")
        if exp["dequant"] > 0:
            reasons.append("NF4 dequantisation kernel traffic")
        if mem is not None and not getattr(mem, "fits", True):
            notes.append("does not fit in memory: speed shown for comparison only")
    else:  # ranking only (the search recomputes bounds for the candidates it shows)
        low = high = tps
        reasons = []
    return ThroughputEstimate(
        tokens_per_s=tps, tokens_per_s_per_gpu=per_gpu, step_time_s=exp["step"], compute_s=exp["compute"],
        comm_s=exp["comm"], offload_s=exp["offload"], dequant_s=exp["dequant"], overhead_s=exp["overhead"],
        mfu=mfu, compute_mfu=sets["expected"].mfu, flops_per_token=fpt_model, hardware_flops_per_token=fl.hardware,
        padding_efficiency=eff, comm_total_s=exp["comm_total"], tokens_per_step=real_step,
        low=min(low, tps), high=max(high, tps), spread_reason="; ".join(reasons), mfu_source=cell.how,
        notes=tuple(notes),
    )


__all__ = ["estimate_throughput", "ThroughputEstimate", "FlopBreakdown", "flops_per_token", "LengthStats",
           "read_lengths", "mfu_for", "gpu_class", "seq_bucket", "trainable_params", "causal_factor"]
