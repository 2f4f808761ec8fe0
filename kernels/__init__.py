"""Triton kernels of lines_fast, installed as `lines_fast.kernels` (see setup.py).

- merge.py:  the fused merge kernel family (every method, one read of each input, one write)
             and its "delta L1" variant for LiNeS auto alpha.
- select.py: magnitude histograms of |tau| bit patterns for exact TIES thresholds, and the
             L1 norm of sum_i tau_i.

Triton decides at decoration time whether a kernel is compiled or interpreted, so
TRITON_INTERPRET=1 must be in the environment before these modules are imported when the
kernels are to run on CPU tensors (lines_fast.backends.triton_backend.enable_interpreter).
"""
