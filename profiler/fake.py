"""Fake-tensor oracle: one real HF training step of a full-size model, no memory allocated.

``fake_step(config, ...)`` builds the model on ``meta`` (transformers ``from_config``),
applies peft there for LoRA, swaps every parameter and buffer for a *fake* CPU tensor
(``FakeTensorMode``), and runs forward -> ``loss.backward()`` -> ``optimizer.step()`` ->
``zero_grad(set_to_none=True)`` under ``PhaseMemTracker``. Every tensor that the HF code
path allocates is counted with its exact size and lifetime, so the numbers are the
*allocated* bytes of that code path on CPU kernels; they say nothing about the CUDA caching
allocator (reserved - allocated), CUDA context, cuBLAS/NCCL workspaces, or kernels that
exist only on GPU (flash-attention 2, fused CE kernels). ``cpu_step`` runs the identical
step on real CPU tensors (tiny models only) -- on a tiny Llama both agree to the byte,
which is what ``tests/test_fake.py`` checks (with and without ``autocast``).

Categories reported (bytes; see ``profiler.tracker`` for the exact tagging rules):

- ``parameter``  all model weights (frozen and trainable, adapters included).
- ``gradient``   ``param.grad`` of trainable parameters (same dtype as the parameter).
- ``optimizer``  persistent optimizer state (AdamW: exp_avg + exp_avg_sq in the
  parameter dtype, plus a 4-byte ``step`` per parameter tensor).
- ``activation`` tensors allocated during forward that are alive at the moment of the
  peak: saved-for-backward activations, forward transients (logits, fp32 upcasts) and,
  with checkpointing, tensors recomputed during backward.
- ``temp``       transients of backward (activation gradients, gradients before they are
  accumulated into ``.grad``) and, in the optimizer phase, the step's own scratch
  (foreach AdamW allocates ~2x the trainable bytes; fused allocates almost nothing).
- ``buffer``     registered buffers (rotary ``inv_freq``), ``input`` the batch.
- ``total``      sum of the above at that instant.

Optimizer-state convention: torch creates AdamW state lazily inside the first
``step()``. We warm the optimizer first (one ``step()`` on zero gradients, outside the
tracker, in fake mode, so it costs nothing) and then track one *steady-state* step: its
forward and backward already carry the optimizer state, as every step after the first
does. The first step's own optimizer phase (states born during ``step()``) is never higher
than the steady-state optimizer phase for fused AdamW and equal to it for foreach.

Peak = max over the phases forward / backward / optimizer, not a sum.

Fake-mode pitfall handled here: transformers treats fake tensors as "tracing" and, unable to
read position ids, assumes a packed batch -> materialised (b,1,s,s) mask, no SDPA
``is_causal`` fast path, repeat_kv'd GQA keys/values (+0.75 GiB on Llama-3-8B at s=2048).
``_hf_fake_patches`` restores the eager-mode decision (our batch is unpacked).
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FakeStepResult", "fake_step", "cpu_step", "build_model", "load_hf_config", "PHASES"]

PHASES: tuple[str, ...] = ("forward", "backward", "optimizer")

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "fp32": "float32", "float32": "float32"}


@dataclass(frozen=True)
class FakeStepResult:
    """Outcome of one tracked training step (bytes)."""

    peak_bytes: int  # max over phases of total tracked bytes
    phase_peaks: dict[str, dict[str, int]]  # phase -> category -> bytes at that phase's peak
    by_category_at_peak: dict[str, int]  # category breakdown at the global peak
    trainable_params: int
    total_params: int
    seconds: float  # wall time of the whole call (build + warm-up + tracked step)
    step_seconds: float = 0.0  # wall time of the tracked step alone
    step_cpu_seconds: float = 0.0  # CPU time of this process for the tracked step (less noisy)
    peak_phase: str = ""  # phase in which the global peak happened
    settings: dict[str, Any] = field(default_factory=dict)  # normalised arguments

    @property
    def gib(self) -> dict[str, float]:
        """``by_category_at_peak`` in GiB (2**30 bytes), plus ``peak``."""
        d = {k: v / 2**30 for k, v in self.by_category_at_peak.items()}
        d["peak"] = self.peak_bytes / 2**30
        return d


# ---------------------------------------------------------------------------------------
# model construction
# ---------------------------------------------------------------------------------------
def load_hf_config(hf_config: Any):
    """dict (HF config.json contents, a ``_tuneplan`` key is ignored), path, or config."""
    import json
    import os

    import transformers

    if isinstance(hf_config, transformers.PretrainedConfig):
        return copy.deepcopy(hf_config)
    if isinstance(hf_config, (str, os.PathLike)):
        with open(hf_config) as f:
            hf_config = json.load(f)
    d = {k: v for k, v in dict(hf_config).items() if not k.startswith("_")}
    for k in ("torch_dtype", "dtype", "transformers_version", "quantization_config", "auto_map"):
        d.pop(k, None)
    model_type = d.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **d)


def _torch_dtype(dtype: str):
    import torch

    try:
        return getattr(torch, _DTYPES[dtype])
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


def build_model(
    hf_config: Any,
    *,
    device: str = "meta",
    method: str = "full",
    lora_rank: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target: list[str] | str = "all-linear",
    lora_fp32_adapters: bool = True,
    freeze_trainable_layers: int = 2,
    dtype: str = "bf16",
    attention: str = "sdpa",
    checkpointing: str = "none",
    seed: int = 0,
):
    """Build the HF causal LM (``device`` "meta" or "cpu"), with LoRA/freeze applied.

    ``lora_fp32_adapters`` is peft's ``autocast_adapter_dtype`` (default True in peft:
    adapters of a bf16/fp16 model are created in fp32). ``method="freeze"`` trains the
    last ``freeze_trainable_layers`` decoder layers (LLaMA-Factory convention; a negative
    value trains the first ones) and nothing else.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = load_hf_config(hf_config)
    cfg.use_cache = False
    tdtype = _torch_dtype(dtype)
    if device == "cpu":
        torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=tdtype, attn_implementation=attention)
    model.train()
    if checkpointing == "full":
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing not in ("none", None, False):
        raise ValueError(f"checkpointing must be 'none' or 'full', got {checkpointing!r}")

    if method == "lora":
        from peft import LoraConfig, get_peft_model

        target = lora_target
        if isinstance(target, str) and target != "all-linear":
            target = [t.strip() for t in target.split(",") if t.strip()]
            if target == ["all"]:
                target = "all-linear"
        lcfg = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=target,
            task_type="CAUSAL_LM",
            bias="none",
        )
        # create the adapters on `device` too: otherwise peft initialises them for real on
        # CPU (kaiming_uniform_/zero_ of 224 matrices: ~4 s for an 8B model) and moves them
        with torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft reads is_gradient_checkpointing
            model = get_peft_model(model, lcfg, autocast_adapter_dtype=lora_fp32_adapters)
        if not lora_fp32_adapters:
            # peft skips its dtype cast for adapters living on meta: do it here
            for p in model.parameters():
                if p.requires_grad and p.dtype != tdtype:
                    p.data = p.data.to(tdtype)
        model.train()
    elif method == "freeze":
        layers = model.model.layers
        n = len(layers)
        k = freeze_trainable_layers
        keep = set(range(n - k, n)) if k > 0 else set(range(0, -k))
        for p in model.parameters():
            p.requires_grad_(False)
        for i in keep:
            for p in layers[i].parameters():
                p.requires_grad_(True)
    elif method != "full":
        raise ValueError(f"method must be full | lora | freeze, got {method!r}")
    return model


