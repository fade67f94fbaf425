"""Batching: packing without cross-contamination, and padding with length grouping.

Packed (padding-free) batches
-----------------------------
Batches are made by transformers' ``DataCollatorWithFlattening``: the examples of a batch are
concatenated into one row ``[1, total]``, ``position_ids`` restart at 0 for every example and
the first label of every example is set to -100 (so no token learns to predict the start of
the next example). There is **no** ``attention_mask``. In transformers 5.x
(``masking_utils._preprocess_mask_arguments`` + ``find_packed_sequence_indices``) the model
derives a block-diagonal causal mask from the position_ids resets **only when**
``attention_mask is None`` **and** ``past_key_values is None``: run the model with
``use_cache=False`` (:func:`prepare_model_for_packing` sets ``model.config.use_cache = False``);
the config default is True, and then Llama creates a ``DynamicCache`` -- in train mode too --
and every sequence silently attends to the ones before it. The packed mask
is honoured by the ``sdpa``, ``eager`` and ``flex_attention`` mask builders (tests check
sdpa and eager against per-sequence runs); flash-attention kernels use the position_ids /
``cu_seq_lens`` instead. With sdpa/eager the packed mask is a dense ``total x total``
tensor per row, so keep rows at ~``cutoff_len`` tokens.

First-fit-decreasing blocks for the Trainer path
------------------------------------------------
:func:`pack_ffd` groups examples into blocks of <= ``cutoff_len`` tokens. :class:`PackedDataset`
stores each block as one pre-flattened item ``{"input_ids", "labels", "position_ids"}`` (only
keys that ``LlamaForCausalLM.forward`` accepts, so HF Trainer's unused-column removal keeps
them). :class:`PackedBlockCollator` splits each block back into its examples at the
position_ids resets and feeds them to ``DataCollatorWithFlattening``:

- ``rows="flatten"`` (default): all examples of the micro-batch -> one ``[1, sum]`` row (HF's
  padding-free layout). Use ``per_device_train_batch_size=1`` block => ``[1, <= cutoff_len]``
  and scale with gradient accumulation.
- ``rows="per_block"``: one row per block, ``[B, max_block_len]``; the right padding is
  pad tokens with labels -100 and position_ids restarting at 0 (a separate dummy sequence,
  so it is masked off from real tokens by the same mechanism).

Without blocks, :func:`flattening_collator` is ``DataCollatorWithFlattening`` itself: the
Trainer's batch of B examples becomes one row.

Padding mode
------------
:class:`PaddingCollator` right-pads ``input_ids`` with the pad id, ``labels`` with -100 and
returns an ``attention_mask``. :func:`length_grouped_batches` / :class:`LengthGroupedBatchSampler`
bucket examples of similar length (``group_by_length``-style: shuffle, cut into mega-batches
of ``batch_size * mega_batch_mult``, sort each by length, split into batches, shuffle the
batches; the longest batch goes first so an OOM shows up at step 0). In HF Trainer 5.x the
equivalent is ``TrainingArguments(train_sampling_strategy="group_by_length")``.
"""

from __future__ import annotations

import random

__all__ = [
    "IGNORE_INDEX",
    "pack_ffd",
    "PackedDataset",
    "PackedBlockCollator",
    "flattening_collator",
    "prepare_model_for_packing",
    "PaddingCollator",
    "length_grouped_batches",
    "LengthGroupedBatchSampler",
]

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- FFD packing

def pack_ffd(lengths: list[int], max_len: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: ``lengths`` -> blocks (lists of indices), each with
    total length <= ``max_len``. Longest first; each goes into the first (lowest-numbered)
    block with room. Deterministic (ties by index); O(n log n) via a max segment tree over the
    blocks' free space. Raises if an item is longer than ``max_len``."""
    n = len(lengths)
    if n == 0:
        return []
    for i, length in enumerate(lengths):
        if length > max_len:
            raise ValueError(f"item {i} has length {length} > max_len {max_len}; truncate first")
        if length <= 0:
            raise ValueError(f"item {i} has non-positive length {length}")
    size = 1
    while size < n:
        size *= 2
    tree = [max_len] * (2 * size)  # free space of block b at leaf size+b; all blocks start empty
    blocks: list[list[int]] = []
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    for i in order:
        need = lengths[i]
        node = 1
        while node < size:  # leftmost leaf with free >= need (root always qualifies: n <= size blocks)
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(blocks):
            blocks.append([])
        blocks[b].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return blocks


class PackedDataset:
    """Examples packed into FFD blocks; item ``k`` is block ``k`` pre-flattened:
    ``{"input_ids", "labels", "position_ids"}`` (position_ids restart at 0 per example).
    Labels are the examples' own labels; the collator sets each example's first label to -100.
    ``shuffle_seed`` shuffles block order (deterministically)."""

    def __init__(self, examples: list[dict], max_len: int, shuffle_seed: int | None = None):
        self.max_len = max_len
        self.blocks = pack_ffd([len(e["input_ids"]) for e in examples], max_len)
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(self.blocks)
        self._items = []
        for block in self.blocks:
            ids, labels, pos = [], [], []
            for i in block:
                e = examples[i]
                ids += list(e["input_ids"])
                labels += list(e["labels"])
                pos += range(len(e["input_ids"]))
            self._items.append({"input_ids": ids, "labels": labels, "position_ids": pos})

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, k: int) -> dict:
        return self._items[k]

    def efficiency(self) -> float:
        """Fraction of block capacity filled with tokens."""
        used = sum(len(it["input_ids"]) for it in self._items)
        return used / (len(self._items) * self.max_len) if self._items else 0.0


