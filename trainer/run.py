"""Train one configuration end to end with HF Trainer (and DeepSpeed when the plan says so).

    summary = run_training(TrainOptions(model="tiny", cfg=TrainConfig(), out="runs/tiny"))

One process runs `run_training` directly; a multi-process run is started by
`trainer.launch` (`torchrun` / `deepspeed`), and every rank runs
`python -m trainer.run OUT/train_options.json`, which calls `run_training` with the same
options.

What maps where (TrainConfig → transformers):
    micro_batch → per_device_train_batch_size      grad_accum → gradient_accumulation_steps
    seq_len     → cutoff_len (truncation; packed rows of ≤ seq_len tokens)
    precision   → bf16 / fp16 autocast flags (bf16-true: bf16 weights, no autocast)
    optimizer   → optim (adamw_torch_fused, adamw_bnb_8bit, paged_adamw_8bit, sgd, adafactor)
    checkpointing → activation_checkpointing (use_reentrant=False); "selective" runs as full
    compile     → torch_compile      attention → attn_implementation
    chunked_ce  → use_liger_kernel (CUDA + liger_kernel) else trainer.loss (chunked, checkpointed)
    zero/offload → deepspeed JSON (from plan.yaml's `deepspeed:`, or written here)
    packing     → trainer.packing.PackedDataset + PackedBlockCollator (DataCollatorWithFlattening)
                  else PaddingCollator + train_sampling_strategy="group_by_length"

Outputs in `out/`: plan.yaml (resolved config), train_options.json, metrics.jsonl, loss.png,
`adapter/` (LoRA/QLoRA) or `model/` (full/freeze) with the tokenizer, `base_model/` (adapter
runs on a randomly initialised base: the adapter is useless without it), `checkpoints/`,
`ds_config.json` (DeepSpeed runs), summary.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.config import Checkpointing, Method, Offload, OPTIM_HF, Precision, TrainConfig
from planner.errors import PlanError

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")


@dataclass
class TrainOptions:
    """Everything a training run needs besides the TrainConfig; JSON-serialisable."""

    model: str = "tiny"
    """Preset / alias / config.json path (random init) or a local HF model directory (weights)."""
    cfg: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/train"
    data: list[str] | None = None
    """Training files; None = the bundled synthetic SFT dataset."""
    eval_data: list[str] | None = None
    val_size: float | None = None
    """Fraction (0-1) or count of training examples held out for evaluation."""
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = 2
    resume: str | None = None
    """"last" (latest checkpoint in out/checkpoints) or a checkpoint directory."""
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float | None = None
    """None = 2e-4 for adapters, 5e-5 for full / freeze on a pretrained model, 1e-3 on random init."""
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"
    seed: int = 42
    train_on_prompt: bool = False
    skip_bad_lines: bool = False
    neftune_alpha: float | None = None
    deepspeed: str | None = None
    """DeepSpeed JSON path (plan.yaml's `deepspeed:` resolved against the yaml's directory)."""
    early_stopping_patience: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    gpu: str | None = None
    """GPU type the prediction in the summary is for (default: the one we run on, else h100-80gb)."""
    sample_size: int = 600
    """Conversations in the generated dataset when `data` is None."""
    chunk_size: int = 1024
    """Positions per chunk of the chunked cross-entropy."""
    quiet: bool = False
    precision_from_default: bool = False
    """The precision is TrainConfig's default (no flag, no plan.yaml): on CPU run fp32, which is
    about twice as fast as bf16 autocast there and changes nothing the CPU run is meant to show."""

    # ------------------------------------------------------------ (de)serialise
    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["cfg"] = {f.name: _plain(getattr(self.cfg, f.name)) for f in dataclasses.fields(TrainConfig)}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TrainOptions":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        d["cfg"] = TrainConfig(**{k: v for k, v in d.get("cfg", {}).items() if k in names})
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _plain(v):
    if hasattr(v, "value"):
        return v.value
    if isinstance(v, tuple):
        return list(v)
    return v


# ---------------------------------------------------------------------- helpers

def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str, opts: TrainOptions | None = None) -> None:
    if (opts is None or not opts.quiet) and is_main_process():
        print(f"tuneplan: {msg}", file=sys.stderr, flush=True)


def default_lr(opts: TrainOptions, random_init: bool) -> float:
    if opts.lr is not None:
        return float(opts.lr)
    if opts.cfg.is_adapter:
        return 2e-4 if not random_init else 1e-3
    return 1e-3 if random_init else 5e-5


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def effective_config(cfg: TrainConfig, device: str, notes: list[str], precision_from_default: bool = False) -> TrainConfig:
    """What actually runs here: CPU cannot do fp16 autocast, paged optimizers, or flash-attn."""
    if device == "cpu":
        if precision_from_default and cfg.precision == Precision.BF16_MIXED and cfg.method != Method.QLORA:
            notes.append("CPU: running fp32 (bf16 autocast is ~2x slower on CPU); --precision bf16-mixed forces it")
            cfg = cfg.replace(precision=Precision.FP32)
        if cfg.precision == Precision.FP16_MIXED:
            notes.append("fp16 mixed precision needs a GPU: running bf16-mixed on CPU")
            cfg = cfg.replace(precision=Precision.BF16_MIXED)
        if cfg.optimizer.value == "paged-adamw-8bit":
            notes.append("paged optimizers need CUDA: running adamw-8bit on CPU")
            cfg = cfg.replace(optimizer="adamw-8bit")
        if cfg.offload != Offload.NONE:
            notes.append("DeepSpeed CPU offload needs a GPU to offload from: running without offload on CPU")
            cfg = cfg.replace(offload=Offload.NONE)
    if cfg.checkpointing == Checkpointing.SELECTIVE:
        notes.append("selective checkpointing is not exposed by transformers: running full activation checkpointing")
    return cfg


def resolve_data_paths(paths) -> list[str] | None:
    if paths is None:
        return None
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return [str(p) for p in paths]


def load_tokenizer(opts: TrainOptions, weights_dir: Path | None, spec):
    """The model's own tokenizer when the weights dir has one, else the local BPE (no downloads)."""
    if weights_dir is not None and any((weights_dir / f).is_file() for f in
                                       ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(weights_dir), local_files_only=True)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok, "model"
    from trainer.sample_data import sample_cache_dir
    from trainer.tokenizer import build_local_tokenizer

    vocab = min(2048, spec.vocab_size)
    cache = sample_cache_dir().parent / f"tokenizer_v{vocab}"
    try:
        tok = build_local_tokenizer(vocab_size=vocab, out_dir=cache)
    except OSError:
        tok = build_local_tokenizer(vocab_size=vocab)
    return tok, "local"


