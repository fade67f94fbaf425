"""Logits + cross-entropy: the transient spike at the loss.

transformers 5.23 `LlamaForCausalLM.forward` → `lm_head(hidden)` (a-byte logits for every
position) → `loss/loss_utils.py::ForCausalLMLoss`:
    logits = logits.float()                       # fp32 upcast
    ... nn.functional.cross_entropy(logits.view(-1, V), shift_labels, reduction=...)
and `cross_entropy` = `log_softmax` + `nll_loss`. Per token (T = micro_batch · seq_len,
V vocab, a activation bytes):

Forward, at the loss (on top of everything saved by the layers):
 1. the a-byte logits, a·V — kept alive by the model output object until forward returns;
 2. the fp32 upcast, 4·V — `.float()` saves nothing, but the tensor lives while
    log_softmax runs (for fp32 compute `.float()` is a no-op: 0);
 3. the log_softmax output, 4·V, saved by its backward node (the one CE term that
    survives the forward);
 4. when lm_head is frozen (LoRA / freeze) the last hidden state a·h is not saved by anyone
    but is still referenced by the model output while the loss runs.
 → forward spike (1+2+3) = (a + 4 + 4)·V per token; 4·V survives into backward.
 5. Gemma-2 final logit soft-capping (`logits / cap; tanh; * cap`) saves the tanh output:
    +a·V, and it survives into backward.
Backward, first nodes:
 6. nll_loss backward makes a dense fp32 ∂log_softmax (4·V), log_softmax backward makes
    ∂logits_fp32 (4·V) while its saved output (3) is still alive → 12·V per token;
 7. then the cast back gives an a·V gradient for lm_head's backward (smaller than 6).
 → backward spike = 12·V per token (replacing the 4·V carried from the forward).

Chunked CE (`cfg.chunked_ce`; profiler.fake's implementation: lm_head + CE checkpointed per
chunk of `ce_chunk_tokens` positions of every sequence, so b·chunk tokens per chunk):
 8. only one chunk's logits exist at a time, and nothing holds the a-byte chunk logits
    once `.float()` ran: forward spike = fp32 logits + log_softmax = 8·V·c, nothing saved;
    backward recomputes the chunk and runs (6) on it: 12·V·c. Liger's fused linear-CE uses
    smaller chunks (≈ T·h/V tokens) and never materialises more than one fp32 chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

from planner.config import Method, TrainConfig
from planner.memory.activations import act_bytes
from planner.memory.overhead import calibration_value
from planner.model import ModelSpec


@dataclass(frozen=True)
class LogitsEstimate:
    forward_spike: int
    """Bytes alive at the loss during forward, beyond the layers' saved activations."""
    carried: int
    """Bytes saved by the loss for backward (alive from forward end into backward)."""
    backward_spike: int
    """Bytes alive at the start of backward (loss and lm_head backward), beyond the layers' activations."""
    chunk_tokens: int
    """Tokens whose logits coexist (T without chunking)."""

    @property
    def peak(self) -> int:
        return max(self.forward_spike, self.backward_spike)


def estimate_logits(model: ModelSpec, cfg: TrainConfig) -> LogitsEstimate:
    a, V, h = act_bytes(cfg), model.vocab_size, model.hidden_size
    T = cfg.tokens_per_micro_batch
    upcast = 0 if a == 4 else 4                                       # 2.
    softcap = a if model.model_type == "gemma2" else 0                # 5.
    head_frozen = cfg.method != Method.FULL
    hidden = a * h * T if head_frozen else 0                          # 4.
    if cfg.chunked_ce:                                                # 8.
        chunk = int(calibration_value("ce_chunk_tokens"))
        c = cfg.micro_batch * min(cfg.seq_len, chunk)
        fwd = (4 + 4 + softcap) * V * c + hidden
        bwd = (12 + softcap) * V * c
        return LogitsEstimate(forward_spike=int(fwd), carried=0, backward_spike=int(bwd), chunk_tokens=c)
    fwd = (a + upcast + 4 + softcap) * V * T + hidden                 # 1. 2. 3. 4.
    carried = (4 + softcap) * V * T                                   # 3. 5.
    bwd = (12 + softcap) * V * T                                      # 6.
    return LogitsEstimate(forward_spike=int(fwd), carried=int(carried), backward_spike=int(bwd), chunk_tokens=T)
