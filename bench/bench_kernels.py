"""GPU benchmarks of the fused kernels (skipped without a GPU).

    pytest bench/bench_kernels.py --benchmark-only          # pytest-benchmark
    python bench/bench_kernels.py --json OUT.json [--numel N] [--models 3]

Cases, bf16, N fine-tuned models, >= 64M elements per tensor:
- copy:         device-to-device copy of a large tensor (the bandwidth ceiling), bytes read + written
- merge:        fused TIES merge with given thresholds
- histogram:    selection's pass 1 alone: the packed histograms of all N models in one launch
                (with its sampling launch); histogram_hot{32,64,128}_w{4,8}: the same with 32/64/128
                private slots for the sampled hot bins and 4/8 warps; histogram_zeros_only: only
                zeros private (the contention baseline)
- select_merge: tensor-scope TIES from scratch: histograms (+ refine where pass 1 did not
                settle a threshold), thresholds, merge
- reference:    lines_fast.reference's TIES on the same GPU tensors (for the speedup)
- backend:      TritonBackend("cuda").merge_many from CPU tensors to CPU output (host <-> GPU)
- variants:     the fused merge launch alone for each newer per-element step, statistics found
                beforehand: breadcrumbs (the band's ceiling), slerp and model_stock (per-group
                Gram weights, slerp on base + one model), ties with a consensus mask (a second
                read of each block), ties with rule: official (the majority-sign election)
GB/s counts the minimal bytes of a merge: N + 1 inputs read once and one output written,
even where a pass reads more (selection reads the inputs again), so it compares directly
with copy GB/s; `histogram` counts its own N + 1 inputs. select_merge also reports the
bytes it really moves (pass 1, refines, merge) and the GB/s on those.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pytest  # noqa: E402

NUMEL = 64 << 20
REPS_CAP = 1 << 30  # the smoke test lowers it
N_MODELS = 3
DENSITY = 0.2
NAME = "model.layers.7.mlp.down_proj.weight"
HAS_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
# Without a GPU, run_all can still run end to end in Triton's interpreter on CPU tensors, at a
# tiny size: tests/test_bench_kernels.py does, so this script cannot break unseen before a
# (scarce) GPU session. Its numbers then mean nothing.
DEVICE = "cuda" if HAS_GPU else "cpu"


def _kernels():
    from lines_fast.backends.triton_backend import import_kernels

    return import_kernels()


def make_inputs(numel: int, n_models: int, dtype=torch.bfloat16, seed: int = 0):
    """A base and fine-tunes on the GPU: small deltas with some exact zeros (never all zeros)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    base = torch.randn(numel, generator=g, device=DEVICE).to(dtype)
    models = []
    for _ in range(n_models):
        delta = 0.01 * torch.randn(numel, generator=g, device=DEVICE)
        delta[torch.rand(numel, generator=g, device=DEVICE) < 0.05] = 0
        models.append((base.float() + delta).to(dtype))
    return base, models


def ties_spec(n_models: int):
    from lines_fast.spec import make_spec

    return make_spec("ties", n_models, values={"density": DENSITY})


