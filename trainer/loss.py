"""Chunked cross-entropy: the logits of the whole sequence never exist at once.

The library path is Liger's fused linear cross-entropy (`TrainingArguments(use_liger_kernel=True)`,
Triton, CUDA only); `trainer.run` uses it when `liger_kernel` is importable and CUDA is
present. Everywhere else (CPU, no liger) this module does the same thing in plain torch:

1. run the model with `logits_to_keep=1` (the lm_head sees one position per row, so the
   [tokens × vocab] logits are not built) and capture the decoder's final hidden states
   with a forward hook on the decoder module;
2. keep only positions whose shifted label is not -100 (prompt tokens cost nothing);
3. for each chunk of `chunk_size` positions: `lm_head(h) → fp32 → cross_entropy(sum)` inside
   `torch.utils.checkpoint`, so a chunk's logits are freed after its forward and recomputed
   in backward. Peak logits memory: `chunk_size × vocab × 4` bytes instead of
   `tokens × vocab × (2 + 4 + 4 + …)` (DESIGN.md §2, logits trap).

Running the full model forward (not the decoder alone) keeps DDP / DeepSpeed / peft wrappers
in the loop. The loss equals transformers' `ForCausalLMLoss` (sum over trainable tokens /
`num_items_in_batch`), tested in tests/test_trainer.py.
"""
from __future__ import annotations

IGNORE_INDEX = -100
DEFAULT_CHUNK = 1024


def causal_lm_of(model):
    """The transformers *ForCausalLM inside DDP / DeepSpeed / peft / compile wrappers."""
    m = model
    for _ in range(8):
        if hasattr(m, "module") and not hasattr(m, "lm_head") and not hasattr(m, "get_base_model"):
            m = m.module  # DDP / DeepSpeedEngine
            continue
        if hasattr(m, "_orig_mod"):
            m = m._orig_mod  # torch.compile
            continue
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()  # peft
            continue
        break
    return m


def decoder_of(causal_lm):
    dec = getattr(causal_lm, "model", None)
    if dec is None and hasattr(causal_lm, "get_decoder"):
        dec = causal_lm.get_decoder()
    if dec is None:
        raise ValueError(f"cannot find the decoder of {type(causal_lm).__name__} for chunked cross-entropy")
    return dec


def chunked_cross_entropy_sum(hidden, labels, lm_head, chunk_size: int = DEFAULT_CHUNK):
    """(sum of token losses over shifted labels != -100, count). hidden: [B, T, H]; labels: [B, T]."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = shift.reshape(-1).to(h.device)
    keep = (y != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    n = int(keep.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h, y = h.index_select(0, keep), y.index_select(0, keep)

    def piece(hc, yc):
        logits = lm_head(hc).float()
        return F.cross_entropy(logits, yc, reduction="sum")

    total = None
    for s in range(0, n, chunk_size):
        hc, yc = h[s:s + chunk_size], y[s:s + chunk_size]
        part = checkpoint(piece, hc, yc, use_reentrant=False) if torch.is_grad_enabled() else piece(hc, yc)
        total = part if total is None else total + part
    return total, n


def chunked_causal_lm_loss(model, inputs: dict, num_items_in_batch=None, chunk_size: int = DEFAULT_CHUNK):
    """Forward `model` and return (loss, outputs) with a chunked CE over the captured hidden states."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    lm = causal_lm_of(model)
    decoder = decoder_of(lm)
    captured = {}

    def hook(_module, _args, output):
        captured["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = decoder.register_forward_hook(hook)
    try:
        outputs = model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    total, n = chunked_cross_entropy_sum(captured["h"], labels, lm.get_output_embeddings(), chunk_size)
    if num_items_in_batch is not None:
        denom = num_items_in_batch.to(total.device) if hasattr(num_items_in_batch, "to") else num_items_in_batch
    else:
        denom = max(n, 1)
    return total / denom, outputs
