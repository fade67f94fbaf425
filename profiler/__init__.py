"""tuneplan profiler: measure training steps (fake tensors, CPU, CUDA).

Submodules import torch lazily; importing ``profiler`` itself is cheap.

- ``profiler.fake``     fake-tensor oracle: ``fake_step(config, ...)`` -> ``FakeStepResult``
- ``profiler.tracker``  ``PhaseMemTracker`` (trimmed, phase-aware torch ``MemTracker``)
- ``profiler.fake_reference``  writes ``tables/measured/fake_reference.csv``
"""
