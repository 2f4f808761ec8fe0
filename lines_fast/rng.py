"""DARE's random stream: Philox4x32-10, bit-exact with Triton's `tl.philox`.

Derivation (the kernels in kernels/merge.py use exactly this):
- key   = the 64-bit seed, split as tl.philox splits it: k0 = seed & 0xffffffff, k1 = seed >> 32.
- counter = (c0, c1, c2, c3) = (j & 0xffffffff, j >> 32, tensor_stream_id(name), i), where j is
  the element's flat index in the tensor and i the model's index in the config (0-based).
- draw  = the first 32-bit output word r0 of Philox4x32-10(counter, key).
- u     = Triton's uint_to_uniform_float: x = r0 read as int32, x = ~x where x < 0,
  u = float32(x) * float32(4.6566127342e-10), so 0 <= u < 1.
- keep element j of model i iff u >= p_i, with p_i = float32(1 - density_i); with
  `rescale: inverse` kept values are divided by q_i = float32(1 - p_i) (see dare_constants).
Because u is a pure function of (seed, i, name, j), masks are the same on CPU and GPU, for
any chunking, tensor order or number of processes.
"""
from __future__ import annotations

import hashlib

import numpy as np
from .lazy import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_N_ROUNDS = 10
_UNIFORM_SCALE = np.float32(4.6566127342e-10)
MAX_SEED = (1 << 63) - 1
# Draws per thread below which the compiled draw stays on one thread: a parallel call costs ~10 us,
# 64K draws ~200 us on one core.
SHARED_DRAW = 1 << 16


