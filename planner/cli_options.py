"""The configuration flags shared by `plan`, `profile run` and `train` — declared once.

Each option is `None` by default: None means "not fixed by the user" (the planner searches
it); `fixed_dimensions()` tells which ones the user fixed and `config_from_options()` builds
a TrainConfig with defaults for the rest.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from planner.config import TrainConfig

Model = Annotated[str, typer.Option("--model", "-m", help="Preset (llama-3.1-8b), size alias (7b, 8b, 70b), or a path to a config.json / model directory.")]
Gpus = Annotated[Optional[int], typer.Option("--gpus", help="GPUs per node.")]
Nodes = Annotated[Optional[int], typer.Option("--nodes", help="Nodes.")]
Gpu = Annotated[Optional[str], typer.Option("--gpu", help="GPU type (tables/gpus.csv), default h100-80gb.")]
Method = Annotated[Optional[str], typer.Option("--method", help="full | freeze | lora | qlora (searched over if omitted).")]
LoraRank = Annotated[Optional[int], typer.Option("--lora-rank", help="LoRA rank r.")]
LoraAlpha = Annotated[Optional[int], typer.Option("--lora-alpha", help="LoRA alpha.")]
LoraDropout = Annotated[Optional[float], typer.Option("--lora-dropout", help="LoRA dropout.")]
LoraTarget = Annotated[Optional[str], typer.Option("--lora-target", help="all-linear, or comma-separated module names (q_proj,v_proj).")]
DoubleQuant = Annotated[Optional[bool], typer.Option("--double-quant/--no-double-quant", help="QLoRA double quantisation.")]
Precision = Annotated[Optional[str], typer.Option("--precision", help="bf16-mixed | bf16-true | fp16-mixed | fp32.")]
Optim = Annotated[Optional[str], typer.Option("--optimizer", help="adamw | adamw-8bit | paged-adamw-8bit | sgd | adafactor.")]
Zero = Annotated[Optional[int], typer.Option("--zero", help="DeepSpeed ZeRO stage 0-3 (FSDP full shard = 3).")]
Offload = Annotated[Optional[str], typer.Option("--offload", help="none | optimizer | optimizer+params.")]
MicroBatch = Annotated[Optional[int], typer.Option("--micro-batch", help="Sequences per GPU per forward (per_device_train_batch_size).")]
GradAccum = Annotated[Optional[int], typer.Option("--grad-accum", help="Gradient accumulation steps.")]
SeqLen = Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per sequence (cutoff_len).")]
Packing = Annotated[Optional[bool], typer.Option("--packing/--no-packing", help="Pack examples into full rows.")]
Checkpointing = Annotated[Optional[str], typer.Option("--checkpointing", help="none | full | selective.")]
AttentionOpt = Annotated[Optional[str], typer.Option("--attention", help="flash | sdpa | eager.")]
ChunkedCE = Annotated[Optional[bool], typer.Option("--chunked-ce/--no-chunked-ce", help="Chunked / fused cross-entropy.")]
Compile = Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]

# CLI option name → TrainConfig field
FIELD_OF = {
    "gpus": "gpus", "nodes": "nodes", "method": "method", "lora_rank": "lora_rank", "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout", "lora_target": "lora_target", "double_quant": "double_quant",
    "precision": "precision", "optimizer": "optimizer", "zero": "zero", "offload": "offload",
    "micro_batch": "micro_batch", "grad_accum": "grad_accum", "seq_len": "seq_len", "packing": "packing",
    "checkpointing": "checkpointing", "attention": "attention", "chunked_ce": "chunked_ce", "compile": "compile",
}


def fixed_dimensions(options: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields the user set on the command line (None = not set).

    `options` may hold a command's other arguments too (pass its `locals()`): only the
    names in FIELD_OF are read."""
    return {FIELD_OF[k]: v for k, v in options.items() if k in FIELD_OF and v is not None}


def config_from_options(options: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """TrainConfig from the flags the user set, defaults (or `base`) for the rest."""
    fixed = fixed_dimensions(options)
    if base is None:
        return TrainConfig(**fixed)
    return base.replace(**fixed)
