"""`tuneplan train` and `tuneplan export` (registered by planner/cli.py).

No torch / transformers import at module level: `tuneplan plan` imports this module and must
stay pure arithmetic. Everything heavy is imported inside the command functions.

Configuration precedence: TrainConfig defaults < `--config plan.yaml` < command-line flags.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from planner import cli_options as o
from planner.errors import PlanError

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="plan.yaml (from `tuneplan plan --out DIR`); flags override it.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Preset (tiny, llama-3.1-8b), size alias, config.json path (random init) or a local HF model directory (weights).")]
FreezeLayers = Annotated[Optional[int], typer.Option("--freeze-trainable-layers", help="--method freeze: how many of the last decoder layers train.")]
DataOpt = Annotated[Optional[list[str]], typer.Option("--data", help="Training .json/.jsonl (alpaca, sharegpt or messages; auto-detected); repeatable. Default (or 'bundled'): the generated synthetic SFT set.")]
EvalDataOpt = Annotated[Optional[list[str]], typer.Option("--eval-data", help="Evaluation file(s).")]
ValSize = Annotated[Optional[float], typer.Option("--val-size", help="Hold out this fraction (<1) or count (>=1) of the training examples for evaluation.")]
EvalSteps = Annotated[Optional[int], typer.Option("--eval-steps", help="Evaluate every N optimizer steps (default: 5 times per run).")]
SaveSteps = Annotated[Optional[int], typer.Option("--save-steps", help="Checkpoint every N steps (default: 4 times per run).")]
SaveLimit = Annotated[Optional[int], typer.Option("--save-total-limit", help="Keep the last K checkpoints (default 2).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --out (same data order, optimizer, scheduler, RNG).")]
ResumeFrom = Annotated[Optional[Path], typer.Option("--resume-from", help="Continue from this checkpoint directory.")]
Epochs = Annotated[Optional[float], typer.Option("--epochs", help="Training epochs (default 1).")]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps (overrides --epochs).")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: 2e-4 adapters, 5e-5 full on pretrained weights, 1e-3 on random init).")]
Warmup = Annotated[Optional[float], typer.Option("--warmup-ratio", help="Warm-up fraction of the steps (default 0.05).")]
Scheduler = Annotated[Optional[str], typer.Option("--scheduler", help="cosine | linear | constant | constant_with_warmup | ... (default cosine).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed for init, data order and dropout (default 42).")]
TrainOnPrompt = Annotated[bool, typer.Option("--train-on-prompt", help="Train on every token, not only assistant turns.")]
SkipBad = Annotated[bool, typer.Option("--skip-bad-lines", help="Skip malformed records (reported) instead of stopping.")]
Neftune = Annotated[Optional[float], typer.Option("--neftune-alpha", help="NEFTune noise alpha (e.g. 5).")]
EarlyStop = Annotated[Optional[int], typer.Option("--early-stopping-patience", help="Stop after N evaluations without eval-loss improvement.")]
PrintLaunch = Annotated[bool, typer.Option("--print-launch", help="Print the multi-process launch command and exit.")]
Hostfile = Annotated[Optional[Path], typer.Option("--hostfile", help="DeepSpeed hostfile for multi-node runs.")]
Launcher = Annotated[Optional[str], typer.Option("--launcher", help="torchrun | deepspeed (default torchrun; deepspeed with --hostfile).")]
MasterAddr = Annotated[Optional[str], typer.Option("--master-addr", help="Rendezvous host for multi-node runs.")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (default runs/<model>-<method>).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary table (summary.json is still written).")]

# plan.yaml training keys (HF / LLaMA-Factory names) → TrainOptions field
YAML_TRAIN_KEYS = {
    "model_name_or_path": "model", "model": "model", "dataset": "data", "train_file": "data",
    "eval_dataset": "eval_data", "val_size": "val_size", "eval_steps": "eval_steps", "save_steps": "save_steps",
    "save_total_limit": "save_total_limit", "num_train_epochs": "epochs", "max_steps": "max_steps",
    "learning_rate": "lr", "warmup_ratio": "warmup_ratio", "lr_scheduler_type": "scheduler", "seed": "seed",
    "train_on_prompt": "train_on_prompt", "neftune_noise_alpha": "neftune_alpha",
    "early_stopping_patience": "early_stopping_patience", "gpu": "gpu", "output_dir": "out",
}


def _warn(msg: str) -> None:
    print(f"tuneplan: warning: {msg}", file=sys.stderr)


def read_plan_yaml(path: Path) -> tuple[dict, dict]:
    """(config mapping for TrainConfig.from_mapping, training options) from a plan.yaml."""
    import yaml

    if not path.is_file():
        raise PlanError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected a mapping of keys to values")
    # plan --out may nest the chosen configuration; accept {config: {...}} / {plan: {...}} too
    for key in ("config", "plan", "recommended"):
        if isinstance(data.get(key), dict):
            data = {**{k: v for k, v in data.items() if k != key}, **data[key]}
    base = path.parent
    ds = data.get("deepspeed")
    if isinstance(ds, str) and ds and not Path(ds).is_absolute():
        ds = str((base / ds).resolve())
        data["deepspeed"] = ds
        if not Path(ds).is_file():
            raise PlanError(f"{path}: deepspeed config {ds} not found")
    train: dict[str, Any] = {}
    for key, field in YAML_TRAIN_KEYS.items():
        if key in data and data[key] is not None and field not in train:
            v = data[key]
            if field in ("data", "eval_data"):
                if v in ("bundled", "", []):
                    continue
                v = [v] if isinstance(v, str) else list(v)
                v = [str(p) if Path(p).is_absolute() or Path(p).exists() else str(base / p) for p in v]
            if field == "max_steps" and int(v) <= 0:
                continue
            if field == "out":
                continue  # the yaml's own output_dir is informative; --out decides
            train[field] = v
    if isinstance(ds, str) and ds:
        train["deepspeed"] = ds
    # plan --out writes model_name_or_path = the Hub id (informative) and model_preset = the
    # preset the plan was made for: train from a local directory if there is one, else the preset
    # (randomly initialised: nothing is downloaded)
    name = data.get("model_name_or_path")
    local = name and (Path(str(name)).exists() or (base / str(name)).exists())
    if data.get("model_preset") and not local:
        train["model"] = str(data["model_preset"])
    elif local and not Path(str(name)).exists():
        train["model"] = str(base / str(name))
    return data, train


def build_options(local: dict[str, Any]) -> tuple[Any, dict]:
    """TrainOptions from the command's arguments (`locals()` of `train`); returns (opts, launch)."""
    from planner.config import TrainConfig
    from trainer.run import TrainOptions

    cfg_map: dict = {}
    yaml_train: dict = {}
    if local.get("config"):
        cfg_map, yaml_train = read_plan_yaml(Path(local["config"]))
    base_cfg = TrainConfig.from_mapping(cfg_map, warn=_warn) if cfg_map else TrainConfig()
    if "freeze_trainable_layers" in cfg_map:
        base_cfg = base_cfg.replace(freeze_trainable_layers=int(cfg_map["freeze_trainable_layers"]))
    for key in ("lora_alpha", "lora_dropout", "lora_rank"):
        if key in cfg_map and cfg_map[key] is not None:
            base_cfg = base_cfg.replace(**{key: cfg_map[key]})
    cfg = o.config_from_options(local, base=base_cfg)
    if local.get("freeze_trainable_layers") is not None:
        cfg = cfg.replace(freeze_trainable_layers=local["freeze_trainable_layers"])

    model = local.get("model") or yaml_train.get("model")
    if not model:
        raise PlanError("no model: give --model (e.g. --model tiny) or --config plan.yaml")
    flag_fields = {"data": "data", "eval_data": "eval_data", "val_size": "val_size", "eval_steps": "eval_steps",
                   "save_steps": "save_steps", "save_total_limit": "save_total_limit", "epochs": "epochs",
                   "max_steps": "max_steps", "lr": "lr", "warmup_ratio": "warmup_ratio", "scheduler": "scheduler",
                   "seed": "seed", "neftune_alpha": "neftune_alpha",
                   "early_stopping_patience": "early_stopping_patience", "gpu": "gpu"}
    kw: dict[str, Any] = {k: v for k, v in yaml_train.items() if k != "model"}
    for arg, fld in flag_fields.items():
        v = local.get(arg)
        if v is not None and v != []:
            kw[fld] = v
    for flag in ("train_on_prompt", "skip_bad_lines", "quiet"):
        if local.get(flag):
            kw[flag] = True
    if kw.get("val_size") is not None:
        vs = float(kw["val_size"])
        if vs <= 0:
            raise PlanError(f"--val-size must be > 0, got {vs:g}")
        kw["val_size"] = int(vs) if vs >= 1 else vs
    for name in ("epochs", "lr"):
        if kw.get(name) is not None and float(kw[name]) <= 0:
            raise PlanError(f"--{name} must be > 0")
    for name in ("max_steps", "eval_steps", "save_steps", "save_total_limit"):
        if kw.get(name) is not None and int(kw[name]) < 1:
            raise PlanError(f"--{name.replace('_', '-')} must be >= 1")
    if local.get("resume_from"):
        kw["resume"] = str(local["resume_from"])
    elif local.get("resume"):
        kw["resume"] = "last"
    out = local.get("out")
    if out is None:
        stem = Path(str(model)).name.replace(".json", "") or "model"
        out = Path("runs") / f"{stem}-{cfg.method.value}"
    kw["out"] = str(out)
    if kw.get("data") in (["bundled"], ["sample"]):
        kw["data"] = None  # the generated sample set (trainer.sample_data)
    if kw.get("data") or kw.get("eval_data"):
        for p in list(kw.get("data") or []) + list(kw.get("eval_data") or []):
            if not Path(p).exists():
                raise PlanError(f"--data {p}: no such file or directory")
    precision_keys = ("precision", "bf16", "fp16", "pure_bf16")
    kw["precision_from_default"] = local.get("precision") is None and not any(k in cfg_map for k in precision_keys)
    opts = TrainOptions(model=str(model), cfg=cfg, **kw)
    launch = {"print_launch": bool(local.get("print_launch")), "hostfile": local.get("hostfile"),
              "launcher": local.get("launcher"), "master_addr": local.get("master_addr")}
    return opts, launch