def _count_params(model) -> tuple[int, int]:
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():  # parameters() already de-duplicates tied weights
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def _fakeify(model, fake_mode) -> None:
    """Swap every parameter/buffer for a fake CPU tensor of the same shape/dtype.

    ``Module.to()`` / ``to_empty`` fail on fake tensors ("Couldn't swap ... weakref"), so
    we assign ``module._parameters[name]`` directly. Tied weights stay tied.
    """
    import torch
    from torch import nn

    memo: dict[int, Any] = {}
    with fake_mode:
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is None:
                    continue
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(
                        torch.empty_strided(p.size(), p.stride(), dtype=p.dtype, device="cpu"),
                        requires_grad=p.requires_grad)
                mod._parameters[name] = memo[id(p)]
            for name, b in list(mod._buffers.items()):
                if b is None:
                    continue
                if id(b) not in memo:
                    memo[id(b)] = torch.empty_strided(b.size(), b.stride(), dtype=b.dtype, device="cpu")
                mod._buffers[name] = memo[id(b)]


# ---------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _hf_fake_patches():
    """Keep transformers on its eager (non-tracing) code path under FakeTensorMode.

    transformers treats a fake tensor as "tracing": ``find_packed_sequence_indices`` can
    not read the position ids, so it assumes a packed batch and the model builds an
    explicit (b, 1, s, s) mask -- which also turns SDPA's ``is_causal`` fast path off and
    makes HF ``repeat_kv`` the GQA keys/values (saved for backward: +2*(H - H_kv)*s*b*2
    bytes per layer). A real run of our unpacked batch returns ``None`` there, so we do too.
    """
    from transformers import masking_utils
    from transformers.utils.import_utils import is_fake_tensor

    orig = masking_utils.find_packed_sequence_indices

    def find_packed_sequence_indices(position_ids):
        if is_fake_tensor(position_ids):
            return None  # our batch is one sequence per row: what the real run concludes
        return orig(position_ids)

    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = orig


