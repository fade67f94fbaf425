"""`tuneplan profile run`: execute one `TrainConfig` on one device and compare with the plan.

    from profiler.run import profile
    m = profile("tiny", TrainConfig(method="lora", seq_len=128), device="cpu", out="runs/x")

Devices
- ``cuda``: real steps on the GPU (profiler.cuda): per-phase allocator peaks, NVML, memory
  snapshot, synchronised step times, tokens/s, MFU.
- ``cpu``: real steps on CPU tensors (profiler.cpu): bytes by category from the dispatch
  tracker, wall time.
- ``fake``: `profiler.fake.fake_step` (FakeTensorMode, any size, nothing allocated) for
  the numbers; the same step is replayed under the timeline tracker for the picture.
- ``auto``: cuda if available, else cpu for models under 1B parameters, else fake.

Outputs (``out``, default ``runs/<UTC timestamp>-<model>-<method>-<device>/``):
measurements.json, timeline.png, timeline.html (self-contained), and on cuda
memory_snapshot.pickle. ``record=True`` appends a row to tables/measured/<device>.csv.

Every run writes measurements.json, also when the step fails: ``status`` is ``ok``, ``oom``
or ``error`` (with ``message``), so a sweep can keep OOM rows.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from planner.config import Method, Offload, Optimizer, Precision, TrainConfig
from planner.errors import PlanError

__all__ = ["profile", "Session", "prepare_session", "choose_device", "ProfileOOM", "AUTO_CPU_MAX_PARAMS",
           "environment", "predict", "compare"]

AUTO_CPU_MAX_PARAMS = 1_000_000_000
"""`--device auto` without a GPU: real CPU steps below this many parameters, fake above."""

DEFAULT_STEPS = {"cuda": (3, 10), "cpu": (1, 3), "fake": (0, 1)}
"""device -> (burn-in steps, timed steps)."""

SCHEMA = "tuneplan.profile/1"


class ProfileOOM(RuntimeError):
    """The step ran out of device memory (the CLI exits 3; a sweep records status=oom).

    `.measurements` holds what was written to measurements.json (status "oom")."""

    def __init__(self, message: str, measurements: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.measurements = measurements or {}


# ----------------------------------------------------------------------------- helpers

def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name, dist in (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"),
                       ("deepspeed", "deepspeed"), ("bitsandbytes", "bitsandbytes"), ("accelerate", "accelerate"),
                       ("flash_attn", "flash-attn"), ("nvidia_ml_py", "nvidia-ml-py")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(device: str) -> dict[str, Any]:
    """Versions and the machine: what a measured row needs to be reproducible."""
    import torch

    env: dict[str, Any] = {"device": device, "hostname": socket.gethostname(), "platform": platform.platform(),
                           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "versions": _versions()}
    if device == "cuda":
        from profiler.cuda import cuda_environment, gpu_preset_for

        env.update(cuda_environment())
        env["gpu"] = gpu_preset_for(env["device_name"], env.get("nvml_total_bytes") or env.get("total_memory_bytes"))
    else:
        env["device_name"] = "cpu" if device == "cpu" else "cpu (FakeTensorMode)"
    return env


def choose_device(requested: str, spec) -> tuple[str, str]:
    """(device, why)."""
    requested = (requested or "auto").lower()
    if requested not in ("auto", "cuda", "cpu", "fake"):
        raise PlanError(f"--device must be auto, cuda, cpu or fake, got {requested!r}")
    if requested == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise PlanError("--device cuda: torch sees no CUDA GPU here (use --device cpu or fake)")
        return "cuda", "requested"
    if requested != "auto":
        return requested, "requested"
    import torch

    if torch.cuda.is_available():
        return "cuda", "auto: a CUDA GPU is available"
    if spec.total_params < AUTO_CPU_MAX_PARAMS:
        return "cpu", f"auto: no GPU, {spec.total_params / 1e6:.0f}M parameters < 1B → real CPU steps"
    return "fake", f"auto: no GPU, {spec.total_params / 1e9:.1f}B parameters ≥ 1B → fake-tensor step"


class StageProgress:
    """A rich progress display on stderr: one bar per stage (build, burn-in, steps, ...)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._p = None
        self._task = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> "StageProgress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self._p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            if self._task is not None:
                self._p.update(self._task, completed=self._p.tasks[-1].total)
            self._p.__exit__(*exc)

    def stage(self, name: str, total: int) -> None:
        if self._p is None:
            return
        if self._task is not None:
            t = self._p.tasks[-1]
            self._p.update(self._task, completed=t.total)
        self._task = self._p.add_task(name, total=max(int(total), 1) if total else 1)
        if not total:
            self._p.update(self._task, completed=1)

    def advance(self, n: int = 1) -> None:
        if self._p is not None and self._task is not None:
            self._p.advance(self._task, n)

    def log(self, msg: str) -> None:
        if self._p is not None:
            self._p.console.print(msg)


