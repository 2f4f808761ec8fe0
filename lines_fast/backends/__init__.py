"""Backends: the code that does the per-element math of a merge on some device.

`base.Backend` is the contract; `cpu.CpuBackend` is the default without a GPU;
`triton_backend.TritonBackend` runs the fused kernels on a GPU, or on CPU tensors in
Triton's interpreter (`--device interpret`).
"""
