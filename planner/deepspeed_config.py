"""Write the chosen configuration: `plan.yaml` (HF / LLaMA-Factory names, what `tuneplan train
--config` reads) and, with ZeRO, a DeepSpeed JSON that the HF Trainer accepts unchanged.

The DeepSpeed JSON says `"auto"` wherever the HF Trainer owns the value (batch sizes, gradient
accumulation, clipping, precision flags, optimizer hyper-parameters, bucket sizes derived from
the hidden size), so the two files can never disagree: the Trainer fills them in from
`TrainingArguments` (`transformers.integrations.HfTrainerDeepSpeedConfig.trainer_config_process`).
Writes are atomic (temp file in the same directory + os.replace).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from planner.config import Offload, TrainConfig
from planner.model import ModelSpec

DS_FILENAME = "ds_config.json"
PLAN_FILENAME = "plan.yaml"


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any] | None:
    """DeepSpeed JSON for `cfg`, or None without ZeRO (plain DDP needs no DeepSpeed)."""
    if cfg.zero == 0:
        return None
    zo: dict[str, Any] = {
        "stage": cfg.zero,
        "overlap_comm": True,           # reduce gradients while backward runs (the throughput model assumes it)
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",   # HF: hidden_size²
    }
    if cfg.zero in (1, 2):
        zo.update({"allgather_partitions": True, "allgather_bucket_size": 5e8, "reduce_scatter": True})
    if cfg.zero == 3:
        zo.update({
            "stage3_prefetch_bucket_size": "auto",          # HF: 0.9·hidden_size²
            "stage3_param_persistence_threshold": "auto",   # HF: 10·hidden_size
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "sub_group_size": 1e9,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if cfg.offload in (Offload.OPTIMIZER, Offload.OPTIMIZER_PARAMS):
        zo["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload == Offload.OPTIMIZER_PARAMS:
        zo["offload_param"] = {"device": "cpu", "pin_memory": True}
    ds: dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                 "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zo,
        "steps_per_print": 1000000,
        "wall_clock_breakdown": False,
    }
    if cfg.offload != Offload.NONE:
        # ZeRO-Offload runs the step on the CPU: DeepSpeed wants its own (CPU) Adam, so the
        # optimizer is declared here; HF fills every hyper-parameter ("auto") from its arguments.
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                       "weight_decay": "auto"}}
    return ds


def plan_yaml(model: ModelSpec, cfg: TrainConfig, *, ds_path: str | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """plan.yaml content: `TrainConfig.to_plan_yaml()` + the model + the DeepSpeed file."""
    d: dict[str, Any] = {"model_name_or_path": model.hf_id or model.name, "model_preset": model.name}
    d.update(cfg.to_plan_yaml())
    if ds_path:
        d["deepspeed"] = ds_path
    if extra:
        d.update(extra)
    return d


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write to a temp file in the target directory, fsync, then os.replace (never a half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _yaml_dump(d: dict[str, Any], header: str = "") -> str:
    import yaml  # lazily: only `--out` needs it
    body = yaml.safe_dump(d, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return header + body


def write_plan(out_dir: str | Path, model: ModelSpec, cfg: TrainConfig, *, comment: str = "",
               extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write DIR/plan.yaml (+ DIR/ds_config.json with ZeRO). `deepspeed:` in plan.yaml is the
    JSON's file name, relative to plan.yaml's directory. Returns the paths written."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    ds = deepspeed_config(cfg)
    if ds is not None:
        written["deepspeed"] = atomic_write(out / DS_FILENAME, json.dumps(ds, indent=2) + "\n")
    header = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    d = plan_yaml(model, cfg, ds_path=DS_FILENAME if ds is not None else None, extra=extra)
    written["plan"] = atomic_write(out / PLAN_FILENAME, _yaml_dump(d, header))
    return written


__all__ = ["deepspeed_config", "plan_yaml", "write_plan", "atomic_write", "DS_FILENAME", "PLAN_FILENAME"]
