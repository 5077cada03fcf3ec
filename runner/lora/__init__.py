"""LoRA adapters served per request over one base model: reading PEFT folders (weights.py), the slots and hooks
that add each row's low-rank update (adapters.py), the step's row layout (step.py) and the GPU kernels
(triton_kernels.py)."""