# ----------------------------------------------------------------------------- session

class Session:
    """Model + optimizer (or DeepSpeed engine) + batches of one configuration, ready to step."""

    def __init__(self, built, cfg: TrainConfig, optimizer, batches, batch_info, *, engine=None, scaler=None,
                 notes: list[str] | None = None, optimizer_name: str = "") -> None:
        self.built = built
        self.cfg = cfg
        self.optimizer = optimizer
        self.batches = batches
        self.batch_info = batch_info
        self.engine = engine
        self.scaler = scaler
        self.notes = notes or []
        self.optimizer_name = optimizer_name

    def step(self, phase=None):
        from profiler.step import train_step

        kw = {"phase": phase, "keep_loss": False} if phase is not None else {}
        return train_step(self.built.module, self.built.model, self.optimizer, self.batches,
                          device=self.built.device, autocast_dtype=self.built.dtypes.autocast,
                          chunked_ce=self.cfg.chunked_ce, scaler=self.scaler, engine=self.engine, **kw)

    def torch_optimizer(self):
        import torch

        opt = self.optimizer
        if self.engine is not None:
            inner = getattr(self.engine, "optimizer", None)
            opt = getattr(inner, "optimizer", inner)
        return opt if isinstance(opt, torch.optim.Optimizer) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(cfg: TrainConfig, device: str, spec=None) -> dict[str, Any] | None:
    """The DeepSpeed config a one-process profile of `cfg` runs with (None without ZeRO): the
    one `tuneplan plan --out` writes (planner.deepspeed_config), with its "auto" values
    resolved the way HF Trainer resolves them (bucket sizes from hidden_size², clipping 1.0)."""
    if cfg.zero == 0 and cfg.offload == Offload.NONE:
        return None
    try:
        from planner.deepspeed_config import deepspeed_config as planned

        ds = planned(cfg)
    except ImportError:  # pragma: no cover - the planner module is absent
        ds = None
    if ds is None:
        ds = {"zero_optimization": {"stage": cfg.zero}, "zero_allow_untested_optimizer": True,
              "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
        if cfg.offload != Offload.NONE:
            ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
            ds["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
    ds = json.loads(json.dumps(ds))
    h = spec.hidden_size if spec is not None else 4096
    auto = {"train_batch_size": cfg.micro_batch * cfg.grad_accum * cfg.world_size,
            "train_micro_batch_size_per_gpu": cfg.micro_batch, "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": 1.0, "reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h, "lr": 1e-5, "betas": [0.9, 0.999], "eps": 1e-8,
            "weight_decay": 0.0}

    def fill(d: dict[str, Any], parent: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                fill(v, k)
            elif v == "auto":
                if k == "enabled":
                    d[k] = (cfg.precision in (Precision.BF16_MIXED, Precision.BF16_TRUE) if parent == "bf16"
                            else cfg.precision == Precision.FP16_MIXED)
                else:
                    d[k] = auto[k]

    fill(ds)
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        ds.setdefault(k, auto[k])
    ds["steps_per_print"] = 10**9
    if device == "cpu":  # no pinned memory without a GPU
        for key in ("offload_optimizer", "offload_param"):
            if key in ds.get("zero_optimization", {}):
                ds["zero_optimization"][key]["pin_memory"] = False
    return ds


def _deepspeed_engine(built, spec, cfg: TrainConfig, device: str, notes: list[str]):
    """A one-process DeepSpeed engine (ZeRO stage, optimizer offload) around the built model."""
    if cfg.method == Method.QLORA:
        raise PlanError("QLoRA with DeepSpeed ZeRO is not profiled (bitsandbytes 4-bit weights); use --zero 0")
    if device == "cpu":
        prev = os.environ.get("DS_ACCELERATOR")
        if prev not in (None, "cpu") or ("deepspeed" in sys.modules and prev != "cpu"):
            raise PlanError("DeepSpeed on CPU needs DS_ACCELERATOR=cpu set before deepspeed is imported")
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tuneplan" / "torch_extensions"))
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    try:
        import deepspeed
    except ImportError:
        raise PlanError("--zero / --offload need DeepSpeed (pip install 'tuneplan[deepspeed]')") from None
    if cfg.optimizer not in (Optimizer.ADAMW,):
        raise PlanError(f"DeepSpeed profiling supports --optimizer adamw only, not {cfg.optimizer}")
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", auto_mpi_discovery=False,
                               verbose=False)
    ds = deepspeed_config(cfg, device, spec)
    params = [p for p in built.model.parameters() if p.requires_grad]
    client = None
    if "optimizer" not in ds:  # HF Trainer hands DeepSpeed its own torch optimizer
        from profiler.modelbuild import make_optimizer

        client = make_optimizer(params, cfg, device, notes=notes)
    engine, optimizer, _, _ = deepspeed.initialize(model=built.model, model_parameters=params, config=ds,
                                                   optimizer=client)
    notes.append(f"DeepSpeed {deepspeed.__version__} ZeRO-{cfg.zero}, offload {cfg.offload}, one process "
                 f"({'gloo, DS_ACCELERATOR=cpu' if device == 'cpu' else 'nccl'})")
    if device == "cpu" and cfg.offload != Offload.NONE:
        notes.append("offload on --device cpu moves nothing (the 'device' is the CPU): this checks the code path")
    return engine, optimizer, ds


def prepare_session(spec, cfg: TrainConfig, device: str, *, seed: int = 0, weights_dir: str | None = None,
                    progress: StageProgress | None = None) -> Session:
    import torch

    from profiler.modelbuild import build_for_training, make_optimizer
    from profiler.step import make_batches

    if progress:
        progress.stage(f"build {spec.name} ({cfg.method}) on {device}", 1)
    built = build_for_training(spec, cfg, device, seed=seed, weights_dir=weights_dir)
    notes = list(built.notes)
    engine = None
    scaler = None
    ds_config = None
    if cfg.zero > 0 or cfg.offload != Offload.NONE:
        engine, optimizer, ds_config = _deepspeed_engine(built, spec, cfg, device, notes)
        opt_name = f"DeepSpeed {type(optimizer).__name__} (inner {type(getattr(optimizer, 'optimizer', optimizer)).__name__})"
    else:
        opt_notes: list[str] = []
        optimizer = make_optimizer([p for p in built.model.parameters() if p.requires_grad], cfg, device,
                                   notes=opt_notes)
        notes += opt_notes
        opt_name = type(optimizer).__name__
        if built.dtypes.grad_scaler:
            scaler = torch.amp.GradScaler(device)
    batches, info = make_batches(cfg, built.vocab_size, device, seed=seed)
    if progress:
        progress.advance()
    s = Session(built, cfg, optimizer, batches, info, engine=engine, scaler=scaler, notes=notes,
                optimizer_name=opt_name)
    s.ds_config = ds_config
    return s


# ----------------------------------------------------------------------------- fake

_FAKE_DTYPE = {"bf16-mixed": "bf16", "bf16-true": "bf16", "fp16-mixed": "fp16", "fp32": "fp32"}


def fake_kwargs(cfg: TrainConfig, notes: list[str]) -> dict[str, Any]:
    """`profiler.fake.fake_step` keyword arguments for `cfg` (what it cannot express → notes / errors)."""
    if cfg.method == Method.QLORA:
        raise PlanError("--device fake cannot run QLoRA (bitsandbytes NF4 kernels need real tensors); "
                        "use --device cuda, or --device cpu for small models")
    opt = {Optimizer.ADAMW: "adamw", Optimizer.SGD: "sgd"}.get(cfg.optimizer)
    if opt is None:
        raise PlanError(f"--device fake supports --optimizer adamw or sgd, not {cfg.optimizer}")
    attention = cfg.attention.value
    if attention == "flash":
        attention = "sdpa"
        notes.append("--attention flash: the fake step runs sdpa's math on CPU kernels (no flash kernel)")
    amp = cfg.precision == Precision.BF16_MIXED and _fake_supports("autocast")
    if cfg.precision == Precision.BF16_MIXED and not amp:
        notes.append("fake step: bf16 weights without autocast (this profiler.fake has no autocast option)")
    elif cfg.precision == Precision.FP16_MIXED:
        notes.append("fake step: pure fp16 (no fp32 trainable weights / GradScaler as fp16-mixed uses)")
    if cfg.is_adapter and cfg.lora_dropout > 0:
        notes.append(f"--lora-dropout {cfg.lora_dropout}: CPU dropout keeps larger masks than CUDA's 1-byte bool masks, "
                     "which the planner models; activations read high here (--lora-dropout 0 compares exactly)")
    if cfg.packing:
        notes.append("fake step: --packing ignored (one planned-shape row per sequence)")
    if cfg.grad_accum > 1:
        notes.append("fake step: one micro-batch (gradient accumulation adds no memory beyond the .grad buffers)")
    if cfg.compile:
        notes.append("fake step: --compile ignored")
    if cfg.world_size > 1 or cfg.zero:
        notes.append(f"fake step: one rank of {cfg.world_size} with FSDP2 full sharding (torch AdamW, states in the "
                     "parameter dtype); DeepSpeed ZeRO keeps fp32 master weights and states instead")
    if cfg.checkpointing.value == "selective":
        raise PlanError("--checkpointing selective has no HF implementation to run; profile 'full' or 'none'")
    kw = dict(method=cfg.method.value, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
              lora_dropout=cfg.lora_dropout, lora_target=",".join(cfg.lora_target),
              freeze_trainable_layers=cfg.freeze_trainable_layers, dtype=_FAKE_DTYPE[cfg.precision.value],
              optimizer=opt, optimizer_impl="fused", attention=attention, checkpointing=cfg.checkpointing.value,
              micro_batch=cfg.micro_batch, seq_len=cfg.seq_len, chunked_ce=cfg.chunked_ce,
              world_size=cfg.world_size, zero=cfg.zero)
    if amp:
        kw["autocast"] = True  # HF Trainer bf16=True: forward + loss under bf16 autocast
    return kw


def _fake_supports(name: str) -> bool:
    """Whether profiler.fake's step takes keyword `name` (it grows options over time)."""
    import inspect

    try:
        from profiler import fake as F

        fn = getattr(F, "_measure_impl", None) or getattr(F, "_measure")
        return name in inspect.signature(fn).parameters
    except Exception:
        return False


def _fake_timeline(spec, kw: dict[str, Any]) -> dict[str, Any]:
    """The fake step of `profiler.fake` (its model build, fake-tensor swap and HF patches, the
    same warm optimizer state and tracker class), run op by op under the timeline tracker.

    Tested equal, phase by phase and byte for byte, to `profiler.fake.fake_step`."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from profiler import fake as F
    from profiler.cpu import TimelineTracker
    from profiler.modelbuild import _count
    from profiler.step import train_step

    t0 = time.perf_counter()
    build_keys = ("method", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "freeze_trainable_layers",
                  "dtype", "attention", "checkpointing")
    model = F.build_model(spec.config, device="meta", **{k: kw[k] for k in build_keys if k in kw})
    trainable, total, _ = _count(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    F._fakeify(model, mode)
    with mode, F._hf_fake_patches():
        ids = torch.randint(0, vocab, (kw["micro_batch"], kw["seq_len"]))
        batches = [{"input_ids": ids, "labels": ids}]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = F._make_optimizer(params, kw["optimizer"], kw["optimizer_impl"])
        for p in params:  # create the (lazy) optimizer state: measure a steady-state step
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tracker = TimelineTracker()
        tracker.track_external(model, opt, ids)
        t1 = time.perf_counter()
        with tracker:
            train_step(model, model, opt, batches, device="cpu",
                       autocast_dtype="bfloat16" if kw.get("autocast") else None, chunked_ce=kw["chunked_ce"],
                       phase=tracker.set_phase, keep_loss=False)
        t2 = time.perf_counter()
    peaks = tracker.phase_peaks
    peak_phase = max(peaks, key=lambda p: peaks[p]["total"])
    return {"phase_peaks": peaks, "peak_phase": peak_phase, "peak_bytes": peaks[peak_phase]["total"],
            "end_of_forward": tracker.end_of_forward or {}, "timeline": tracker.timeline(),
            "trainable_params": trainable, "total_params": total, "seconds": time.perf_counter() - t0,
            "step_seconds": t2 - t1}


def run_fake(spec, cfg: TrainConfig, notes: list[str], progress: StageProgress | None = None,
             timeline: bool = True, verify: bool = False) -> dict[str, Any]:
    """Bytes by category and phase of one full-scale step without allocating it.

    With `timeline` (default) the step runs once, op by op under the timeline tracker
    (`_fake_timeline`); otherwise — or when that fails, or with `verify` — through
    `profiler.fake.fake_step` itself."""
    kw = fake_kwargs(cfg, notes)
    rep = None
    single = kw["world_size"] == 1 and not kw["zero"]
    if timeline and single:
        if progress:
            progress.stage("fake-tensor step, tracked op by op", 1)
        try:
            rep = _fake_timeline(spec, kw)
        except Exception as exc:  # fall back to the oracle itself
            notes.append(f"timeline replay failed ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
                         "numbers from profiler.fake.fake_step, timeline from its phase peaks")
        if progress:
            progress.advance()
    res = None
    if rep is None or verify:
        from profiler.fake import fake_step

        if progress:
            progress.stage("fake-tensor step (profiler.fake.fake_step)", 1)
        try:
            res = fake_step(spec.config, **kw)
        except (NotImplementedError, ValueError) as exc:
            raise PlanError(f"--device fake: {' '.join(str(exc).split())}") from None
        if progress:
            progress.advance()
    if rep is not None:
        mem = {k: rep[k] for k in ("phase_peaks", "peak_phase", "peak_bytes", "end_of_forward", "timeline")}
        mem["source"] = "profiler.fake model build + FakeTensorMode, PhaseMemTracker op-by-op replay"
        out = {"memory": mem, "trainable_params": rep["trainable_params"], "total_params": rep["total_params"],
               "fake_seconds": rep["seconds"], "fake_step_seconds": rep["step_seconds"], "step_seconds": []}
        if res is not None:
            same = all(rep["phase_peaks"].get(p) == v for p, v in res.phase_peaks.items())
            mem["matches_fake_step"] = same
            if not same:
                notes.append("the op-by-op replay differs from profiler.fake.fake_step (fake_step's numbers shown)")
                mem.update(phase_peaks=res.phase_peaks, peak_phase=res.peak_phase, peak_bytes=res.peak_bytes)
        return out
    mem = {"phase_peaks": res.phase_peaks, "peak_phase": res.peak_phase, "peak_bytes": res.peak_bytes,
           "source": "profiler.fake.fake_step"}
    return {"memory": mem, "trainable_params": res.trainable_params, "total_params": res.total_params,
            "fake_seconds": res.seconds, "fake_step_seconds": res.step_seconds, "fake_settings": res.settings,
            "step_seconds": []}


# ----------------------------------------------------------------------------- prediction

def predict(spec, cfg: TrainConfig, gpu_name: str | None, ds_config: dict | None = None) -> dict[str, Any]:
    """The planner's memory (and, when it exists, throughput) prediction; {"error": ...} if it fails."""
    out: dict[str, Any] = {}
    try:
        from planner.hardware import get_gpu
        from planner.memory import estimate_memory

        gpu = get_gpu(gpu_name)
        est = estimate_memory(spec, cfg, gpu, ds_config=ds_config) if ds_config else estimate_memory(spec, cfg, gpu)
        out = est.to_json()
        out["gpu"] = gpu.name
        out["forward_activations"] = _predicted_forward_activations(est)
        out["_estimate"] = est
    except Exception as exc:  # the planner is optional for a measurement
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    try:
        from planner.throughput import estimate_throughput, flops_per_token

        fl = flops_per_token(spec, cfg)
        out["flops_per_token"] = {"model": fl.model, "hardware": fl.hardware}
        tp = estimate_throughput(spec, cfg, gpu, est)
        out["throughput"] = tp.to_json()
    except Exception as exc:
        out["throughput_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return out


def _predicted_forward_activations(est) -> int:
    try:
        from planner.validate.steps import predicted_forward_activations

        return int(predicted_forward_activations(est))
    except Exception:
        fwd = (getattr(est, "phase_peaks", None) or {}).get("forward")
        if fwd:
            return int(fwd - (est.parameters + est.optimizer + est.master_weights + est.buffers))
        return int(est.activations + est.logits)


def flops_per_token(spec, cfg: TrainConfig) -> tuple[float, float, str]:
    """(model FLOPs/token, hardware FLOPs/token incl. recompute, source)."""
    try:
        from planner.throughput import flops_per_token as fpt

        fl = fpt(spec, cfg)
        return float(fl.model), float(fl.hardware), "planner.throughput.flops_per_token"
    except Exception:
        pass
    # 6N (full) / 4N (adapters: no weight gradients of frozen weights) + attention 12·L·h·s, halved
    # for causal kernels; + 2N + attention forward with full recompute.
    n = spec.matmul_params
    attn = 12 * spec.num_layers * spec.num_heads * spec.head_dim * cfg.seq_len * 0.5
    model = (4 if cfg.is_adapter else 6) * n + attn
    hw = model + (2 * n + attn / 3 if cfg.checkpointing.value == "full" else 0)
    return float(model), float(hw), "6N/4N + 12·L·h·s/2 estimate (planner.throughput unavailable)"


# ----------------------------------------------------------------------------- comparison

def measured_summary(measured: dict[str, Any], device: str, quant_state_bytes: int = 0) -> dict[str, Any]:
    """The numbers the planner predicts, from what the runner measured (bytes).

    QLoRA: the NF4 quantisation constants (absmax, nested absmax, code) live in each weight's
    `quant_state`, not in a parameter, so the tracker never sees them; they are added to
    "parameters" and to the tracked peak here (on CUDA the allocator counts them anyway)."""
    mem = measured.get("memory") or {}
    phases = mem.get("phase_peaks") or {}
    fwd = phases.get("forward", {})
    out: dict[str, Any] = {}
    q = int(quant_state_bytes or 0)
    if phases:
        out["parameters"] = max(p.get("parameter", 0) for p in phases.values()) + q
        out["gradients"] = max(p.get("gradient", 0) for p in phases.values())
        out["optimizer"] = fwd.get("optimizer", 0)
        out["activations"] = fwd.get("activation", 0)
        out["tracked_peak"] = mem.get("peak_bytes") + q if mem.get("peak_bytes") is not None else None
    if device == "cuda":
        out["peak_allocated"] = measured.get("peak_allocated_bytes")
        out["peak_reserved"] = measured.get("peak_reserved_bytes")
        nv, base = measured.get("nvml_peak_bytes"), measured.get("nvml_baseline_bytes") or 0
        out["peak_device"] = (nv - base) if nv is not None else None
    else:
        out["peak_allocated"] = out.get("tracked_peak")
    return out


def compare(summary: dict[str, Any], predicted: dict[str, Any], measured: dict[str, Any], device: str) -> list[dict]:
    """Rows of (metric, measured, predicted, relative error = (predicted − measured) / measured)."""
    est = predicted.get("_estimate")
    if est is None:
        return []
    pairs = [("parameters", est.parameters), ("gradients", est.gradients),
             ("optimizer", est.optimizer + est.master_weights), ("activations", predicted.get("forward_activations")),
             ("peak_allocated", est.peak_allocated)]
    if device == "cuda":
        pairs += [("peak_reserved", est.peak_reserved), ("peak_device", est.peak_device)]
    rows = []
    for metric, pred in pairs:
        meas = summary.get(metric)
        if meas is None or pred is None:
            continue
        rows.append({"metric": metric, "unit": "bytes", "measured": int(meas), "predicted": int(pred),
                     "rel_error": (pred - meas) / meas if meas else None})
    tp = (predicted.get("throughput") or {}).get("tokens_per_s")
    if device == "cuda" and tp and measured.get("tokens_per_s"):
        m = measured["tokens_per_s"]
        rows.append({"metric": "tokens_per_s", "unit": "tokens/s", "measured": m, "predicted": tp,
                     "rel_error": (tp - m) / m})
    return rows


# ----------------------------------------------------------------------------- main

def _default_out(spec, cfg: TrainConfig, device: str) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{spec.name}-{cfg.method}-{device}")
    base = Path("runs") / f"{stamp}-{name}"
    p, i = base, 1
    while p.exists():
        i += 1
        p = Path(f"{base}-{i}")
    return p


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _finish_timing(measured: dict[str, Any], cfg: TrainConfig, info, spec, device: str, gpu_name: str | None,
                   notes: list[str]) -> None:
    times = measured.get("step_seconds") or []
    tokens_step = info.tokens_per_micro_batch * cfg.grad_accum if info is not None else cfg.micro_batch * cfg.seq_len
    measured["tokens_per_step"] = tokens_step
    med = _median(times)
    measured["step_time_s"] = med
    measured["step_time_mean_s"] = statistics.fmean(times) if times else None
    measured["step_time_min_s"] = min(times) if times else None
    measured["tokens_per_s"] = tokens_step / med if med else None
    model_f, hw_f, src = flops_per_token(spec, cfg)
    measured["flops_per_token"] = {"model": model_f, "hardware": hw_f, "source": src}
    if device == "cuda" and med:
        try:
            from planner.hardware import get_gpu

            peak = get_gpu(gpu_name).peak_tflops(cfg.precision.value) * 1e12
            measured["mfu"] = model_f * measured["tokens_per_s"] / peak
            measured["hfu"] = hw_f * measured["tokens_per_s"] / peak
            measured["peak_flops"] = peak
        except Exception as exc:
            notes.append(f"MFU not computed: {exc}")


def profile(model: str, cfg: TrainConfig, *, device: str = "auto", steps: int | None = None,
            warmup: int | None = None, out: str | os.PathLike | None = None, record: bool = False,
            gpu: str | None = None, seed: int = 0, weights: str | None = None, snapshot: bool = True,
            timeline: bool = True, command: str | None = None, progress: bool = True,
            measured_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run `cfg` on `device`, write the outputs, return measurements.json's content.

    Raises PlanError for configurations that cannot run here (before anything is written)
    and ProfileOOM when the device ran out of memory (after writing measurements.json with
    status "oom")."""
    from planner.model import resolve_model

    resolved = resolve_model(model)
    spec = resolved.spec
    dev, why = choose_device(device, spec)
    if cfg.world_size > 1 and dev != "fake":
        raise PlanError(f"profile run measures one process: --gpus {cfg.gpus} --nodes {cfg.nodes} can only be "
                        "profiled with --device fake (per-rank memory)")
    if cfg.method == Method.QLORA and dev == "fake":
        fake_kwargs(cfg, [])  # raises the one-line reason
    if dev == "cpu" and cfg.compile:
        cache = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                                      str(Path.home() / ".cache" / "tuneplan" / "inductor"))
        Path(cache).mkdir(parents=True, exist_ok=True)
    d_warm, d_steps = DEFAULT_STEPS[dev]
    warmup = d_warm if warmup is None else int(warmup)
    steps = d_steps if steps is None else int(steps)
    if warmup < 0 or steps < 0:
        raise PlanError("--steps and --warmup must be >= 0")
    if dev != "fake" and warmup + steps == 0:
        warmup = 1  # optimizer states are created lazily in the first step(): measure a steady-state step
    out_dir = Path(out) if out else _default_out(spec, cfg, dev)
    out_dir.mkdir(parents=True, exist_ok=True)

    notes: list[str] = []
    nvml_baseline = None
    if dev == "cuda":
        from profiler.cuda import nvml_used_bytes

        nvml_baseline = nvml_used_bytes()  # before this process creates its CUDA context
    env = environment(dev)
    gpu_name = gpu or env.get("gpu")
    m: dict[str, Any] = {
        "schema": SCHEMA, "status": "running", "message": "",
        "model": {"name": spec.name, "how": resolved.how, "params": spec.total_params, "layers": spec.num_layers,
                  "hidden": spec.hidden_size, "vocab": spec.vocab_size, "weights": weights},
        "config": cfg.to_dict(), "device": dev, "device_choice": why,
        "run": {"steps": steps, "warmup": warmup, "seed": seed, "out_dir": str(out_dir),
                "command": command or " ".join(sys.argv),
                "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")},
        "environment": env,
    }
    predicted = predict(spec, cfg, gpu_name, deepspeed_config(cfg, dev, spec) if dev != "fake" else None)
    if dev == "cpu":
        _check_host_memory(predicted)
    measured: dict[str, Any] = {}
    info = None
    t_start = time.perf_counter()
    oom: BaseException | None = None
    with StageProgress(progress) as prog:
        try:
            if dev == "fake":
                measured = run_fake(spec, cfg, notes, prog, timeline=timeline)
                m["build"] = {"trainable_params": measured.pop("trainable_params"),
                              "total_params": measured.pop("total_params")}
            else:
                session = prepare_session(spec, cfg, dev, seed=seed, weights_dir=weights, progress=prog)
                info = session.batch_info
                b = session.built
                m["build"] = {"trainable_params": b.trainable_params, "total_params": b.total_params,
                              "param_bytes": b.param_bytes, "quant_state_bytes": b.quant_state_bytes,
                              "dtypes": b.dtypes.__dict__, "attention_impl": b.attention_impl,
                              "optimizer": session.optimizer_name, "compiled": cfg.compile,
                              "deepspeed_config": getattr(session, "ds_config", None)}
                notes += session.notes
                if dev == "cuda":
                    from profiler.cuda import run_cuda

                    measured = run_cuda(session, steps=steps, warmup=warmup, progress=prog,
                                        snapshot_path=str(out_dir / "memory_snapshot.pickle") if snapshot else None,
                                        track_categories=timeline)
                    measured["nvml_baseline_bytes"] = nvml_baseline
                else:
                    from profiler.cpu import run_cpu

                    measured = run_cpu(session, steps=steps, warmup=warmup, progress=prog)
                if cfg.compile:
                    notes.append("with --compile the tracker sees the ops dispatched at run time; allocations "
                                 "inside inductor's generated kernels' buffers may be missed")
            m["status"] = "ok"
        except PlanError:
            raise
        except Exception as exc:
            if _is_oom(exc):
                m["status"], m["message"] = "oom", _one_line(exc)
                oom = exc
                if dev == "cuda":
                    from profiler.cuda import oom_state

                    measured.update(oom_state())
            else:
                m["status"], m["message"] = "error", f"{type(exc).__name__}: {_one_line(exc)}"
                m["traceback"] = _tb(exc)
        prog.stage("writing outputs", 1)
        if m["status"] == "ok":
            _finish_timing(measured, cfg, info, spec, dev, gpu_name, notes)
        m["batch"] = info.to_json() if info is not None else {"shape": [cfg.micro_batch, cfg.seq_len],
                                                                "tokens_per_micro_batch": cfg.micro_batch * cfg.seq_len}
        m["elapsed_s"] = time.perf_counter() - t_start
        summary = (measured_summary(measured, dev, (m.get("build") or {}).get("quant_state_bytes") or 0)
                   if m["status"] in ("ok", "oom") else {})
        m["measured"] = {k: v for k, v in measured.items() if k != "memory"}
        mem = dict(measured.get("memory") or {})
        tl = mem.pop("timeline", None)
        m["measured"]["memory"] = mem
        m["measured"]["summary"] = summary
        m["predicted"] = {k: v for k, v in predicted.items() if not k.startswith("_")}
        m["comparison"] = compare(summary, predicted, measured, dev) if m["status"] == "ok" else []
        m["notes"] = notes
        files = {"measurements": "measurements.json"}
        if tl is not None or m["status"] == "ok":
            try:
                from profiler.timeline import write_timeline

                files.update(write_timeline(out_dir, m, tl))
            except Exception as exc:
                notes.append(f"timeline not drawn: {type(exc).__name__}: {_one_line(exc)[:200]}")
        if measured.get("snapshot"):
            files["snapshot"] = Path(measured["snapshot"]).name
        m["files"] = files
        _write_json(out_dir / "measurements.json", m)
        if record:
            from profiler.record import append_measurement

            path = append_measurement(m, measured_dir=measured_dir)
            m["recorded_to"] = str(path)
            _write_json(out_dir / "measurements.json", m)
        prog.advance()
    if oom is not None:
        raise ProfileOOM(m["message"], m)
    return m


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_host_memory(predicted: dict[str, Any]) -> None:
    """Refuse a CPU run the planner expects to exceed the machine's free memory (the kernel's
    OOM killer would end it — or a neighbour — instead of a clean error)."""
    need = (predicted.get("per_gpu_bytes") or {}).get("peak_allocated")
    have = _mem_available()
    if need and have and need > 0.8 * have:
        raise PlanError(f"--device cpu: the planner expects {need / 2**30:.1f} GiB for this step and "
                        f"{have / 2**30:.1f} GiB of RAM is available; use --device fake (no memory allocated)")


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(exc).lower()
    return "out of memory" in text or isinstance(exc, MemoryError)


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split())[:500]


def _tb(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: Any):
    if hasattr(o, "value"):
        return o.value
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)