class Case:
    """The GPU callables of every benchmark case on one set of inputs."""

    def __init__(self, numel: int = NUMEL, n_models: int = N_MODELS):
        kmerge, kselect = _kernels()
        self.kmerge, self.kselect = kmerge, kselect
        self.numel, self.n_models = numel, n_models
        self.base, self.models = make_inputs(numel, n_models)
        self.staged = torch.stack(self.models)  # the backend's [N, n] staging layout
        self.out = torch.empty(numel, dtype=torch.bfloat16, device=DEVICE)
        self.spec = ties_spec(n_models)
        from lines_fast.plan import ElementPlan, TensorStats

        self.plan = ElementPlan.from_spec(self.spec)
        self.thresholds, _ = kselect.resident_thresholds(self.base, self.staged, self.plan.magnitude_ranks(numel), n=numel)
        self.table = self.plan.table(self.plan.stats_from_thresholds(self.thresholds), DEVICE)
        # as many bytes as the merge moves: (N + 2) tensors of numel bf16 values
        self.copy_src = torch.randn(numel * (n_models + 2), device=DEVICE).to(torch.bfloat16)
        self.copy_dst = torch.empty_like(self.copy_src)
        es = self.base.element_size()
        self.merge_bytes = (n_models + 1) * numel * es + numel * es
        self.copy_bytes = 2 * self.copy_src.numel() * self.copy_src.element_size()
        self.hist32 = torch.zeros(n_models, kselect.BINS, dtype=torch.int32, device=DEVICE)
        self.histogram_bytes = (n_models + 1) * numel * es
        # Models whose threshold pass 1 did not settle: each costs a refine pass (base + model).
        self.histogram()
        from lines_fast.selection import locate_kth
        from lines_fast.spec import kept_count

        hist = self.hist32.to(torch.int64).cpu()
        k = kept_count(DENSITY, numel)
        self.refined_models = sum(not locate_kth(hist[i], k).settled for i in range(n_models))
        self.select_merge_bytes_moved = self.histogram_bytes + self.refined_models * 2 * numel * es + self.merge_bytes

    def copy(self):
        self.copy_dst.copy_(self.copy_src)

    def merge(self, table=None):
        from lines_fast.rng import tensor_stream_id

        self.kmerge.launch_merge(self.out, self.base, self.staged, table if table is not None else self.table,
                                 self.plan, n=self.numel, scale=1.0, stream_id=tensor_stream_id(NAME))

    def histogram(self, hot=None, num_warps=None):
        self.hist32.zero_()
        extra = {} if num_warps is None else {"num_warps": num_warps}
        self.kselect.launch_magnitude_histogram(self.hist32, self.base, self.staged, n=self.numel, hot=hot, **extra)

    def hot_bins(self, slots: int):
        """The sampled hot bins with `slots` private slots (sampling kept out of the timing)."""
        return self.kselect.sample_hot_bins(self.base, self.staged, n=self.numel, block=self.kmerge.BLOCK,
                                            slots=slots)

    def select_merge(self):
        thresholds, _ = self.kselect.resident_thresholds(self.base, self.staged, self.plan.magnitude_ranks(self.numel),
                                                       n=self.numel)
        self.merge(self.plan.table(self.plan.stats_from_thresholds(thresholds), DEVICE))

    def reference(self):
        from lines_fast import reference as ref

        return ref.merge_state_dicts({NAME: self.base}, [{NAME: m} for m in self.models], "ties", density=DENSITY)


# The newer per-element steps, as (method, parameters) the kernel benchmark times one launch of.
VARIANTS = {
    "breadcrumbs": ("breadcrumbs", {"density": 0.9, "gamma": 0.01}),
    "slerp": ("slerp", {"t": 0.3}),
    "model_stock": ("model_stock", {}),
    "ties_consensus": ("ties", {"density": DENSITY, "consensus": {"k": 2}}),
    "ties_official": ("ties", {"density": DENSITY, "trim_scope": "global", "rule": "official"}),
    # DELLA's ranked drop: the kernel also reads each element's float32 drop probability
    "della": ("della", {"density": 0.5, "rescale": False}),
}