@contextlib.contextmanager
def _fake_process_group(world_size: int):
    """A single-process ``fake`` process group of ``world_size`` ranks (we are rank 0) and
    its 1-D CPU device mesh. The mesh must be created *outside* FakeTensorMode. An existing
    fake group of the same size is reused; a real (non-fake) group is never touched."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    created = False
    if dist.is_initialized():
        if dist.get_backend() != "fake":
            raise RuntimeError("a real process group is initialised; sharded fake steps need a fake one")
        if dist.get_world_size() != world_size:
            dist.destroy_process_group()
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
        created = True
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        if created:
            dist.destroy_process_group()


def _decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def _fully_shard(model, mesh, *, reshard_after_forward: bool) -> None:
    """FSDP2 ``fully_shard`` per decoder layer, then the root (embeddings, norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


def _make_optimizer(params, optimizer: str, optimizer_impl: str, lr: float = 1e-5):
    import torch

    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False},
            "forloop": {"foreach": False}}.get(optimizer_impl)
    if impl is None:
        raise ValueError(f"optimizer_impl must be fused | foreach | for-loop, got {optimizer_impl!r}")
    opt = optimizer.lower()
    if opt in ("adamw", "adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **impl)
    if opt == "adam":
        return torch.optim.Adam(params, lr=lr, **impl)
    if opt == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0, **impl)
    if opt in ("sgd_momentum", "sgdm"):
        return torch.optim.SGD(params, lr=lr, momentum=0.9, **impl)
    raise ValueError(f"optimizer must be adamw | adam | sgd | sgd_momentum, got {optimizer!r}")


def _optimizer_state_bytes(opt) -> int:
    # every state tensor owns its storage (zeros_like / scalar tensors): no de-duplication;
    # DTensor states (FSDP) count their local shard.
    n = 0
    for st in opt.state.values():
        for v in st.values():
            if hasattr(v, "to_local"):
                v = v.to_local()
            if hasattr(v, "untyped_storage"):
                n += v.untyped_storage().nbytes()
    return n