def _split_block(item: dict) -> list[dict]:
    ids, labels, pos = item["input_ids"], item["labels"], item["position_ids"]
    starts = [k for k, p in enumerate(pos) if p == 0] + [len(pos)]
    if not starts or starts[0] != 0:
        raise ValueError("a packed block must start with position_id 0")
    return [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in zip(starts, starts[1:])]


def _tolist(x):
    return x.tolist() if hasattr(x, "tolist") else list(x)


def flattening_collator(**kwargs):
    """``transformers.DataCollatorWithFlattening`` (labels separator -100, position_ids on)."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(**kwargs)


def prepare_model_for_packing(model):
    """Set ``config.use_cache = False`` (and on the generation config): with a cache, Llama
    builds a ``DynamicCache`` even in train mode, ``past_key_values`` is then not None and the
    packed block mask is silently skipped (checked in transformers 5.23). Returns the model."""
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = False
    return model


class PackedBlockCollator:
    """Collate :class:`PackedDataset` items through ``DataCollatorWithFlattening``.

    ``rows="flatten"``: one ``[1, total]`` row for the whole micro-batch;
    ``rows="per_block"``: ``[B, max_len_in_batch]``, each block its own row, right-padded with
    ``pad_token_id`` / labels -100 / position_ids 0,1,2... No attention_mask is returned (the
    model must get ``attention_mask=None`` and ``use_cache=False``)."""

    def __init__(self, pad_token_id: int = 0, rows: str = "flatten", **flatten_kwargs):
        if rows not in ("flatten", "per_block"):
            raise ValueError("rows must be 'flatten' or 'per_block'")
        if rows == "per_block" and flatten_kwargs:
            raise ValueError(f"{sorted(flatten_kwargs)} only apply to rows='flatten'")
        self.pad_token_id = pad_token_id
        self.rows = rows
        # e.g. return_flash_attn_kwargs=True (cu_seq_lens for flash-attention kernels)
        self.flatten = flattening_collator(return_tensors="pt", **flatten_kwargs)

    def __call__(self, blocks: list[dict]) -> dict:
        import torch

        blocks = [{k: _tolist(v) for k, v in b.items()} for b in blocks]
        if self.rows == "flatten":
            return self.flatten([e for b in blocks for e in _split_block(b)])
        rows = [self.flatten(_split_block(b)) for b in blocks]
        width = max(r["input_ids"].shape[1] for r in rows)
        out = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            pad = width - r["input_ids"].shape[1]
            out["input_ids"].append(torch.cat([r["input_ids"][0], torch.full((pad,), self.pad_token_id)]))
            out["labels"].append(torch.cat([r["labels"][0], torch.full((pad,), IGNORE_INDEX)]))
            out["position_ids"].append(torch.cat([r["position_ids"][0], torch.arange(pad)]))
        return {k: torch.stack(v).long() for k, v in out.items()}


# ----------------------------------------------------------------------------- padding

class PaddingCollator:
    """Right-pad a batch of ``{"input_ids","labels"}``: pad id / -100 / attention_mask 0.
    ``pad_to_multiple_of`` rounds the width up (tensor-core friendly shapes)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None,
                 label_pad_id: int = IGNORE_INDEX):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_id = label_pad_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of
        if m:
            width = -(-width // m) * m
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), self.label_pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for r, f in enumerate(features):
            x = torch.as_tensor(_tolist(f["input_ids"]), dtype=torch.long)
            y = torch.as_tensor(_tolist(f.get("labels", f["input_ids"])), dtype=torch.long)
            ids[r, : len(x)] = x
            labels[r, : len(y)] = y
            mask[r, : len(x)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int = 0,
                           mega_batch_mult: int = 50, drop_last: bool = False) -> list[list[int]]:
    """Batches of indices with similar lengths (deterministic for a seed); every index appears
    exactly once (unless ``drop_last`` drops a final short batch)."""
    n = len(lengths)
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    mega = max(1, batch_size * mega_batch_mult)
    batches = []
    for s in range(0, n, mega):
        chunk = sorted(order[s: s + mega], key=lambda i: (-lengths[i], i))
        batches += [chunk[k: k + batch_size] for k in range(0, len(chunk), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches = [b for b in batches if len(b) == batch_size]
    if not batches:
        return []
    longest = max(range(len(batches)), key=lambda b: (max(lengths[i] for i in batches[b]), -b))
    first = batches.pop(longest)
    rng.shuffle(batches)
    return [first] + batches


class LengthGroupedBatchSampler:
    """``torch.utils.data.DataLoader(ds, batch_sampler=LengthGroupedBatchSampler(...))``;
    reshuffles per epoch (call ``set_epoch``)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0,
                 mega_batch_mult: int = 50, drop_last: bool = False):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.mega_batch_mult, self.drop_last, self.epoch = mega_batch_mult, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self):
        return length_grouped_batches(self.lengths, self.batch_size, self.seed + self.epoch,
                                      self.mega_batch_mult, self.drop_last)

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
