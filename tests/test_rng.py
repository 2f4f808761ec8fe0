"""lines_fast.rng is bit-exact with Triton's tl.philox and the kernels' uniform_from_bits
(run in Triton's interpreter here, compiled on a GPU)."""
from __future__ import annotations

import os

import pytest
import torch

from lines_fast.rng import dare_constants, dare_uniform, tensor_stream_id

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lines_fast.backends.triton_backend import import_kernels  # noqa: E402

kmerge, _ = import_kernels()

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs Triton's interpreter or a GPU")


@triton.jit
def _uniform_kernel(out, seed, stream_id, model_index, start, n, BLOCK: tl.constexpr):
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    c0 = (offs & 0xFFFFFFFF).to(tl.uint32)
    c1 = (offs >> 32).to(tl.uint32)
    c2 = (offs * 0 + stream_id).to(tl.uint32)
    c3 = (offs * 0 + model_index).to(tl.uint32)
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    tl.store(out + tl.arange(0, BLOCK), kmerge.uniform_from_bits(r0), mask=tl.arange(0, BLOCK) < n)


@pytest.mark.parametrize("seed, model_index, name, start", [
    (0, 0, "model.embed_tokens.weight", 0),
    (1234567, 2, "model.layers.3.mlp.up_proj.weight", 5),
    ((1 << 40) + 17, 7, "lm_head.weight", (1 << 32) - 100),   # counter crosses into c1
    ((1 << 63) - 1, 1, "x", 1 << 33),
])
def test_dare_uniform_matches_tl_philox(seed, model_index, name, start):
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    out = torch.empty(512, device=device)
    _uniform_kernel[(1,)](out, seed, tensor_stream_id(name), model_index, start, 512, BLOCK=512)
    assert torch.equal(out.cpu(), dare_uniform(seed, model_index, name, 512, start))


def test_stream_ids_can_pass_2_to_the_31():
    # The kernel widens then wraps the id; an id >= 2^31 must still agree.
    name = next(n for n in (f"t{i}" for i in range(1000)) if tensor_stream_id(n) >= 1 << 31)
    test_dare_uniform_matches_tl_philox(99, 3, name, 0)


def test_uniforms_are_in_unit_interval_and_roughly_uniform():
    u = dare_uniform(5, 0, "w", 200_000)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01


def test_dare_constants_are_float32_values():
    p, divisor = dare_constants(0.3)
    assert p == float(torch.tensor(0.7, dtype=torch.float32))
    assert divisor == float(torch.tensor(1.0 - p, dtype=torch.float32))


# -- the compiled draws (lines_fast/jit.py) ----------------------------------------------------
from lines_fast import jit, rng  # noqa: E402

needs_numba = pytest.mark.skipif(jit.kernels() is None, reason="numba is not installed")


@needs_numba
@pytest.mark.parametrize("seed, model_index, name, start, numel, stream", [
    (0, 0, "x", 0, 1 << 16, rng.DARE_STREAM),
    (12345, 2, "model.layers.3.mlp.up_proj.weight", 999, 4097, rng.DARE_STREAM),
    ((1 << 62) + 77, 1, "lm_head.weight", (1 << 32) - 50, 300, rng.DELLA_STREAM),   # c1 and k1 non-zero
    ((1 << 63) - 1, 65535, "é", 1 << 40, 1000, rng.DELLA_STREAM),
    (5, 0, "t", 7, 1, rng.DARE_STREAM),
    (5, 0, "t", 7, 0, rng.DARE_STREAM),
])
def test_compiled_draws_are_the_torch_draws_bit_for_bit(seed, model_index, name, start, numel, stream, monkeypatch):
    expected = rng._draw_torch(seed, model_index, name, numel, start, "cpu", stream)
    monkeypatch.setattr(jit, "JIT_AFTER", 0)
    got = rng._draw(seed, model_index, name, numel, start, "cpu", stream)
    assert got.dtype == torch.float32 and got.shape == (numel,)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@needs_numba
@pytest.mark.parametrize("numel, start", [(301, 0), (1000, (1 << 32) - 500), (7, 3)])
def test_a_large_draw_shared_among_threads_is_the_torch_draw(numel, start, monkeypatch):
    """fill_uniform_shared (the draw split among the cores; here 2 threads from 200 draws on)."""
    monkeypatch.setattr(rng, "SHARED_DRAW", 100)
    monkeypatch.setattr(jit, "JIT_AFTER", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    kernels, calls = jit.kernels(), []
    real = kernels.fill_uniform_shared
    monkeypatch.setattr(kernels, "fill_uniform_shared", lambda *args: (calls.append(args[-1]), real(*args))[1])
    expected = rng._draw_torch(9, 1, "model.layers.0.mlp.up_proj.weight", numel, start, "cpu", rng.DELLA_STREAM)
    got = rng._draw(9, 1, "model.layers.0.mlp.up_proj.weight", numel, start, "cpu", rng.DELLA_STREAM)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert calls == ([2] if numel >= 200 else [])


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_numba)])
@pytest.mark.parametrize("seed, model_index, names, length, stream", [
    (0, 0, [f"model.layers.{i}.experts.{i}.weight" for i in range(50)], 64, rng.DARE_STREAM),
    ((1 << 62) + 77, 3, ["a", "é", "lm_head.bias"], 5, rng.DELLA_STREAM),   # k1 non-zero
    (7, 1, ["only"], 1, rng.DARE_STREAM),
    (7, 1, ["x", "y"], 0, rng.DARE_STREAM),
])
def test_a_pack_draws_what_each_of_its_tensors_draws(compiled, seed, model_index, names, length, stream, monkeypatch):
    """dare_uniform_rows (one call for a pack of small tensors) == each tensor's own draws end to end."""
    expected = torch.cat([rng._draw_torch(seed, model_index, n, length, 0, "cpu", stream) for n in names])
    monkeypatch.setattr(jit, "JIT_AFTER", 0 if compiled else 1 << 62)
    monkeypatch.setattr(jit, "_work_in_torch", 0)
    got = rng.dare_uniform_rows(seed, model_index, names, length, stream)
    assert got.dtype == torch.float32 and got.shape == (len(names) * length,)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