def _data_error(exc: Exception) -> PlanError:
    return PlanError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def build_datasets(opts: TrainOptions, tokenizer) -> tuple[list, list, dict]:
    """Tokenised train / eval examples and data stats; every bad input is a PlanError."""
    from trainer.data import DataError, build_sft_dataset, split_train_val
    from trainer.sample_data import default_sample_path

    cfg = opts.cfg
    data = resolve_data_paths(opts.data)
    if not data or data == ["bundled"]:
        data = [str(default_sample_path("messages", n=opts.sample_size))]
        if opts.val_size is None and opts.eval_data is None:
            opts.val_size = 0.05
    try:
        train, stats = build_sft_dataset(data if len(data) > 1 else data[0], tokenizer, cfg.seq_len,
                                         train_on_prompt=opts.train_on_prompt, skip_bad_lines=opts.skip_bad_lines)
        ev, ev_stats = [], None
        if opts.eval_data:
            ev_paths = resolve_data_paths(opts.eval_data)
            ev, ev_stats = build_sft_dataset(ev_paths if len(ev_paths) > 1 else ev_paths[0], tokenizer, cfg.seq_len,
                                             train_on_prompt=opts.train_on_prompt,
                                             skip_bad_lines=opts.skip_bad_lines)
        elif opts.val_size:
            vs = opts.val_size
            vs = int(vs) if float(vs) >= 1 else float(vs)
            train, ev = split_train_val(train, vs, seed=opts.seed)
    except DataError as exc:
        hint = "" if opts.skip_bad_lines else " (--skip-bad-lines skips bad records)"
        raise PlanError(f"{exc}{hint}") from None
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise _data_error(exc) from None
    if not train:
        raise PlanError(f"no training examples left in {', '.join(data)} "
                        f"({stats.get('bad_lines', 0)} bad, {stats.get('dropped', 0)} without trainable tokens)")
    stats = {k: v for k, v in stats.items() if k != "errors"} | {"errors_shown": stats.get("errors", [])[:5]}
    stats["data"] = data
    stats["lengths"] = [len(e["input_ids"]) for e in train]
    stats["train_examples"] = len(train)
    stats["eval_examples"] = len(ev)
    if ev_stats:
        stats["eval_stats"] = {k: v for k, v in ev_stats.items() if k != "errors"}
    return train, ev, stats


