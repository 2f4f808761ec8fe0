"""Packaging for lines_fast.

The Triton kernels live in the top-level `kernels/` folder of the repository but are
installed as `lines_fast.kernels`, so lines_fast never claims the generic import name
`kernels` (another PyPI package uses it).
"""
from setuptools import setup

setup(
    name="lines_fast",
    version="0.1.0",
    description="Fast, reference-exact model merging (TIES, DARE, task arithmetic, soups, WiSE-FT, LiNeS) for sharded safetensors checkpoints",
    packages=["lines_fast", "lines_fast.backends", "lines_fast.benchmark", "lines_fast.kernels"],
    package_dir={"lines_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",  # exact float32/uint arithmetic in rng.py; Triton's interpreter runs on it
        "safetensors>=0.4",
        "triton>=3.0; platform_system == 'Linux'",
        "pyyaml>=6",
        "tqdm>=4.60",
        # numba: the CPU backend's compiled path (lines_fast/jit.py, jit_kernels.py): the fused
        # chunk merge and selection histograms (TIES 2.3x end to end), DARE / DELLA's Philox draws
        # (~20x) and the exact L1 sums, bit for bit the torch code; optional at run time, so a
        # Python numba has no wheel for yet only loses the speed.
        "numba>=0.59; python_version < '3.14'",
    ],
    extras_require={
        # huggingface_hub: Hub model names (org/name) as models; the tests run its real offline path.
        "hub": ["huggingface_hub>=0.24"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "huggingface_hub>=0.24"],
        "plot": ["matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["lines-fast=lines_fast.cli:run"]},
)
