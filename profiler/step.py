"""What one profiled training step does, shared by the cpu, cuda and fake runners.

- `make_batches`: the micro-batches of one optimizer step — random token rows of the
  planned shape `(micro_batch, seq_len)`, or, with packing, random-length examples flattened
  by transformers' `DataCollatorWithFlattening` into one row of `micro_batch·seq_len`
  tokens (position_ids restart at 0 per example, the first label of each example is -100,
  no attention_mask: the model then builds the block-diagonal mask — only with
  `use_cache=False`, which the model config and every call here force).
- `compute_loss`: HF's own loss, or a chunked cross-entropy (`--chunked-ce`): the lm_head
  and the loss run in checkpointed chunks of `CE_CHUNK` tokens, so full-vocabulary logits
  never exist at once.
- `train_step`: forward → backward per micro-batch, then the optimizer step, calling
  `phase(name)` at each boundary ("forward", "backward", "optimizer", then None) so a
  runner can reset / read its peak counters there.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

CE_CHUNK = 1024
PHASES = ("forward", "backward", "optimizer")


@dataclass
class BatchInfo:
    """What the micro-batches of one optimizer step hold."""

    shape: list[int]
    """input_ids shape of one micro-batch."""
    tokens_per_micro_batch: int
    """Real (non-pad) tokens in one micro-batch."""
    examples_per_micro_batch: float
    """Sequences (examples) per micro-batch; > micro_batch when packed."""
    padding_tokens: int = 0
    packed: bool = False
    example_lengths: list[int] = field(default_factory=list)
    """Packed: the example lengths of the first micro-batch."""

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape, "tokens_per_micro_batch": self.tokens_per_micro_batch,
                "examples_per_micro_batch": self.examples_per_micro_batch, "padding_tokens": self.padding_tokens,
                "packed": self.packed, "example_lengths_first_micro_batch": self.example_lengths[:64]}


def packed_lengths(total: int, seq_len: int, rng) -> list[int]:
    """Example lengths filling `total` tokens exactly: uniform in [seq_len/8, seq_len/2]
    (the last one cut to fit), at least 2 tokens each."""
    lo, hi = max(2, seq_len // 8), max(2, seq_len // 2)
    out: list[int] = []
    left = total
    while left > 0:
        n = min(left, rng.randint(lo, hi))
        if left - n == 1:  # never leave a 1-token example
            n += 1
        out.append(n)
        left -= n
    return out


def make_batches(cfg, vocab_size: int, device: str, *, seed: int = 0, fake: bool = False) -> tuple[list[dict], BatchInfo]:
    """`cfg.grad_accum` micro-batches (dicts of tensors on `device`) and what they hold."""
    import random

    import torch

    b, s = cfg.micro_batch, cfg.seq_len
    batches: list[dict] = []
    if not cfg.packing:
        gen = None if fake else torch.Generator().manual_seed(seed)
        for _ in range(cfg.grad_accum):
            ids = torch.randint(0, vocab_size, (b, s), generator=gen)
            if not fake:
                ids = ids.to(device)
            batches.append({"input_ids": ids, "labels": ids})
        return batches, BatchInfo([b, s], b * s, float(b))

    from transformers import DataCollatorWithFlattening

    rng = random.Random(seed)
    coll = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    n_examples = 0
    first_lengths: list[int] = []
    for i in range(cfg.grad_accum):
        lengths = packed_lengths(b * s, s, rng)
        n_examples += len(lengths)
        if i == 0:
            first_lengths = lengths
        feats = [{"input_ids": [rng.randrange(vocab_size) for _ in range(n)]} for n in lengths]
        out = coll(feats, return_tensors="pt")
        batch = {k: out[k] for k in ("input_ids", "labels", "position_ids")}
        if not fake:
            batch = {k: v.to(device) for k, v in batch.items()}
        batches.append(batch)
    info = BatchInfo([1, b * s], b * s, n_examples / cfg.grad_accum, packed=True, example_lengths=first_lengths)
    return batches, info


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.get_output_embeddings()


def chunked_loss(model, batch: dict, chunk: int = CE_CHUNK):
    """Causal-LM loss (mean over labelled tokens) with lm_head + CE in checkpointed chunks."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    decoder, head = _decoder_and_head(model)
    kw = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "attention_mask")}
    hidden = decoder(**kw, use_cache=False).last_hidden_state
    labels = batch["labels"]
    # position t predicts label t+1 (HF ForCausalLMLoss); the last position has no target
    shift = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)

    def part(h, y):
        logits = head(h).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                               reduction="sum")

    total = None
    for i in range(0, hidden.shape[1], chunk):
        p = checkpoint(part, hidden[:, i:i + chunk], shift[:, i:i + chunk], use_reentrant=False)
        total = p if total is None else total + p
    n = (shift != -100).sum()
    return total / n.clamp(min=1)


def compute_loss(module, model, batch: dict, chunked_ce: bool):
    if chunked_ce:
        return chunked_loss(model, batch)
    return module(**batch, use_cache=False).loss


def _noop(_name: str | None) -> None:
    return None


def train_step(module, model, optimizer, batches: list[dict], *, device: str, autocast_dtype: str | None,
               chunked_ce: bool, scaler=None, engine=None, phase: Callable[[str | None], None] = _noop,
               zero_grad: bool = True, keep_loss: bool = True):
    """One optimizer step over `batches` (one per micro-batch); returns the last loss tensor
    (None with `keep_loss=False`: measured steps hold no reference to it during the optimizer
    step, as the fake-tensor oracle does)."""
    import torch

    n = len(batches)
    last = None
    for i, batch in enumerate(batches):
        phase("forward")
        ctx = (torch.autocast(device_type=device, dtype=getattr(torch, autocast_dtype))
               if autocast_dtype and engine is None else contextlib.nullcontext())
        with ctx:
            loss = compute_loss(engine if engine is not None else module, model, batch, chunked_ce)
        phase("backward")
        if engine is not None:
            engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        else:
            scaled = loss / n if n > 1 else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            del scaled
        if keep_loss:
            last = loss.detach()
        del loss
        if engine is not None and i < n - 1:
            engine.step()  # a micro-step: DeepSpeed only counts it (the real step is at the boundary)
    phase("optimizer")
    if engine is not None:
        engine.step()
    else:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)
    phase(None)
    return last