def test_small_merges_never_load_the_compiler(monkeypatch):
    monkeypatch.setattr(jit, "_work_in_torch", 0)
    monkeypatch.setattr(jit, "kernels", lambda: pytest.fail("numba loaded for a small draw"))
    rng._draw(0, 0, "x", 1000, 0, "cpu", rng.DARE_STREAM)
    assert jit._work_in_torch == jit.CALL_WORK   # a small draw counts what a torch call costs
    rng._draw(0, 0, "x", 1 << 20, 0, "cpu", rng.DARE_STREAM)
    assert jit._work_in_torch == jit.CALL_WORK + (1 << 20)


@needs_numba
@pytest.mark.parametrize("density, eps", [(0.3, 0.1), (0.9, 0.05), (0.5, 0.0)])
def test_compiled_della_drop_probabilities_are_the_torch_ones(density, eps, monkeypatch):
    """plan.ranked_drop_p through lines_fast/jit.py: the same float32 bits as the torch code, with
    ties (first-equal ranks), a row of equal magnitudes (0.5) and signs that cancel in |x|."""
    from lines_fast.plan import ElementPlan
    from lines_fast.spec import make_spec

    plan = ElementPlan.from_spec(make_spec("della", 2, values={"density": density, "epsilon": eps}))
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(40, 257, generator=g).to(torch.bfloat16).float()   # bf16 values: many ties
    rows[1] = -2.0
    rows[2, 1::2] = -rows[2, 0:256:2]
    rows[3, :3] = 0.0
    rows[3, 3:6] = -0.0   # |-0.0| is +0.0: tied with the zeros
    # Task vectors as DELLA sees them (float32 differences of bf16 values) and float32 values whose
    # every key digit of the radix sort is in use; rows longer than its 2048 buckets, subnormals,
    # zeros and ties.
    base = torch.randn(6, 4099, generator=g).mul_(0.02).bfloat16().float()
    deltas = (base + torch.randn(6, 4099, generator=g).mul_(1e-3)).bfloat16().float() - base
    deltas[0, :50] = torch.tensor(1e-40).expand(50) * torch.arange(50)
    deltas[1, ::3] = 0.0
    full = torch.randn(6, 4099, generator=g) * 1e-3   # every significand bit in use
    full[2, 100:200] = full[2, 0:100]   # and ties among them
    # Inf or NaN anywhere: the compiled kernel declines and the torch code ranks them (same bits).
    special = full.clone()
    special[4, 7], special[5, 9] = float("inf"), float("nan")
    no_keep = torch.empty(1, 1, dtype=torch.uint8).numpy()
    for bad in (4, 5):
        assert not jit.kernels().della_drop_p(special[bad:bad + 1].numpy(), density, eps, torch.empty(1, 4099).numpy(),
                                              no_keep, False, 0, 0, 0, 0, 0)
    assert jit.kernels().della_drop_p(special[:4].numpy(), density, eps, torch.empty(4, 4099).numpy(), no_keep, False,
                                      0, 0, 0, 0, 0)
    for rows in (rows, deltas, full, full[:, :1].contiguous(), special):
        monkeypatch.setattr(jit, "JIT_AFTER", 1 << 62)
        expected = plan.ranked_drop_p(rows, 1)
        monkeypatch.setattr(jit, "JIT_AFTER", 0)
        got = plan.ranked_drop_p(rows, 1)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    # keep_masks: the probabilities, the draws and u >= p in one compiled call (della_drop_p's draw
    # mode), the mask the torch code draws, at any offset in the tensor (2^32 crosses the counter's
    # low word); Inf/NaN rows decline to the torch code.
    name = "model.layers.0.mlp.up_proj.weight"
    for rows, start, compiled in ((deltas, 0, True), (full, (1 << 32) - 4099 * 2, True), (special, 5, False)):
        monkeypatch.setattr(jit, "JIT_AFTER", 1 << 62)
        expected = plan.keep_masks(rows.reshape(-1), 1, None, name, start, rows.shape[1])
        monkeypatch.setattr(jit, "JIT_AFTER", 0)
        assert (plan._ranked_keep_compiled(rows.reshape(-1), 1, name, start, rows.shape[1])[0] is not None) == compiled
        got = plan.keep_masks(rows.reshape(-1), 1, None, name, start, rows.shape[1])
        assert got.dtype == torch.bool and torch.equal(got, expected) and 0 < int(got.sum()) < got.numel()
    rows = torch.randn(40, 257, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).float()
    rows[1] = -2.0
    got = plan.ranked_drop_p(rows, 1)
    # By hand, row 1 (all equal): keep 0.5 everywhere, so drop = 1 - ((d - e) + 0.5 * 2e) = 1 - d.
    assert torch.equal(got[1], torch.full((257,), 1 - density, dtype=torch.float64).float())
