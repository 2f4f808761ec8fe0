"""Test-session setup shared by every test module."""
import os

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter. Triton decides that when a
# kernel is decorated, so this must happen before anything imports lines_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