def _loss(model, input_ids, labels, chunked_ce: bool, ce_chunk: int):
    """HF loss, or a chunked + checkpointed lm_head/CE (full logits never exist)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    if not chunked_ce:
        return model(input_ids=input_ids, labels=labels, use_cache=False).loss
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=input_ids, use_cache=False).last_hidden_state
    head = base.get_output_embeddings()
    # shift: position t predicts label t+1 (as HF's ForCausalLMLoss); last position ignored
    shift = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
    n_tok = shift.numel()

    # F.linear on the head's weight, not head(h): calling the module once per chunk would
    # trip MemTracker's "root module called twice" check (and a LoRA on lm_head is ignored).
    def chunk_loss(h, y):
        logits = F.linear(h, head.weight, head.bias).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                               ignore_index=-100, reduction="sum")

    total = None
    for s in range(0, hidden.shape[1], ce_chunk):
        part = checkpoint(chunk_loss, hidden[:, s:s + ce_chunk], shift[:, s:s + ce_chunk], use_reentrant=False)
        total = part if total is None else total + part
    return total / n_tok


def _measure(*args: Any, **kwargs: Any) -> "FakeStepResult":
    with warnings.catch_warnings():
        # peft/transformers 5.2x: "is_gradient_checkpointing is deprecated" etc.
        warnings.simplefilter("ignore", FutureWarning)
        return _measure_impl(*args, **kwargs)


def _measure_impl(
    hf_config: Any,
    *,
    fake: bool,
    method: str = "full",
    lora_rank: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target: list[str] | str = "all-linear",
    lora_fp32_adapters: bool = True,
    freeze_trainable_layers: int = 2,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    optimizer_impl: str = "fused",
    attention: str = "sdpa",
    checkpointing: str = "none",
    micro_batch: int = 1,
    seq_len: int = 2048,
    chunked_ce: bool = False,
    ce_chunk: int = 1024,
    world_size: int = 1,
    zero: int = 0,
    autocast: bool = False,
    seed: int = 0,
) -> FakeStepResult:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .tracker import PhaseFSDPMemTracker, PhaseMemTracker

    zero = int(zero or 0)
    sharded = world_size > 1 and zero in (2, 3)
    if world_size < 1 or zero not in (0, 2, 3) or (zero and world_size == 1):
        raise NotImplementedError(
            "supported: world_size=1 zero=0 (single GPU; also what DDP holds per rank), "
            "or world_size>1 with zero=3 (FSDP2 full shard) / zero=2 (FSDP2 reshard_after_forward=False)")
    if sharded and not fake:
        raise NotImplementedError("sharded steps run under fake tensors only")
    if checkpointing in (False, None):
        checkpointing = "none"
    if checkpointing is True:
        checkpointing = "full"
    settings = dict(method=method, lora_rank=lora_rank if method == "lora" else None,
                    lora_alpha=lora_alpha if method == "lora" else None,
                    lora_dropout=lora_dropout if method == "lora" else None,
                    lora_target=(lora_target if isinstance(lora_target, str) else ",".join(lora_target))
                    if method == "lora" else None,
                    lora_fp32_adapters=lora_fp32_adapters if method == "lora" else None,
                    freeze_trainable_layers=freeze_trainable_layers if method == "freeze" else None,
                    dtype=dtype, optimizer=optimizer, optimizer_impl=optimizer_impl, attention=attention,
                    checkpointing=checkpointing, micro_batch=micro_batch, seq_len=seq_len,
                    chunked_ce=chunked_ce, world_size=world_size, zero=zero or 0, autocast=bool(autocast),
                    device="cpu-fake" if fake else "cpu")

    t0 = time.perf_counter()
    model = build_model(
        hf_config, device="meta" if fake else "cpu", method=method, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_target=lora_target,
        lora_fp32_adapters=lora_fp32_adapters, freeze_trainable_layers=freeze_trainable_layers,
        dtype=dtype, attention=attention, checkpointing=checkpointing, seed=seed,
    )
    trainable, total = _count_params(model)
    vocab = model.get_output_embeddings().weight.shape[0]

    mode_ctx = FakeTensorMode(allow_non_fake_inputs=False) if fake else contextlib.nullcontext()
    if fake:
        _fakeify(model, mode_ctx)
    gen = torch.Generator().manual_seed(seed)

    pg_ctx = _fake_process_group(world_size) if sharded else contextlib.nullcontext()
    with pg_ctx as mesh, mode_ctx, (_hf_fake_patches() if fake else contextlib.nullcontext()):
        if sharded:
            _fully_shard(model, mesh, reshard_after_forward=(zero == 3))
        input_ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=None if fake else gen)
        labels = input_ids
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _make_optimizer(params, optimizer, optimizer_impl)
        # warm-up: create the optimizer state (lazy in torch) with zero grads, untracked
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)

        if sharded:
            tracker = PhaseFSDPMemTracker(model, opt)
            tracker.track_inputs((input_ids,))
        else:
            tracker = PhaseMemTracker()
            tracker.track_external(model, opt, input_ids)
        t1, c1 = time.perf_counter(), time.process_time()
        with tracker:
            tracker.set_phase("forward")
            # HF Trainer bf16=True (accelerate native AMP) wraps the model's forward -- loss
            # included, since the loss is computed inside forward -- in torch.autocast; backward
            # and the optimizer step run outside it. The region's exit clears autocast's weight
            # cast cache; casts saved for backward stay alive through their SavedVariables.
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with amp:
                loss = _loss(model, input_ids, labels, chunked_ce, ce_chunk)
            tracker.set_phase("backward")
            loss.backward()
            del loss
            tracker.set_phase("optimizer")
            opt.step()
            opt.zero_grad(set_to_none=True)
            tracker.set_phase(None)
        t2, c2 = time.perf_counter(), time.process_time()

    # Optimizer-category bytes above the persistent state are the step's own scratch
    # (upstream tags everything allocated inside step() as Optstate): report them as temp.
    state_bytes = _optimizer_state_bytes(opt)
    phase_peaks = tracker.phase_peaks
    for d in phase_peaks.values():
        extra = d["optimizer"] - state_bytes
        if extra > 0:
            d["optimizer"] -= extra
            d["temp"] += extra
    peak_phase = max(PHASES, key=lambda p: phase_peaks.get(p, {}).get("total", -1))
    by_cat = phase_peaks[peak_phase]
    return FakeStepResult(
        peak_bytes=by_cat["total"],
        phase_peaks=phase_peaks,
        by_category_at_peak=by_cat,
        trainable_params=trainable,
        total_params=total,
        seconds=time.perf_counter() - t0,
        step_seconds=t2 - t1,
        step_cpu_seconds=c2 - c1,
        peak_phase=peak_phase,
        settings=settings,
    )


def fake_step(hf_config: Any, **kwargs: Any) -> FakeStepResult:
    """One tracked training step under ``FakeTensorMode`` (any model size, ~1-5 s for 8B).

    ``hf_config``: HF ``config.json`` contents as a dict (keys starting with ``_``, e.g.
    ``_tuneplan``, are ignored), a path to one, or a ``PretrainedConfig``.

    Keyword arguments (plain values, no planner objects):
    method ``full | lora | freeze``; lora_rank, lora_alpha, lora_dropout, lora_target
    (``"all-linear"``, a list, or ``"q_proj,v_proj"``), lora_fp32_adapters (peft's
    autocast_adapter_dtype, default True); freeze_trainable_layers (freeze method);
    dtype ``bf16 | fp16 | fp32`` (pure: weights, grads and AdamW states all in it);
    optimizer ``adamw | adam | sgd | sgd_momentum``; optimizer_impl ``fused | foreach |
    for-loop``; attention ``sdpa | eager``; checkpointing ``none | full`` (non-reentrant,
    every decoder layer); micro_batch; seq_len; chunked_ce (lm_head + CE in checkpointed
    chunks of ``ce_chunk`` tokens: full-vocab logits never coexist); autocast (default
    False): run forward + loss under ``torch.autocast("cpu", dtype=torch.bfloat16)`` --
    HF Trainer ``bf16=True`` (accelerate native AMP) over 16-bit weights, i.e. the planner's
    ``bf16-mixed``; False is pure ``bf16-true``. It matters for peft's fp32 adapters: lora_A
    saves a bf16 cast of its input instead of an fp32 copy, and autocast caches bf16 casts
    of the adapter weights until the region exits. CPU and CUDA autocast agree on every op
    of the HF Llama/peft graph: the casting ops (linear/mm/addmm/bmm/matmul, sdpa) are
    lower-precision on both; the ops only CUDA's policy lists (pow, rsqrt, cumsum: fp32)
    already get fp32/bool inputs here, and the CPU-only ones (cat: promote;
    cross_entropy_loss: fp32) get same-dtype / fp32 inputs. Not reproduced: accelerate's
    ``convert_outputs_to_fp32`` (an fp32 copy of the returned logits after forward).

    world_size / zero: ``1 / 0`` is one GPU (also what each DDP rank holds, minus DDP's
    gradient buckets). ``N / 3`` runs FSDP2 ``fully_shard`` (each decoder layer + root) over
    a single-process *fake* process group of N ranks and reports rank 0;
    ``N / 2`` the same with ``reshard_after_forward=False`` (parameters stay gathered from
    forward to backward, ZeRO-2-like in the compute phases). These are FSDP2 semantics in
    the parameter dtype -- not DeepSpeed's (no fp32 master copy, no bucket buffers). Their
    phase dicts add ``unsharded_param``, ``all_gather``, ``unsharded_grad`` and
    ``reduce_scatter``; ``parameter`` / ``gradient`` / ``optimizer`` are the local shards.
    """
    return _measure(hf_config, fake=True, **kwargs)


def cpu_step(hf_config: Any, *, num_threads: int | None = 1, **kwargs: Any) -> FakeStepResult:
    """Same step, same tracker, real CPU tensors. For tiny models: the fake oracle's check.

    Runs with ``num_threads`` intra-op threads (default 1, restored afterwards): tiny ops on
    a busy 2-core machine are ~10x slower with thread contention. Memory is unaffected.
    """
    import torch

    old = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _measure(hf_config, fake=False, **kwargs)
    finally:
        torch.set_num_threads(old)