def _needs_launch(cfg) -> bool:
    return (cfg.world_size > 1 or cfg.zero > 0) and "LOCAL_RANK" not in os.environ


def train(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    gpus: o.Gpus = None,
    nodes: o.Nodes = None,
    gpu: o.Gpu = None,
    method: o.Method = None,
    lora_rank: o.LoraRank = None,
    lora_alpha: o.LoraAlpha = None,
    lora_dropout: o.LoraDropout = None,
    lora_target: o.LoraTarget = None,
    double_quant: o.DoubleQuant = None,
    freeze_trainable_layers: FreezeLayers = None,
    precision: o.Precision = None,
    optimizer: o.Optim = None,
    zero: o.Zero = None,
    offload: o.Offload = None,
    micro_batch: o.MicroBatch = None,
    grad_accum: o.GradAccum = None,
    seq_len: o.SeqLen = None,
    packing: o.Packing = None,
    checkpointing: o.Checkpointing = None,
    attention: o.AttentionOpt = None,
    chunked_ce: o.ChunkedCE = None,
    compile: o.Compile = None,
    data: DataOpt = None,
    eval_data: EvalDataOpt = None,
    val_size: ValSize = None,
    eval_steps: EvalSteps = None,
    save_steps: SaveSteps = None,
    save_total_limit: SaveLimit = None,
    resume: Resume = False,
    resume_from: ResumeFrom = None,
    epochs: Epochs = None,
    max_steps: MaxSteps = None,
    lr: Lr = None,
    warmup_ratio: Warmup = None,
    scheduler: Scheduler = None,
    seed: Seed = None,
    train_on_prompt: TrainOnPrompt = False,
    skip_bad_lines: SkipBad = False,
    neftune_alpha: Neftune = None,
    early_stopping_patience: EarlyStop = None,
    print_launch: PrintLaunch = False,
    hostfile: Hostfile = None,
    launcher: Launcher = None,
    master_addr: MasterAddr = None,
    out: Out = None,
    quiet: Quiet = False,
    json_out: o.Json = False,
) -> None:
    """Train the configuration (a plan.yaml or the same flags as `plan`) end to end."""
    opts, launch = build_options(dict(locals()))
    cfg = opts.cfg
    if launch["print_launch"] or _needs_launch(cfg):
        from trainer.launch import build_launch, run_launch

        outdir = Path(opts.out)
        outdir.mkdir(parents=True, exist_ok=True)
        opts_path = outdir / "train_options.json"
        opts_path.write_text(json.dumps(opts.to_json(), indent=2) + "\n")
        plan = build_launch(opts_path, gpus=cfg.gpus, nodes=cfg.nodes, launcher=launch["launcher"],
                            hostfile=str(launch["hostfile"]) if launch["hostfile"] else None,
                            master_addr=launch["master_addr"])
        if launch["print_launch"]:
            print(plan.describe())
            return
        print(f"tuneplan: launching {cfg.world_size} processes: {plan.shell()}", file=sys.stderr)
        rc = run_launch(plan)
        if rc != 0:
            print(f"tuneplan: error: the launched training exited with code {rc}", file=sys.stderr)
            raise typer.Exit(rc if rc != 2 else 2)
        if json_out:
            summary = outdir / "summary.json"
            if summary.is_file():
                print(summary.read_text().strip())
        return
    from trainer.run import run_training

    summary = run_training(opts)
    if json_out:
        print(json.dumps(summary, default=str))