def ds_config_for(cfg: TrainConfig) -> dict:
    """A DeepSpeed JSON for the plan: planner.deepspeed_config when present, else a minimal one.

    "auto" values are filled in by transformers from TrainingArguments.
    """
    try:
        from planner import deepspeed_config as dsc  # written by the planner side

        for name in ("deepspeed_config", "build_deepspeed_config", "make_deepspeed_config", "ds_config"):
            fn = getattr(dsc, name, None)
            if callable(fn):
                out = fn(cfg)
                if isinstance(out, dict):
                    return out
    except ImportError:
        pass
    zero: dict[str, Any] = {"stage": cfg.zero, "overlap_comm": False, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if cfg.zero == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=True)
    if cfg.offload != Offload.NONE:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload == Offload.OPTIMIZER_PARAMS:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": zero, "steps_per_print": 1_000_000, "wall_clock_breakdown": False,
    }


def prepare_deepspeed(opts: TrainOptions, out: Path) -> str | None:
    """Path of the DeepSpeed JSON this run uses (copied to out/ds_config.json), or None."""
    cfg = opts.cfg
    if cfg.zero == 0 and not opts.deepspeed:
        return None
    if opts.deepspeed:
        src = Path(opts.deepspeed)
        if not src.is_file():
            raise PlanError(f"DeepSpeed config {src} not found")
        try:
            ds = json.loads(src.read_text())
        except ValueError as exc:
            raise PlanError(f"{src}: not valid JSON ({exc})") from None
    else:
        ds = ds_config_for(cfg)
    zo = ds.setdefault("zero_optimization", {})
    zo["stage"] = cfg.zero  # the TrainConfig is the source of truth (flags override the JSON)
    if cfg.offload == Offload.NONE:
        zo.pop("offload_optimizer", None)
        zo.pop("offload_param", None)
    if cfg.zero == 3:
        zo.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if device_kind() == "cpu":
        # the CPU accelerator has no fused optimizer ops to build; HF's torch optimizer is used
        ds.pop("optimizer", None)
    dst = out / "ds_config.json"
    if is_main_process():
        dst.write_text(json.dumps(ds, indent=2) + "\n")
    return str(dst)


def _checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def resolve_resume(opts: TrainOptions, out: Path) -> str | None:
    if not opts.resume:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    if opts.resume in ("last", "latest", "true", "auto"):
        ck = _checkpoint_dir(out)
        last = get_last_checkpoint(str(ck)) if ck.is_dir() else None
        if last is None:
            raise PlanError(f"--resume: no checkpoint-N directory in {ck}")
        return last
    p = Path(opts.resume)
    if not p.is_dir():
        raise PlanError(f"--resume-from {p}: not a checkpoint directory")
    return str(p)


def steps_per_epoch(n_items: int, cfg: TrainConfig) -> int:
    batches = math.ceil(n_items / (cfg.micro_batch * cfg.world_size))
    return max(1, math.ceil(batches / cfg.grad_accum))