def variant_launch(case: "Case", method: str, values: dict):
    """(callable launching the fused merge for `method`, bytes it moves): statistics first, as the
    backend finds them (thresholds from the histograms, Gram weights), then only the launch."""
    from dataclasses import replace

    from lines_fast import methods
    from lines_fast.gram import group_view, new_gram
    from lines_fast.plan import ElementPlan, TensorStats, add_gram, group_weights
    from lines_fast.rng import tensor_stream_id
    from lines_fast.spec import make_spec

    definition = methods.get(method)
    rows = [case.base, case.models[0]] if definition.inputs is methods.Inputs.BASE_AND_MODELS else case.models
    spec = make_spec(method, len(rows), values=values)
    plan = ElementPlan.from_spec(spec)
    staged = torch.stack(rows)
    stats = TensorStats()
    if plan.trims:   # global thresholds of a one-tensor model are its tensor thresholds
        found, _ = case.kselect.resident_thresholds(case.base, staged, plan.magnitude_ranks(case.numel), n=case.numel)
        stats = plan.stats_from_thresholds(found)
    if plan.grouped:
        view = group_view((case.numel,), plan.group_by)
        gram = new_gram(view, len(rows), device=DEVICE)
        add_gram(plan, case.base, list(staged), 0, view, gram)
        stats = replace(stats, group_weights=group_weights(plan, gram))
    if plan.official:
        stats = replace(stats, zero_sign=1.0)
    table = plan.table(stats, DEVICE)
    extras = case.kmerge.tensor_args(plan, stats, (case.numel,), DEVICE)
    if plan.ranked:   # rows of 4096 (the tensor is flat here); ranked on the device, outside the timing
        row = 4096 if case.numel % 4096 == 0 else case.numel
        extras["drop_p"] = case.kmerge.ranked_drop_probabilities(plan, case.base, staged, row)
    base = case.base if plan.uses_base else None

    def launch():
        case.kmerge.launch_merge(case.out, base, staged, table, plan, n=case.numel, scale=1.0,
                                 stream_id=tensor_stream_id(NAME), **extras)

    es = case.base.element_size()
    drop_bytes = len(rows) * case.numel * 4 if plan.ranked else 0
    return launch, (len(rows) + (1 if plan.uses_base else 0)) * case.numel * es + case.numel * es + drop_bytes


def time_gpu(fn, reps: int = 20) -> float:
    """Median seconds of fn() with CUDA events, after warm-up (compilation stays out)."""
    reps = min(reps, REPS_CAP)
    for _ in range(min(3, reps)):
        fn()
    if not HAS_GPU:  # the interpreter smoke run: wall clock, nothing to synchronize
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    times.sort()
    return times[len(times) // 2]


def time_backend(case: Case, reps: int = 3) -> tuple[float, int]:
    """Median seconds of TritonBackend('cuda').merge_many over the case as CPU tensors; peak GPU bytes."""
    from lines_fast.backends.base import MergeJob
    from lines_fast.backends.triton_backend import TritonBackend

    base, models = case.base.cpu(), [m.cpu() for m in case.models]
    be = TritonBackend("cuda" if HAS_GPU else "interpret")
    if HAS_GPU:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(min(reps, REPS_CAP)):
        jobs = [MergeJob(NAME, base, models, None, 1.0, torch.bfloat16)]
        t0 = time.perf_counter()
        for _job, _out, _stats in be.merge_many(jobs, case.plan):
            pass
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], be.peak_gpu_bytes()


def run_all(numel: int = NUMEL, n_models: int = N_MODELS, with_reference: bool = True) -> dict:
    import triton

    case = Case(numel, n_models)
    copy_s = time_gpu(case.copy)
    copy_gbs = case.copy_bytes / copy_s / 1e9
    result = {
        "device": torch.cuda.get_device_name() if HAS_GPU else "cpu (Triton interpreter: a smoke run, not a measurement)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": "bfloat16",
        "numel": numel,
        "n_models": n_models,
        "density": DENSITY,
        "copy": {"bytes": case.copy_bytes, "seconds": copy_s, "GB/s": copy_gbs},
    }
    cases = {"merge": case.merge, "histogram": case.histogram, "select_merge": case.select_merge}
    if with_reference:
        cases["reference"] = case.reference
    for name, fn in cases.items():
        seconds = time_gpu(fn, reps=5 if name == "reference" else 20)
        nbytes = case.histogram_bytes if name == "histogram" else case.merge_bytes
        gbs = nbytes / seconds / 1e9
        result[name] = {"bytes": nbytes, "seconds": seconds, "GB/s": gbs, "pct_of_copy": 100 * gbs / copy_gbs}
    # Tuning: private slots for the hot bins (compute) against global atomics (contention),
    # and 4 or 8 warps per program (the compiled kernel holds ~80-110 registers per thread).
    for slots in (32, 64, 128):
        hot = case.hot_bins(slots)
        for warps in (4, 8):
            seconds = time_gpu(lambda hot=hot, warps=warps: case.histogram(hot, warps))
            gbs = case.histogram_bytes / seconds / 1e9
            result[f"histogram_hot{slots}_w{warps}"] = {"bytes": case.histogram_bytes, "seconds": seconds,
                                                        "GB/s": gbs, "pct_of_copy": 100 * gbs / copy_gbs}
    no_private = case.kselect.HotBins.lowest(DEVICE, 32)  # only exact zeros private: the contention baseline
    seconds = time_gpu(lambda: case.histogram(no_private), reps=5)
    result["histogram_zeros_only"] = {"bytes": case.histogram_bytes, "seconds": seconds,
                                      "GB/s": case.histogram_bytes / seconds / 1e9,
                                      "pct_of_copy": 100 * case.histogram_bytes / seconds / 1e9 / copy_gbs}
    moved = case.select_merge_bytes_moved
    result["select_merge"].update({
        "refined_models": case.refined_models, "bytes_moved": moved,
        "GB/s_moved": moved / result["select_merge"]["seconds"] / 1e9,
        "pct_of_copy_moved": 100 * moved / result["select_merge"]["seconds"] / 1e9 / copy_gbs})
    if with_reference:
        for name in ("merge", "select_merge"):
            result[name]["speedup_vs_reference"] = result["reference"]["seconds"] / result[name]["seconds"]
    for name, (method, values) in VARIANTS.items():
        launch, nbytes = variant_launch(case, method, values)
        seconds = time_gpu(launch)
        result[f"variant_{name}"] = {"bytes": nbytes, "seconds": seconds, "GB/s": nbytes / seconds / 1e9,
                                     "pct_of_copy": 100 * nbytes / seconds / 1e9 / copy_gbs}
    seconds, peak = time_backend(case)
    result["backend"] = {"bytes_host": case.merge_bytes, "seconds": seconds,
                         "GB/s": case.merge_bytes / seconds / 1e9, "peak_gpu_bytes": peak}
    return result


