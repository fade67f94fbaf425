"""What the memory model returns for one configuration on one GPU."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes by category, and the peaks a CUDA run would report.

    Categories are disjoint; `peak_allocated` is the max over phases (forward, backward,
    optimizer step) of what is live in that phase, not the sum of categories.
    """

    parameters: int
    """Model weights resident on this GPU (after ZeRO-3 sharding / offload; NF4 for QLoRA)."""
    gradients: int
    """Gradient buffers of trainable parameters (ZeRO-2/3: this rank's partition + buckets)."""
    optimizer: int
    """Optimizer states on the GPU (Adam m and v, 8-bit states, ...)."""
    master_weights: int
    """fp32 master copy of trainable weights when compute is 16-bit (mixed precision / DeepSpeed)."""
    activations: int
    """Tensors saved for backward at the end of the forward pass (all layers, all micro-batch)."""
    logits: int
    """Logits + cross-entropy transient at the loss (upcast, softmax, gradient)."""
    buffers: int
    """Framework buffers: ZeRO reduce/all-gather buckets and prefetch, FSDP unsharded layers."""
    overhead: int
    """CUDA context, cuBLAS/cuDNN workspaces, NCCL: outside the caching allocator."""
    fragmentation: int
    """Caching-allocator reserved-but-unallocated bytes at the peak (reserved − allocated)."""
    peak_allocated: int
    """torch.cuda.max_memory_allocated() prediction."""
    peak_reserved: int
    """torch.cuda.max_memory_reserved() prediction."""
    peak_device: int
    """What NVML / nvidia-smi would show: peak_reserved + overhead."""
    capacity: int
    """The GPU's memory in bytes."""
    phase_peaks: dict = field(default_factory=dict)
    """{"forward": bytes, "backward": bytes, "optimizer": bytes} allocated at each phase's peak."""
    peak_phase: str = "backward"
    low: int = 0
    """Lower bound of peak_device (see `spread_reason`)."""
    high: int = 0
    """Upper bound of peak_device."""
    spread_reason: str = ""
    notes: tuple = ()

    @property
    def fits(self) -> bool:
        return self.peak_device <= self.capacity

    @property
    def headroom_bytes(self) -> int:
        return self.capacity - self.peak_device

    def per_gpu_bytes(self) -> dict[str, int]:
        return {
            "parameters": self.parameters, "gradients": self.gradients, "optimizer": self.optimizer,
            "master_weights": self.master_weights, "activations": self.activations, "logits": self.logits,
            "buffers": self.buffers, "overhead": self.overhead, "fragmentation": self.fragmentation,
            "peak_allocated": self.peak_allocated, "peak_reserved": self.peak_reserved,
            "peak_device": self.peak_device,
        }

    def to_json(self) -> dict:
        return {"per_gpu_bytes": self.per_gpu_bytes(), "fits": self.fits, "headroom_bytes": self.headroom_bytes,
                "capacity_bytes": self.capacity, "phase_peaks": dict(self.phase_peaks), "peak_phase": self.peak_phase,
                "bounds_bytes": {"low": self.low, "expected": self.peak_device, "high": self.high},
                "spread_reason": self.spread_reason, "notes": list(self.notes)}