def resolved_plan_yaml(opts: TrainOptions, extra: dict | None = None) -> dict:
    """plan.yaml form of what ran: TrainConfig in HF/LLaMA-Factory names + training keys."""
    d: dict[str, Any] = {"model_name_or_path": opts.model}
    d.update(opts.cfg.to_plan_yaml())
    d.update({
        "dataset": opts.data or "bundled", "eval_dataset": opts.eval_data, "val_size": opts.val_size,
        "learning_rate": opts.lr, "num_train_epochs": opts.epochs, "max_steps": opts.max_steps or -1,
        "lr_scheduler_type": opts.scheduler, "warmup_ratio": opts.warmup_ratio, "seed": opts.seed,
        "train_on_prompt": opts.train_on_prompt, "neftune_noise_alpha": opts.neftune_alpha,
        "eval_steps": opts.eval_steps, "save_steps": opts.save_steps, "save_total_limit": opts.save_total_limit,
        "early_stopping_patience": opts.early_stopping_patience, "output_dir": opts.out,
    })
    if extra:
        d.update(extra)
    return {k: v for k, v in d.items() if v is not None}


def write_yaml(path: Path, data: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))


def liger_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


# ---------------------------------------------------------------------- Trainer

def make_trainer_class():
    from transformers import Trainer

    class SFTTrainer(Trainer):
        """HF Trainer + an optional chunked cross-entropy (trainer.loss) when Liger is absent."""

        chunked_ce: bool = False
        ce_chunk_size: int = 1024

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not (self.chunked_ce and model.training and "labels" in inputs):
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            from trainer.loss import chunked_causal_lm_loss

            loss, outputs = chunked_causal_lm_loss(model, inputs, num_items_in_batch, self.ce_chunk_size)
            # normalised by the tokens of the whole accumulated batch → already scaled for GA
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return SFTTrainer


