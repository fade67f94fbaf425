"""LoRA export: merge an adapter into its base model and save a plain HF model.

    tuneplan export --adapter runs/x/adapter --out runs/x/merged --merge

The base is the adapter's `base_model_name_or_path` (a local directory: `tuneplan train`
saves a randomly initialised base next to the adapter as `base_model/`), or `--base DIR`.
QLoRA adapters are merged into the 16-bit base (the usual practice: merging into NF4
weights would re-quantise the sum). The merged model gives the same logits as base +
adapter (tests/test_trainer.py checks this). Without `--merge` the adapter is re-saved as
is, with the tokenizer.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from planner.errors import PlanError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "tuneplan_tokenizer.json")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def resolve_base(adapter: Path, base: str | Path | None) -> Path:
    from trainer.model import base_model_path_of_adapter, has_weights

    cand = Path(base) if base else None
    if cand is None:
        name = base_model_path_of_adapter(adapter)
        if not name:
            raise PlanError(f"{adapter}/adapter_config.json names no base model: give --base DIR")
        cand = Path(name)
        if not cand.is_absolute() and not cand.exists():
            cand = adapter / name
    if not has_weights(cand):
        raise PlanError(f"base model {cand} is not a local model directory with weights (give --base DIR); "
                        "nothing is downloaded")
    return cand


def export_adapter(adapter, out, *, merge: bool = True, base=None, dtype: str = "auto") -> dict:
    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise PlanError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
    if out.resolve() == adapter.resolve():
        raise PlanError("--out must differ from --adapter")
    out.mkdir(parents=True, exist_ok=True)
    if not merge:
        for f in adapter.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
        return {"out": str(out), "merged": False}

    from trainer.run import quiet_imports

    quiet_imports()
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    base_dir = resolve_base(adapter, base)
    torch_dtype = {"auto": "auto", "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                   "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise PlanError(f"--dtype {dtype!r}: choose auto, bf16, fp16 or fp32")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), local_files_only=True, dtype=torch_dtype)
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    merged = model.merge_and_unload(safe_merge=True)
    merged.config.use_cache = True
    merged.save_pretrained(str(out))
    _copy_tokenizer(adapter if (adapter / "tokenizer_config.json").is_file() else base_dir, out)
    n = sum(p.numel() for p in merged.parameters())
    return {"out": str(out), "merged": True, "base": str(base_dir), "params": n}
