"""Test-session setup shared by every test module."""
import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter. Triton decides that when a
# kernel is decorated, so this must happen before anything imports lines_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """In-process merges on one intra-op thread: tiny tensors gain nothing from two, and on a
    busy machine each parallel op can wait a scheduler tick for its second thread.
    (test_thread_count_does_not_change_a_bit runs 1 and 2 threads in subprocesses.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def torch_until_asked(monkeypatch):
    """Each test starts as a fresh process does: no work counted toward loading the compiled
    kernels (lines_fast/jit.py's JIT_AFTER) and nothing prefetched, so which path a test's small
    merges take does not depend on the tests before it. Tests of the compiled path ask for it
    (CpuBackend(compiled=True), JIT_AFTER = 0); before this, the work of earlier tests added up
    until every later merge ran compiled, compiling kernel signatures (10-20 s each) no test
    looked at."""
    from lines_fast import jit

    monkeypatch.setattr(jit, "_work_in_torch", 0)
    monkeypatch.setattr(jit, "_loader", None)