def training_arguments(opts: TrainOptions, out: Path, *, has_eval: bool, total_steps: int, ds_path: str | None,
                       random_init: bool, device: str, notes: list[str]):
    from transformers import TrainingArguments

    cfg = opts.cfg
    if opts.scheduler not in SCHEDULERS:
        raise PlanError(f"--scheduler {opts.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if not 0 <= opts.warmup_ratio < 1:
        raise PlanError(f"--warmup-ratio must be in [0, 1), got {opts.warmup_ratio}")
    eval_steps = opts.eval_steps or max(1, total_steps // 5)
    save_steps = opts.save_steps or max(1, total_steps // 4)
    early = bool(opts.early_stopping_patience) and has_eval
    if opts.early_stopping_patience and not has_eval:
        raise PlanError("early stopping needs evaluation data: give --eval-data or --val-size")
    if early and save_steps % eval_steps:
        save_steps = eval_steps * math.ceil(save_steps / eval_steps)
        notes.append(f"early stopping: checkpoints every {save_steps} steps (a multiple of --eval-steps {eval_steps})")
    optim = OPTIM_HF[cfg.optimizer.value]
    use_liger = bool(cfg.chunked_ce and liger_available())
    bf16 = cfg.precision == Precision.BF16_MIXED or (cfg.method == Method.QLORA and cfg.precision == Precision.BF16_TRUE)
    kwargs: dict[str, Any] = dict(
        output_dir=str(_checkpoint_dir(out)),
        per_device_train_batch_size=cfg.micro_batch,
        per_device_eval_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=float(opts.epochs),
        max_steps=int(opts.max_steps) if opts.max_steps else -1,
        learning_rate=default_lr(opts, random_init),
        lr_scheduler_type=opts.scheduler,
        warmup_steps=float(opts.warmup_ratio),  # < 1: a ratio of the total steps (transformers 5)
        weight_decay=opts.weight_decay,
        max_grad_norm=opts.max_grad_norm,
        optim=optim,
        bf16=bf16,
        fp16=cfg.precision == Precision.FP16_MIXED,
        activation_checkpointing=cfg.checkpointing != Checkpointing.NONE,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.checkpointing != Checkpointing.NONE else None,
        torch_compile=bool(cfg.compile),
        use_liger_kernel=use_liger,
        neftune_noise_alpha=opts.neftune_alpha,
        logging_strategy="steps",
        logging_steps=opts.logging_steps,
        logging_first_step=True,
        include_num_input_tokens_seen="non_padding",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=opts.save_total_limit,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        seed=opts.seed,
        data_seed=opts.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        train_sampling_strategy="random" if cfg.packing else "group_by_length",
        deepspeed=ds_path,
        use_cpu=device == "cpu",
        ddp_backend="gloo" if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        save_only_model=False,
    )
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, ImportError) as exc:
        raise PlanError(f"training arguments rejected: {' '.join(str(exc).split())[:400]}") from None


# ---------------------------------------------------------------------- predictions

def _get_num(obj, *names):
    for n in names:
        v = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def predictions(spec, cfg: TrainConfig, gpu_name: str | None, lengths: list[int] | None = None) -> dict:
    """The planner's memory / throughput prediction for this config (tolerates absent modules)."""
    out: dict[str, Any] = {"gpu": gpu_name}
    try:
        from planner.hardware import get_gpu

        gpu = get_gpu(gpu_name)
        out["gpu"] = gpu.name
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"gpu: {exc}"
        return out
    try:
        from planner.memory import estimate_memory

        mem = estimate_memory(spec, cfg, gpu)
        out["peak_allocated_bytes"] = _get_num(mem, "peak_allocated")
        out["peak_reserved_bytes"] = _get_num(mem, "peak_reserved")
        out["peak_device_bytes"] = _get_num(mem, "peak_device")
    except Exception as exc:  # noqa: BLE001  (ImportError while the planner is in progress)
        out["memory_error"] = f"{type(exc).__name__}: {exc}"[:200]
    try:
        from planner.throughput import estimate_throughput

        try:  # the example lengths give the padding waste when packing is off
            tp = estimate_throughput(spec, cfg, gpu, lengths=lengths) if lengths else estimate_throughput(spec, cfg, gpu)
        except TypeError:
            tp = estimate_throughput(spec, cfg, gpu)
        out["tokens_per_s"] = _get_num(tp, "tokens_per_s", "tokens_per_second", "tokens_per_sec", "throughput")
        per_gpu = _get_num(tp, "tokens_per_s_per_gpu", "tokens_per_second_per_gpu")
        if per_gpu is not None:
            out["tokens_per_s_per_gpu"] = per_gpu
        out["step_time_s"] = _get_num(tp, "step_time_s", "step_seconds", "seconds_per_step")
        out["mfu"] = _get_num(tp, "mfu")
    except Exception as exc:  # noqa: BLE001
        out["throughput_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return {k: v for k, v in out.items() if v is not None}


def gpu_name_here(default: str | None) -> str | None:
    import torch

    if default:
        return default
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).lower()
    mem = torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        from planner.hardware import gpu_table

        for key in gpu_table():
            family = key.split("-")[0]
            if family and family in name.replace(" ", "-").replace("nvidia-", ""):
                size = key.split("-")[1] if "-" in key else ""
                if not size or size.rstrip("gb").isdigit() and abs(int(size.rstrip("gb")) - mem) < 12:
                    return key
    except Exception:  # noqa: BLE001
        pass
    return None


# ---------------------------------------------------------------------- the run

def quiet_imports() -> None:
    """Silence import-time chatter: bitsandbytes' optional-kernel warning, DeepSpeed's
    accelerator auto-detection warning (we tell it: cpu when there is no CUDA)."""
    import logging

    import torch

    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*")
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def run_training(opts: TrainOptions) -> dict:
    """Train; returns the summary (also written to out/summary.json on rank 0)."""
    t_start = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_imports()
    import transformers
    from transformers import EarlyStoppingCallback

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    from planner.model import resolve_model
    from trainer.callbacks import LossPlotCallback, MetricsCallback, RichProgressCallback, peak_memory, strip_default_printers
    from trainer.model import build_model, has_weights
    from trainer.packing import PackedBlockCollator, PackedDataset, PaddingCollator

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    device = device_kind()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    opts.cfg = effective_config(opts.cfg, device, notes, opts.precision_from_default)
    cfg = opts.cfg
    resolved = resolve_model(opts.model)
    spec = resolved.spec
    weights_dir = Path(opts.model) if has_weights(opts.model) else None

    tokenizer, tok_kind = load_tokenizer(opts, weights_dir, spec)
    train_ex, eval_ex, data_stats = build_datasets(opts, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if cfg.packing:
        train_ds = PackedDataset(train_ex, cfg.seq_len)
        eval_ds = PackedDataset(eval_ex, cfg.seq_len) if eval_ex else None
        collator = PackedBlockCollator(pad_token_id=pad_id, rows="flatten")
        data_stats["packed_rows"] = len(train_ds)
        data_stats["packing_efficiency"] = round(train_ds.efficiency(), 4)
    else:
        train_ds, eval_ds = train_ex, (eval_ex or None)
        collator = PaddingCollator(pad_token_id=pad_id)
    total_steps = opts.max_steps or math.ceil(steps_per_epoch(len(train_ds), cfg) * opts.epochs)
    resume_ckpt = resolve_resume(opts, out)

    if is_main_process():
        import shutil

        shutil.rmtree(out / "ranks", ignore_errors=True)
        write_yaml(out / "plan.yaml", resolved_plan_yaml(opts))
        (out / "train_options.json").write_text(json.dumps(opts.to_json(), indent=2) + "\n")
    ds_path = prepare_deepspeed(opts, out)

    random_init = weights_dir is None
    base_dir = out / "base_model" if (random_init and cfg.is_adapter) else None
    save_base = base_dir if (base_dir is not None and is_main_process()) else None
    if save_base is not None and (base_dir / "config.json").is_file() and resume_ckpt:
        save_base = None  # resuming: the saved base is the same seeded init

    def _model():
        m, info = build_model(spec, cfg, weights_dir=weights_dir, vocab_size=len(tokenizer), seed=opts.seed,
                              device=device, save_random_init_to=save_base)
        if base_dir is not None and hasattr(m, "peft_config"):
            for pc in m.peft_config.values():
                pc.base_model_name_or_path = str(base_dir.resolve())
        return m, info

    if random_init:  # small by construction: build before DeepSpeed's zero.Init context exists
        model, model_info = _model()
        args = training_arguments(opts, out, has_eval=eval_ds is not None, total_steps=total_steps, ds_path=ds_path,
                                  random_init=random_init, device=device, notes=notes)
    else:  # pretrained: TrainingArguments first so ZeRO-3 partitions while loading
        args = training_arguments(opts, out, has_eval=eval_ds is not None, total_steps=total_steps, ds_path=ds_path,
                                  random_init=random_init, device=device, notes=notes)
        model, model_info = _model()
    notes += model_info.pop("notes", [])
    if random_init:  # a fresh model takes the tokenizer's special tokens (no "aligned" warning later)
        for obj in (getattr(model, "config", None), getattr(model, "generation_config", None)):
            if obj is not None:
                for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                    val = getattr(tokenizer, key, None)
                    if val is not None:
                        setattr(obj, key, val)
    if cfg.chunked_ce and not args.use_liger_kernel:
        notes.append("chunked cross-entropy: trainer.loss (torch, checkpointed chunks); Liger needs CUDA + liger_kernel")

    log(f"model {opts.model} ({resolved.how}), {model_info['trainable_params']:,} trainable of "
        f"{model_info['total_params']:,} params, method {cfg.method}, device {device} x{world}", opts)
    log(f"data: {data_stats['train_examples']} train / {data_stats['eval_examples']} eval examples, "
        f"{data_stats.get('truncated', 0)} truncated to {cfg.seq_len} tokens, {data_stats.get('bad_lines', 0)} bad "
        f"lines skipped, tokenizer {tok_kind}" + (f", {len(train_ds)} packed rows" if cfg.packing else ""), opts)
    for n in notes:
        log(f"note: {n}", opts)

    metrics = MetricsCallback(out / "metrics.jsonl")
    callbacks = [metrics, LossPlotCallback(out / "metrics.jsonl", out / "loss.png",
                                           title=f"{opts.model} · {cfg.method} · {device} x{world}")]
    if not opts.quiet:
        callbacks.append(RichProgressCallback(metrics))
    if args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=int(opts.early_stopping_patience)))

    Trainer = make_trainer_class()
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
                      processing_class=tokenizer, callbacks=callbacks)
    trainer.chunked_ce = bool(cfg.chunked_ce and not args.use_liger_kernel)
    trainer.ce_chunk_size = opts.chunk_size
    strip_default_printers(trainer)

    if resume_ckpt:
        log(f"resuming from {resume_ckpt}", opts)
    train_result = trainer.train(resume_from_checkpoint=resume_ckpt)

    final_dir = out / ("adapter" if cfg.is_adapter else "model")
    trainer.save_model(str(final_dir))  # DeepSpeed ZeRO-3: gathers 16-bit weights (config flag)
    if is_main_process():
        tokenizer.save_pretrained(str(final_dir))
        if cfg.is_adapter and base_dir is not None and (base_dir / "config.json").is_file():
            tokenizer.save_pretrained(str(base_dir))

    rank_dir = out / "ranks"
    rank_dir.mkdir(exist_ok=True)
    (rank_dir / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(
        {"rank": int(os.environ.get("RANK", "0")), "world_size": world, "steps": trainer.state.global_step}) + "\n")
    summary = make_summary(opts, spec, cfg, metrics, trainer, train_result, data_stats, model_info, notes,
                           device, world, final_dir, t_start, peak_memory())
    if is_main_process():
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if not opts.quiet:
            print_summary(summary)
    return summary


