"""Loaded before any test module: on a machine without CUDA, Triton kernels run in Triton's CPU interpreter.

It must be set before anything imports triton (transformers may, while it probes for kernels): a kernel whose
`triton.language` helpers were decorated outside interpreter mode fails inside the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
