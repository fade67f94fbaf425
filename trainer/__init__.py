"""tuneplan trainer: data side (formats, chat template + masking, packing, local tokenizer,
synthetic sample data). Heavy dependencies (torch, transformers) are imported lazily.

Public API (importable as ``trainer.<name>``):

    build_sft_dataset(path_or_records, tokenizer, cutoff_len, train_on_prompt=False,
                      skip_bad_lines=False, fmt="auto", chat_template=None) -> (examples, stats)
    load_conversations(path_or_records, fmt="auto", skip_bad_lines=False) -> (convs, stats)
    split_train_val(examples, val_size, seed=42) -> (train, val)
    DataError                       # str(e) == "file:line: reason"
    encode_conversation(tokenizer, messages, train_on_prompt=False, chat_template=None)
    FALLBACK_CHAT_TEMPLATE
    pack_ffd, PackedDataset, PackedBlockCollator, flattening_collator, prepare_model_for_packing,
    PaddingCollator, length_grouped_batches, LengthGroupedBatchSampler
    build_local_tokenizer(vocab_size=2048, out_dir=None)
    write_sample_dataset(path, fmt="messages", n=600, seed=0), default_sample_path(fmt)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "data": ["DataError", "Conversation", "detect_format", "normalize_record", "load_conversations",
             "build_sft_dataset", "split_train_val"],
    "template": ["FALLBACK_CHAT_TEMPLATE", "TemplateError", "resolve_chat_template",
                 "assistant_spans", "encode_conversation"],
    "packing": ["IGNORE_INDEX", "pack_ffd", "PackedDataset", "PackedBlockCollator",
                "flattening_collator", "prepare_model_for_packing", "PaddingCollator", "length_grouped_batches",
                "LengthGroupedBatchSampler"],
    "tokenizer": ["build_local_tokenizer", "CHATML_TEMPLATE", "SPECIAL_TOKENS"],
    "sample_data": ["write_sample_dataset", "default_sample_path", "generate_conversations"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