def tensor_stream_id(name: str) -> int:
    """A stable 32-bit id of a tensor name: the first 4 bytes (little-endian) of BLAKE2b-32 of its UTF-8."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=4).digest(), "little")


def dare_constants(density: float) -> tuple[float, float]:
    """(p, q) as float32 values: drop when u < p; q = float32(1 - p) is the keep probability the
    mask really has (the divisor of `rescale: inverse`)."""
    p = np.float32(1.0 - density)
    divisor = np.float32(1.0 - float(p))
    return float(p), float(divisor)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on uint32 counters held in int64 tensors (modified in place); returns the 4 words.

    A 32x32-bit product is < 2^64: int64 multiplication keeps its low 64 bits (two's-complement
    wrap), so `>> 32 & mask` and `& mask` give its exact high and low words. Everything runs in
    place on the counter tensors and two scratch products: allocation dominated the cost otherwise.
    """
    prod_b = torch.empty_like(c0)
    prod_a = torch.empty_like(c0)
    for _ in range(_N_ROUNDS):
        torch.mul(c2, _ROUND_B, out=prod_b)
        torch.mul(c0, _ROUND_A, out=prod_a)
        # c0' = hi(B*c2) ^ c1 ^ k0 and c2' = hi(A*c0) ^ c3 ^ k1 (old c0, c2 are consumed above)
        torch.bitwise_right_shift(prod_b, 32, out=c0).bitwise_and_(_MASK32).bitwise_xor_(c1).bitwise_xor_(k0)
        torch.bitwise_right_shift(prod_a, 32, out=c2).bitwise_and_(_MASK32).bitwise_xor_(c3).bitwise_xor_(k1)
        # c1' = lo(B*c2), c3' = lo(A*c0)
        torch.bitwise_and(prod_b, _MASK32, out=c1)
        torch.bitwise_and(prod_a, _MASK32, out=c3)
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform_from_bits(r0: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for 32-bit words: float32 in [0, 1)."""
    # Read as int32, negatives become ~x: for r0 >= 2^31 that is 2^32 - 1 - r0 = r0 ^ 0xffffffff.
    x = r0.bitwise_xor((r0 >> 31) * _MASK32)
    return x.to(torch.float32).mul_(torch.tensor(_UNIFORM_SCALE))


# Streams of draws: counter word c3 is model_index + (stream << 16), so every method that
# draws (DARE, DELLA) has masks of its own for the same seed, model and tensor.
DARE_STREAM = 0
DELLA_STREAM = 1


# Small draws are kept a while: a tensor's rescale statistics and its merge draw the same u,
# and for a tensor of a few hundred elements the ~80 torch operations of Philox cost far more
# than its bytes (checkpoints of 10^4-10^5 small tensors). Callers get a copy (they modify u).
_CACHE_BELOW = 1 << 12
_CACHE_SIZE = 64
_cache: dict[tuple, torch.Tensor] = {}


def dare_uniform(seed: int, model_index: int, name: str, numel: int, start: int = 0,
                 device: torch.device | str = "cpu", stream: int = DARE_STREAM) -> torch.Tensor:
    """u for flat indices start .. start+numel-1 of tensor `name`, model `model_index` (float32),
    in the given stream (DARE's: c3 = model_index; DELLA's: model_index + 2^16)."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    if numel >= _CACHE_BELOW:
        return _draw(seed, model_index, name, numel, start, device, stream)
    key = (seed, model_index, name, numel, start, str(device), stream)
    u = _cache.get(key)
    if u is None:
        if len(_cache) >= _CACHE_SIZE:
            del _cache[next(iter(_cache))]   # the oldest
        u = _cache[key] = _draw(seed, model_index, name, numel, start, device, stream)
    return u.clone()


def dare_uniform_rows(seed: int, model_index: int, names: list[str], length: int,
                      stream: int = DARE_STREAM) -> torch.Tensor:
    """u of every element of tensors `names`, each of `length` elements, end to end (float32,
    CPU): the same values as dare_uniform for each name, drawn in one call for a pack of small
    tensors instead of one call (~80 torch operations) per tensor."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    ids = [tensor_stream_id(name) for name in names]
    c3, k0, k1 = _model_key(seed, model_index, stream)
    from . import jit

    fast = jit.compiled(max(len(names) * length, jit.CALL_WORK))
    if fast is not None:   # the same u, compiled (lines_fast/jit.py)
        u = torch.empty(len(names), length, dtype=torch.float32)
        if u.numel():
            fast.fill_uniform_rows(u.numpy(), np.array(ids, dtype=np.uint32), c3, k0, k1)
        return u.reshape(-1)
    j = torch.arange(length, dtype=torch.int64).repeat(len(names))
    c2 = torch.tensor(ids, dtype=torch.int64).repeat_interleave(length)
    r0, _, _, _ = philox4x32_10(j & _MASK32, j >> 32, c2, torch.full_like(j, c3), k0, k1)
    return uniform_from_bits(r0)


def stream_key(seed: int, model_index: int, name: str, stream: int) -> tuple[int, int, int, int]:
    """(c2, c3, k0, k1): the counter words and key of tensor `name`'s draws for model
    `model_index` in `stream`, as the compiled kernels take them (the counter's low words are
    the flat index)."""
    return (tensor_stream_id(name), *_model_key(seed, model_index, stream))


def _model_key(seed: int, model_index: int, stream: int) -> tuple[int, int, int]:
    """(c3, k0, k1): the counter word of model `model_index` in `stream`, and the seed's key words."""
    return model_index + (stream << 16), seed & _MASK32, (seed >> 32) & _MASK32


def _draw(seed: int, model_index: int, name: str, numel: int, start: int, device, stream: int) -> torch.Tensor:
    if torch.device(device).type == "cpu":
        from . import jit

        fast = jit.compiled(max(numel, jit.CALL_WORK))   # a torch Philox call costs ~80 operations
        if fast is not None:   # the same u, compiled (lines_fast/jit.py)
            u = torch.empty(numel, dtype=torch.float32)
            args = (start, u.numpy(), *stream_key(seed, model_index, name, stream))
            threads = min(torch.get_num_threads(), numel // SHARED_DRAW)
            if threads > 1:
                fast.fill_uniform_shared(*args, threads)
            elif numel:
                fast.fill_uniform(*args)
            return u
    return _draw_torch(seed, model_index, name, numel, start, device, stream)


def _draw_torch(seed: int, model_index: int, name: str, numel: int, start: int, device, stream: int) -> torch.Tensor:
    c2, c3, k0, k1 = stream_key(seed, model_index, name, stream)
    j = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    r0, _, _, _ = philox4x32_10(j & _MASK32, j >> 32, torch.full_like(j, c2), torch.full_like(j, c3), k0, k1)
    return uniform_from_bits(r0)