AdapterOpt = Annotated[Path, typer.Option("--adapter", help="LoRA adapter directory (tuneplan train's OUT/adapter).")]
ExportOut = Annotated[Path, typer.Option("--out", "-o", help="Where to write the merged model.")]
Merge = Annotated[bool, typer.Option("--merge/--no-merge", help="Merge the adapter into the base weights (default) or copy it.")]
BaseOpt = Annotated[Optional[Path], typer.Option("--base", help="Base model directory (default: the adapter's base_model_name_or_path).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto | bf16 | fp16 | fp32 for the merged weights.")]


def export(adapter: AdapterOpt, out: ExportOut, merge: Merge = True, base: BaseOpt = None, dtype: DtypeOpt = "auto",
           json_out: o.Json = False) -> None:
    """Merge a LoRA adapter into its base model and save it."""
    from trainer.export import export_adapter

    res = export_adapter(adapter, out, merge=merge, base=base, dtype=dtype)
    if json_out:
        print(json.dumps(res))
    else:
        what = f"merged into {res.get('base')}" if res.get("merged") else "copied"
        print(f"tuneplan: adapter {adapter} {what} → {res['out']}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.cli train|export ...`: the two commands without the rest of the app
    (tests and debugging); `tuneplan train` is the same function registered in planner/cli.py."""
    from planner.cli import run_app

    app = typer.Typer(name="tuneplan", pretty_exceptions_enable=False, add_completion=False, no_args_is_help=True)
    app.command("train", help="Train the chosen configuration end to end.")(train)
    app.command("export", help="Merge a LoRA adapter into its base model and save it.")(export)
    return run_app(app, argv, "tuneplan")


if __name__ == "__main__":
    sys.exit(main())
