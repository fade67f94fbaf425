"""Which parameters train, which are frozen, which are adapters: exact counts, no torch.

Everything the state model (`states.py`) and the activation model (`activations.py`)
need to know about *what trains* lives here, so the two agree by construction.

Sources:
  [peft-tuners] peft 0.21.2 `tuners/tuners_utils.py::_maybe_include_all_linear_layers`:
      "all-linear" = every `nn.Linear` (and Conv1D) of the model except the output layer
      (`lm_head`); `check_target_module_exists`: a string in `target_modules` matches a
      module whose name equals it or ends with "." + it.
  [peft-lora] peft 0.21.2 `tuners/lora/layer.py::LoraLayer.update_layer`:
      lora_A = Linear(in, r, bias=False), lora_B = Linear(r, out, bias=False) ⇒ r·(in + out)
      parameters per adapted Linear; `Embedding` adapters are lora_embedding_A (r × V) and
      lora_embedding_B (h × r) ⇒ r·(V + h).
  [peft-moe] peft 0.21.2 with transformers ≥ 5: `convert_peft_config_for_transformers`
      rewrites "all-linear" on MoE models so the fused expert banks are adapted through
      `ParamWrapper` (`target_parameters`, a parametrisation W + B·A merged at every forward):
      for a bank (E, out, in) lora_A is Linear(in, r·E), lora_B Linear(r·E, out), with the rank
      doubled for the fused gate_up bank (it replaces v4's separate w1/w3). The router weight
      (E × h, not an nn.Linear) gets a rank-r ParamWrapper too. Per MoE layer:
      router r·(h + E) + gate_up 2r·E·(h + 2f) + down r·E·(f + h). Checked against
      `get_peft_model` on Mixtral and Qwen3-MoE (tests/test_memory.py). Named targets on MoE
      models adapt the attention projections only here.
  [llama-factory-freeze] LLaMA-Factory `finetuning_type: freeze`,
      `freeze_trainable_layers: k` > 0 trains the last k decoder layers (all their
      parameters), k < 0 the first |k|; nothing else trains.
"""
from __future__ import annotations

from dataclasses import dataclass

from planner.config import LORA_ALL_LINEAR, Method, TrainConfig
from planner.errors import PlanError
from planner.memory.memo import memoized
from planner.model import Linear, ModelSpec

#: module names outside the decoder layers that peft can adapt when listed explicitly
_HEAD = "lm_head"
_EMBED = "embed_tokens"


def trainable_layer_indices(model: ModelSpec, cfg: TrainConfig) -> range:
    """Decoder layers whose own (base) weights train."""
    L = model.num_layers
    if cfg.method == Method.FULL:
        return range(L)
    if cfg.method == Method.FREEZE:
        k = min(cfg.freeze_trainable_layers, L)
        return range(L - k, L)
    return range(0)


def _targets(cfg: TrainConfig) -> tuple[str, ...]:
    return tuple(t.strip() for t in cfg.lora_target if t.strip())


def adapted_linears(model: ModelSpec, cfg: TrainConfig, layer: int) -> list[Linear]:
    """The Linear modules of decoder `layer` that carry a LoRA adapter [peft-tuners]."""
    if not cfg.is_adapter:
        return []
    targets = _targets(cfg)
    lins = model.layer_linears(layer)
    if LORA_ALL_LINEAR in targets or "all" in targets:
        return list(lins)
    names = set(targets)
    return [lin for lin in lins if lin.name in names]


def moe_adapted(model: ModelSpec, cfg: TrainConfig, layer: int) -> bool:
    """[peft-moe]: all-linear on a transformers-5 MoE layer adapts router + expert banks."""
    targets = _targets(cfg)
    return cfg.is_adapter and model.is_moe_layer(layer) and (LORA_ALL_LINEAR in targets or "all" in targets)


def moe_adapter_params(model: ModelSpec, cfg: TrainConfig) -> tuple[int, int]:
    """[peft-moe] (router adapter, expert-bank adapters) parameters of one MoE layer."""
    r, h, E, f = cfg.lora_rank, model.hidden_size, model.num_experts, model.moe_intermediate_size
    return r * (h + E), 2 * r * E * (h + 2 * f) + r * E * (f + h)


def head_adapted(cfg: TrainConfig) -> bool:
    """lm_head carries an adapter only when named explicitly ("all-linear" excludes it)."""
    return cfg.is_adapter and _HEAD in _targets(cfg)