# ---------------------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------------------

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def case():
    return Case()


@pytest.fixture(scope="module")
def copy_gbs(case):
    return case.copy_bytes / time_gpu(case.copy) / 1e9


def _bench(benchmark, fn, nbytes: int, copy_gbs: float | None = None, rounds: int = 20):
    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=2, iterations=1)
    seconds = benchmark.stats.stats.median
    gbs = nbytes / seconds / 1e9
    benchmark.extra_info.update({"bytes": nbytes, "GB/s": round(gbs, 1)})
    if copy_gbs:
        benchmark.extra_info.update({"copy GB/s": round(copy_gbs, 1), "% of copy": round(100 * gbs / copy_gbs, 1)})
    return seconds


def test_copy_bandwidth(benchmark, case):
    _bench(benchmark, case.copy, case.copy_bytes)


def test_fused_ties_merge(benchmark, case, copy_gbs):
    _bench(benchmark, case.merge, case.merge_bytes, copy_gbs)


def test_selection_histogram_pass(benchmark, case, copy_gbs):
    _bench(benchmark, case.histogram, case.histogram_bytes, copy_gbs)


def test_ties_select_and_merge(benchmark, case, copy_gbs):
    _bench(benchmark, case.select_merge, case.merge_bytes, copy_gbs)


def test_reference_ties_on_gpu(benchmark, case, copy_gbs):
    _bench(benchmark, case.reference, case.merge_bytes, copy_gbs, rounds=3)


# ---------------------------------------------------------------------------------------
# Script mode
# ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--numel", type=int, default=NUMEL)
    parser.add_argument("--models", type=int, default=N_MODELS)
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow, memory-hungry) reference")
    args = parser.parse_args(argv)
    if not HAS_GPU:
        print("no CUDA GPU: nothing to benchmark", file=sys.stderr)
        return 1
    result = run_all(args.numel, args.models, with_reference=not args.no_reference)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'case':<14}{'ms':>10}{'GB/s':>10}{'% copy':>8}")
    for name in ("copy", "merge", "histogram", *(f"histogram_hot{s}_w{w}" for s in (32, 64, 128) for w in (4, 8)),
                 "histogram_zeros_only", "select_merge", "reference", "backend"):
        if name in result:
            r = result[name]
            print(f"{name:<14}{1e3 * r['seconds']:>10.3f}{r['GB/s']:>10.1f}{r.get('pct_of_copy', 100.0 if name == 'copy' else float('nan')):>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