def make_summary(opts, spec, cfg, metrics, trainer, train_result, data_stats, model_info, notes, device, world,
                 final_dir, t_start, peak) -> dict:
    rows = [r for r in metrics.rows if r.get("loss") is not None]
    evals = [r for r in metrics.rows if r.get("eval_loss") is not None]
    losses = [r["loss"] for r in rows]
    k = max(1, min(5, len(losses) // 4)) if losses else 1
    # steady-state throughput: skip the first two steps (allocator warm-up, compile)
    steady = [r for r in rows if r["step"] > 2 and r.get("step_time_s")] or [r for r in rows if r.get("step_time_s")]
    tok = sum(r.get("tokens", 0) for r in steady)
    secs = sum(r.get("step_time_s", 0.0) for r in steady)
    measured = {"device": device if device == "cpu" else f"cuda:{_cuda_name()}", "processes": world,
                "tokens_per_s": (tok / secs) if secs else None,
                "tokens_per_s_per_process": (tok / secs / world) if secs else None,
                "step_time_s": (secs / len(steady)) if steady else None} | peak
    gpu = gpu_name_here(opts.gpu)
    pred = predictions(spec, cfg, gpu, lengths=data_stats.get("lengths"))
    comparable = device == "cuda" and opts.gpu is None and gpu is not None
    cmp: dict[str, Any] = {"comparable": comparable}
    if not comparable:
        cmp["why"] = ("measured on CPU; the planner predicts a GPU (" + str(pred.get("gpu")) + ")" if device == "cpu"
                      else "the GPU here is not the one predicted for")
    if pred.get("peak_reserved_bytes") and peak.get("peak_mem_bytes"):
        cmp["peak_memory_measured_over_predicted"] = peak["peak_mem_bytes"] / pred["peak_reserved_bytes"]
    per_gpu_pred = pred.get("tokens_per_s_per_gpu") or (pred.get("tokens_per_s") / cfg.world_size
                                                        if pred.get("tokens_per_s") else None)
    if per_gpu_pred and measured["tokens_per_s_per_process"]:
        cmp["tokens_per_s_measured_over_predicted"] = measured["tokens_per_s_per_process"] / per_gpu_pred
    return {
        "model": opts.model, "method": cfg.method.value, "config": cfg.to_plan_yaml(),
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
        "params": model_info,
        "data": {k: v for k, v in data_stats.items() if k != "lengths"},
        "first_loss": losses[0] if losses else None,
        "final_loss": (sum(losses[-k:]) / k) if losses else None,
        "loss_fell": bool(losses) and (sum(losses[-k:]) / k) < (sum(losses[:k]) / k),
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "best_eval_loss": min(r["eval_loss"] for r in evals) if evals else None,
        "train_runtime_s": (train_result.metrics or {}).get("train_runtime"),
        "wall_time_s": time.time() - t_start,
        "tokens_trained": metrics.train_tokens,
        "measured": measured,
        "predicted": pred,
        "comparison": cmp,
        "outputs": {"dir": opts.out, "final": str(final_dir), "metrics": str(Path(opts.out) / "metrics.jsonl"),
                    "loss_png": str(Path(opts.out) / "loss.png"), "plan_yaml": str(Path(opts.out) / "plan.yaml")},
        "notes": notes,
    }


def _cuda_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""


def _gib(b) -> str:
    return f"{b / 2**30:.2f} GiB" if b else "–"


def print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(stderr=True)
    m, p, cmp = s["measured"], s["predicted"], s["comparison"]
    t = Table(title=f"tuneplan train · {s['model']} · {s['method']} · {s['steps']} steps", title_justify="left")
    t.add_column("")
    t.add_column("measured", justify="right")
    t.add_column(f"predicted ({p.get('gpu', '?')})", justify="right")
    mem_kind = {"cpu_rss": "peak memory (CPU RSS)", "cuda_reserved": "peak memory (reserved)"}.get(
        m.get("peak_mem_kind"), "peak memory")
    t.add_row(mem_kind, _gib(m.get("peak_mem_bytes")), _gib(p.get("peak_reserved_bytes")))
    if m.get("peak_allocated_bytes") or p.get("peak_allocated_bytes"):
        t.add_row("peak allocated", _gib(m.get("peak_allocated_bytes")), _gib(p.get("peak_allocated_bytes")))
    tps = m.get("tokens_per_s_per_process")
    ptps = p.get("tokens_per_s_per_gpu") or p.get("tokens_per_s")
    t.add_row("tokens/s per device", f"{tps:,.0f}" if tps else "–", f"{ptps:,.0f}" if ptps else "–")
    t.add_row("loss first → last", f"{s['first_loss']:.3f} → {s['final_loss']:.3f}" if s["first_loss"] else "–", "")
    if s.get("final_eval_loss") is not None:
        t.add_row("eval loss (last / best)", f"{s['final_eval_loss']:.3f} / {s['best_eval_loss']:.3f}", "")
    c.print(t)
    if not cmp.get("comparable"):
        c.print(f"[dim]not comparable: {cmp.get('why')}[/dim]")
    for key in ("memory_error", "throughput_error"):
        if p.get(key):
            c.print(f"[dim]prediction unavailable: {p[key]}[/dim]")
    c.print(f"outputs in {s['outputs']['dir']}: metrics.jsonl, loss.png, plan.yaml, summary.json, "
            f"{Path(s['outputs']['final']).name}/", highlight=False)


def main(argv: list[str] | None = None) -> int:
    """Worker entry point for launched ranks: `python -m trainer.run OUT/train_options.json`."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m trainer.run TRAIN_OPTIONS.json", file=sys.stderr)
        return 2
    opts = TrainOptions.from_json(json.loads(Path(argv[0]).read_text()))
    try:
        run_training(opts)
    except PlanError as exc:
        if is_main_process():
            print(f"tuneplan: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