def embed_adapted(cfg: TrainConfig) -> bool:
    return cfg.is_adapter and _EMBED in _targets(cfg)


@dataclass(frozen=True)
class ParamCounts:
    """Element counts (not bytes) of one model under one method."""

    total_base: int
    """Every base-model parameter (tied embeddings once) = ModelSpec.total_params."""
    trainable_base: int
    """Base parameters that receive gradients (full: all; freeze: last k layers; adapters: 0)."""
    adapter: int
    """LoRA A + B parameters (lora / qlora only)."""
    trainable_tensors: int
    """Number of trainable parameter tensors (torch AdamW keeps a 4-byte `step` per tensor)."""
    linear_weight_elems: int
    """Weights of the decoder-layer nn.Linear modules (what bitsandbytes quantises to NF4)."""
    largest_module: int
    """Most parameters held directly by one module (DeepSpeed's `largest_layer_params`:
    sum of `m.parameters(recurse=False)` — embedding, lm_head, the largest Linear, or an
    MoE expert bank)."""

    @property
    def trainable(self) -> int:
        return self.trainable_base + self.adapter

    @property
    def frozen_base(self) -> int:
        return self.total_base - self.trainable_base


def _layer_tensor_count(model: ModelSpec, layer: int) -> int:
    lins = model.layer_linears(layer)
    n = sum(1 + (1 if lin.bias else 0) for lin in lins) + model.norms_per_layer
    if model.qk_norm:
        n += 2
    if model.is_moe_layer(layer):
        n += 3  # router weight + fused gate_up bank + down bank (transformers ≥ 5)
    return n


def param_counts(model: ModelSpec, cfg: TrainConfig) -> ParamCounts:
    """Exact element counts; tested against peft `get_peft_model` on a meta model."""
    key = (model, cfg.method, cfg.lora_rank, cfg.lora_target, cfg.freeze_trainable_layers)
    return memoized(_COUNTS, key, 4096, lambda: _param_counts(model, cfg))


_COUNTS: dict = {}


def _param_counts(model: ModelSpec, cfg: TrainConfig) -> ParamCounts:
    L = model.num_layers
    h, V = model.hidden_size, model.vocab_size
    r = cfg.lora_rank
    train_layers = trainable_layer_indices(model, cfg)

    trainable_base = sum(model.layer_params(i) for i in train_layers)
    tensors = sum(_layer_tensor_count(model, i) for i in train_layers)
    if cfg.method == Method.FULL:
        # 1. embeddings, lm_head (untied) and the final norm train too.
        trainable_base = model.total_params
        tensors += 1 + (0 if model.tie_embeddings else 1) + 1

    adapter = 0
    matched = False
    if cfg.is_adapter:
        for i in range(L):
            for lin in adapted_linears(model, cfg, i):
                # 2. [peft-lora]: A is r×in, B is out×r.
                adapter += r * (lin.in_features + lin.out_features)
                tensors += 2
                matched = True
            if moe_adapted(model, cfg, i):
                adapter += sum(moe_adapter_params(model, cfg))
                tensors += 6
        if head_adapted(cfg):
            adapter += r * (h + V)
            tensors += 2
            matched = True
        if embed_adapted(cfg):
            adapter += r * (V + h)
            tensors += 2
            matched = True
        if not matched:
            raise PlanError(f"--lora-target {','.join(cfg.lora_target)} matches no module of {model.name}; "
                            f"Linear modules are: {', '.join(l.name for l in model.layer_linears(0))}")

    linear_w = sum(lin.in_features * lin.out_features for i in range(L) for lin in model.layer_linears(i))
    largest = max([V * h] + [lin.in_features * lin.out_features + (lin.out_features if lin.bias else 0)
                             for lin in model.layer_linears(0)])
    if model.is_moe:
        # 3. transformers ≥ 5 stores the expert banks as 3-D parameters (gate_up E×2f×h and
        #    down E×h×f) of one `Experts` module: DeepSpeed sees E·3·f·h in one module.
        largest = max(largest, model.num_experts * 3 * model.moe_intermediate_size * h)
    return ParamCounts(total_base=model.total_params, trainable_base=trainable_base, adapter=adapter,
                       trainable_tensors=tensors, linear_weight_elems=linear_w, largest_module=largest)
