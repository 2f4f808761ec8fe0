"""Every registered method x its options x backend, against the reference -- derived from the
registry, so a new method (or a new parameter) is covered without writing new cases.

For each method the cases vary one parameter at a time away from its default (values
derived from the parameter's kind and range), then add LiNeS (given, auto, and the α = 1,
β = 0 identity), an fp32 output, weights of mixed sign, and everything non-default at once.
Inputs are small bf16 tensors with exact zeros, equal magnitudes (ties) and tensors split
into several chunks/parts. The backends (CPU, and the Triton kernels in the interpreter)
must match lines_fast.reference within docs/methods.md's tolerances.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lines_fast import methods, reference as ref
from lines_fast.backends.base import MergeJob
from lines_fast.backends.cpu import CpuBackend
from lines_fast.errors import MergeInputError
from lines_fast.layers import lines_scales
from lines_fast.methods import Inputs, Param
from lines_fast.plan import ElementPlan, TensorStats
from lines_fast.spec import LinesSpec, MethodSpec, make_spec, official_kept_count
from lines_fast.tolerance import compare

SHAPES = {
    "model.embed_tokens.weight": (40, 30),       # several chunks / parts
    "model.layers.0.mlp.up_proj.weight": (20, 25),
    "model.layers.1.mlp.up_proj.weight": (13, 23),
    "model.norm.weight": (23,),
}
NAMES = list(SHAPES)


def family(n_models: int, seed: int = 0):
    """bf16 base and fine-tunes: deltas on a coarse grid (many equal magnitudes), ~20% exact zeros."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in SHAPES.items()}
    models = []
    for i in range(n_models):
        model = {}
        for n, t in base.items():
            delta = torch.randint(-4, 5, t.shape, generator=g).float() * 0.01 * (i + 1)
            delta[torch.rand(t.shape, generator=g) < 0.2] = 0.0
            model[n] = (t.float() + delta).to(torch.bfloat16)
        models.append(model)
    return base, models


# ---------------------------------------------------------------------------------------
# Cases from the registry
# ---------------------------------------------------------------------------------------

def _n_models(method: methods.Method) -> int:
    return min(3, method.max_models or 3)


def other_values(param: Param, n: int) -> list:
    """Values of `param` other than its default that a test should try."""
    if param.name == "weight":
        return [[1.0, 0.5, 2.0][:n]]
    if param.name == "density":
        return [0.3, [0.2, 0.5, 1.0][:n]]
    if param.kind == "bool":
        return [not param.default]
    if param.kind == "mapping":   # consensus: the paper's k = 2, and a looser mask
        return [{"k": 2}, {"k": 1, "lambda": 0.1}]
    if param.kind == "choice":
        return [c for c in param.choices if c != param.default]
    if param.kind == "integer":
        return [12345]
    if math.isfinite(param.low) and math.isfinite(param.high):
        bounds = [param.low] * (not param.low_open) + [0.3] + [param.high] * (not param.high_open)
        return [v for v in bounds if v != param.default]
    return [0.7]


# Values that need others to be valid (the official TIES rule is global, with every weight 1).
COMPANIONS = {("rule", "official"): {"trim_scope": "global", "density": 0.3}}


def companions(name: str, value) -> dict:
    return COMPANIONS.get((name, value), {}) if isinstance(value, (str, int, float, bool)) else {}


def required_values(method: methods.Method) -> dict:
    """A value for each parameter the method has no default for (slerp's t)."""
    return {p.name: 0.4 for p in method.params if p.required}


def inputs_for(method: str, base, models):
    """The method's inputs from a family: the base first where it is an input (slerp)."""
    if methods.get(method).inputs is Inputs.BASE_AND_MODELS:
        return [base, *models[:-1]]
    return models


def cases():
    for method in methods.REGISTRY.values():
        n = _n_models(method)
        required = required_values(method)
        yield method.name, dict(required), None
        combined = dict(required)
        for param in method.params:
            if not param.affects_result:
                continue
            for value in other_values(param, n):
                yield method.name, {**required, param.name: value, **companions(param.name, value)}, None
            if not companions(param.name, other_values(param, n)[0]):
                combined[param.name] = other_values(param, n)[0]
        if len(combined) > 1:
            if combined.get("normalize") and method.takes("weight"):
                combined["weight"] = [1.0, 0.5, 2.0][:n]
            yield method.name, combined, None
        if method.takes("weight") and method.takes("normalize") and n > 1:
            yield method.name, {"weight": [1.0, -0.5, 2.0][:n], "normalize": False}, None  # mixed signs
        yield method.name, dict(required), LinesSpec(alpha=0.5, beta=1.0, outside="last")
        yield method.name, dict(required), LinesSpec(alpha="auto", beta=0.8)


CASES = list(cases())


def _kernel_key(case):
    """What decides the kernel's code path: the plan's steps, LiNeS's kind and the trim scope."""
    method, values, lines = case
    plan = ElementPlan.from_spec(make_spec(method, _n_models(methods.get(method)), values=values, lines=lines))
    return (plan.uses_base, plan.deltas, plan.sparsify, plan.rescale, plan.consensus, plan.normalize,
            plan.coefficients, plan.group_by, plan.tall_k > 0, plan.global_thresholds, None if lines is None else lines.alpha == "auto", min(plan.weights) < 0)


# The interpreter runs one case per distinct code path (it costs seconds a case); the CPU all.
KERNEL_CASES = list({_kernel_key(c): c for c in reversed(CASES)}.values())


def _id(case) -> str:
    method, values, lines = case
    text = ",".join(f"{k}={v}" for k, v in values.items()) or "defaults"
    return f"{method}[{text}]" + ("" if lines is None else f"+lines({lines.alpha},{lines.beta})")


def test_every_method_and_parameter_has_cases():
    """The matrix follows the registry: each method appears, and each of its parameters is varied."""
    for method in methods.REGISTRY.values():
        varied = {k for m, values, _ in CASES if m == method.name for k in values}
        assert varied == {p.name for p in method.params if p.affects_result}, method.name
        assert any(m == method.name and lines is not None for m, _, lines in CASES)


def test_a_parameter_that_applies_only_with_another_names_one_of_the_same_method():
    """only_with points at a parameter every method taking this one also takes, with a value it
    accepts (else the config's notice would look up nothing, or ask for the impossible)."""
    conditional = [(m, p) for m in methods.REGISTRY.values() for p in m.params if p.only_with]
    assert conditional   # nuslerp_row_wise, at least
    for method, param in conditional:
        other, wanted = param.only_with
        assert method.takes(other), (method.name, param.name)
        assert make_spec(method.name, 2, values={other: wanted, param.name: not param.default}).value(other) == wanted


def test_unused_note_says_so_only_where_the_setting_would_change_something():
    row_wise = methods.get("nuslerp").param("nuslerp_row_wise")
    assert row_wise.unused_note(True, True) == ("nuslerp_row_wise: true has no effect while nuslerp_flatten is "
                                                "true; set nuslerp_flatten: false for it to apply.")
    assert row_wise.unused_note(True, False) is None      # applies
    assert row_wise.unused_note(False, True) is None      # the default: nothing asked for
    assert row_wise.unused_note([{"filter": "mlp", "value": True}], True) is None   # per tensor: not judged


# ---------------------------------------------------------------------------------------
# Driving a backend as the engine does
# ---------------------------------------------------------------------------------------

def backend_merge(backend, base, models, spec: MethodSpec, out_dtype):
    """The merged state of NAMES through `backend` (global thresholds and α auto as the engine
    finds them: thresholds from the reference here, α from the backend's own norms)."""
    plan = ElementPlan.from_spec(spec)
    reason = backend.supports(plan)
    if reason is not None:   # test_kernel_gaps_are_the_known_ones pins which plans these are
        pytest.skip(f"the {backend.name} backend cannot run {spec.method}: {reason}")
    given = {}
    if plan.global_thresholds:
        taus = [ref.task_vectors(base, m, NAMES) for m in models]
        if plan.official:   # the official code's count over the whole model
            flat = [torch.cat([t[n].flatten() for n in NAMES]) for t in taus]
            per_model = [dict.fromkeys(NAMES, ref.kth_largest_abs(f, official_kept_count(d, f.numel())))
                         for f, d in zip(flat, spec.densities)]
        else:
            per_model = [ref.trim_thresholds(t, d, "global", NAMES) for t, d in zip(taus, spec.densities)]
        given = {n: TensorStats(thresholds=tuple(p[n] for p in per_model)) for n in NAMES}
        if plan.official:   # the majority sign, from the backend's own sign sums (as the engine does)
            total = sum(backend.elected_sign_sum(MergeJob(n, base[n], [m[n] for m in models], given[n], 1.0,
                                                          torch.float32), plan) for n in NAMES)
            given = {n: dataclasses.replace(s, zero_sign=-1.0 if total < 0 else 1.0) for n, s in given.items()}

    def job(name, scale=1.0, dtype=torch.float32):
        return MergeJob(name, base[name] if plan.uses_base else None, [m[name] for m in models],
                        given.get(name), scale, dtype)

    alpha = None
    if spec.lines is None:
        scales = dict.fromkeys(NAMES, spec.lam if plan.uses_base else 1.0)
    else:
        alpha = spec.lines.alpha
        if alpha == "auto":
            norms = [backend.delta_norms(job(name), plan) for name in NAMES]
            alpha = math.fsum(t for t, _, _ in norms) / math.fsum(d for _, d, _ in norms) / spec.finetuned_inputs
        scales = lines_scales(NAMES, alpha, spec.lines.beta, spec.lines.outside)
    jobs = [dataclasses.replace(job(n, scales[n], out_dtype), plan=plan.at_scale(scales[n])) for n in NAMES]
    out = {j.name: o for j, o, _ in backend.merge_many(jobs, plan)}
    return out, alpha


def make_backend(kind: str):
    if kind == "cpu":
        return CpuBackend(chunk=256)
    if kind == "cpu-compiled":   # the compiled path where the plan allows (backends/cpu_fused.py)
        from lines_fast import jit
        if jit.kernels() is None:
            pytest.skip("numba is not installed")
        return CpuBackend(chunk=2500, compiled=True)   # chunks of several kernel blocks
    pytest.importorskip("triton")
    from lines_fast.backends.triton_backend import TritonBackend, import_kernels

    kmerge, _ = import_kernels()
    if not kmerge._interpreted(kmerge._fused_merge_kernel) and not torch.cuda.is_available():
        pytest.skip("compiled Triton kernels need a GPU")
    device = "interpret" if kmerge._interpreted(kmerge._fused_merge_kernel) else "cuda"
    return TritonBackend(device)  # one part per tensor: test_triton_backend.py covers the multi-part paths


def check_equal_to_reference(backend_kind, method, values, lines, out_dtype=torch.bfloat16):
    n = _n_models(methods.get(method))
    base, models = family(n, seed=len(method) + 7 * len(values))
    models = inputs_for(method, base, models)
    spec = make_spec(method, n, values=values, lines=lines)
    want = ref.merge_with_spec(base, models, spec, out_dtype=out_dtype)
    got, _ = backend_merge(make_backend(backend_kind), base, models, spec, out_dtype)
    for name in NAMES:
        verdict = compare(got[name], want[name])
        assert verdict.ok, f"{name}: {verdict.why} (max diff {verdict.max_abs_diff})"
    return got


@pytest.mark.parametrize("kind", ["cpu", "cpu-compiled"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cpu_backend_equals_reference(case, kind):
    check_equal_to_reference(kind, *case)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=_id)
def test_kernels_equal_reference(case):
    check_equal_to_reference("interpret", *case)


@pytest.mark.parametrize("method", methods.names())
@pytest.mark.parametrize("backend_kind", ["cpu", "interpret"])
def test_fp32_output(backend_kind, method):
    check_equal_to_reference(backend_kind, method, required_values(methods.get(method)), None,
                             out_dtype=torch.float32)


@pytest.mark.parametrize("method", methods.names())
@pytest.mark.parametrize("backend_kind", ["cpu", "interpret"])
def test_lines_alpha_one_beta_zero_is_the_plain_method(backend_kind, method):
    """τ_MTL = θ_method − θ0 for every method, so LiNeS(α = 1, β = 0) is the plain method,
    bitwise: for a method whose result is a model (a soup, slerp) θ0 + 1·(θ_method − θ0) would
    round twice more, so a scale of 1 takes θ_method itself (ElementPlan.at_scale), in the
    reference too."""
    definition = methods.get(method)
    n = _n_models(definition)
    base, models = family(n, seed=3)
    models = inputs_for(method, base, models)
    values = {"lambda": 1.0} if definition.takes("lambda") else {}
    values.update(required_values(definition))
    f32 = torch.float32   # float32 output: a second rounding shows in most tensors there, rarely in bf16
    plain = ref.merge_with_spec(base, models, make_spec(method, n, values=values), out_dtype=f32)
    identity = make_spec(method, n, values={k: v for k, v in values.items() if k != "lambda"},
                         lines=LinesSpec(alpha=1.0, beta=0.0))
    got, _ = backend_merge(make_backend(backend_kind), base, models, identity, f32)
    want = ref.merge_with_spec(base, models, identity, out_dtype=f32)
    for name in NAMES:
        assert torch.equal(want[name].view(torch.int32), plain[name].view(torch.int32)), name
        assert torch.equal(got[name].view(torch.int32), plain[name].view(torch.int32)), name


# ---------------------------------------------------------------------------------------
# Regressions and refusals
# ---------------------------------------------------------------------------------------

def test_regression_wise_ft_weight_is_refused_not_applied():
    """Was: the CPU backend multiplied wise_ft by a model weight the reference ignored (0.0215
    max diff). wise_ft takes no weight: giving one is an error, and the plan's weight is 1."""
    with pytest.raises(MergeInputError, match="weight is not a parameter of wise_ft"):
        make_spec("wise_ft", 1, model_values={"weight": [2.0]})
    assert ElementPlan.from_spec(make_spec("wise_ft", 1)).weights == (1.0,)
    for kind in ("cpu", "interpret"):
        check_equal_to_reference(kind, "wise_ft", {"lambda": 0.5}, None)


@pytest.mark.parametrize("backend_kind", ["cpu", "interpret"])
def test_regression_linear_lines_without_normalize_does_not_divide(backend_kind):
    """Was: linear + LiNeS with normalize: false divided by the weight sum on the CPU (0.0273)."""
    got = check_equal_to_reference(backend_kind, "linear", {"normalize": False, "weight": [0.5, 0.25, 0.5]},
                                   LinesSpec(alpha=1.0, beta=0.5))
    base, models = family(3, seed=len("linear") + 14)
    name = "model.layers.1.mlp.up_proj.weight"
    # θ = θ0 + λ(ℓ) (Σ w_i θ_i − θ0): block 1 of 2, so λ = 1.5
    soup = sum(torch.tensor(w) * m[name].float() for w, m in zip([0.5, 0.25, 0.5], models))
    expected = (base[name].float() + torch.tensor(1.5) * (soup - base[name].float())).bfloat16()
    assert compare(got[name], expected).ok


def test_kernel_gaps_are_the_known_ones():
    """Both backends run every registered method (della's per-row ranked drop included)."""
    pytest.importorskip("triton")
    from lines_fast.backends.triton_backend import import_kernels

    kmerge, _ = import_kernels()
    gaps = set()
    for method in methods.REGISTRY.values():
        values = {**required_values(method), **({"density": 0.5} if method.takes("density") else {})}
        plan = ElementPlan.from_spec(make_spec(method.name, _n_models(method), values=values))
        assert CpuBackend().supports(plan) is None, method.name
        if kmerge.unsupported(plan) is not None:
            gaps.add(method.name)
    assert gaps == set()


def test_a_plan_step_no_backend_implements_is_refused():
    """A method registered with a step the backends do not know is refused before any work."""
    plan = ElementPlan.from_spec(make_spec("ties", 2, values={"density": 0.5}))
    unknown = dataclasses.replace(plan, sparsify="magnitude_outliers")
    assert CpuBackend().supports(plan) is None
    assert "sparsify" in CpuBackend().supports(unknown)
    pytest.importorskip("triton")
    from lines_fast.backends.triton_backend import import_kernels

    kmerge, _ = import_kernels()
    assert kmerge.unsupported(plan) is None and "sparsify" in kmerge.unsupported(unknown)


def test_engine_refuses_a_method_its_backend_cannot_run(tmp_path, monkeypatch):
    from lines_fast import engine
    from lines_fast.synth import recipe, write_checkpoint_family

    fam = write_checkpoint_family(tmp_path / "fam", recipe("tiny"), n_finetunes=2, dtype=torch.bfloat16)
    fake = dataclasses.replace(methods.get("ties"), name="ties_next")
    monkeypatch.setitem(methods.REGISTRY, "ties_next", fake)
    monkeypatch.setattr(CpuBackend, "supports", lambda self, plan: "it has no sparsify step 'next'")
    doc = {"merge_method": "ties_next", "base_model": str(fam.base),
           "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in fam.finetunes]}
    with pytest.raises(MergeInputError, match="cpu backend cannot run ties_next"):
        engine.merge(doc, tmp_path / "out", device="cpu", progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# What users read comes from the registry too
# ---------------------------------------------------------------------------------------

def test_readme_method_table_is_the_registry():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert methods.markdown_table() in readme, "README's method table is stale: paste methods.markdown_table()"
    docs = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    assert methods.parameters_table() in docs, "docs/methods.md's parameter table is stale: paste methods.parameters_table()"


def test_merge_help_lists_every_method_with_its_parameters(capsys):
    from lines_fast import cli

    with pytest.raises(SystemExit):
        cli.main(["merge", "--help"])
    text = capsys.readouterr().out
    for method in methods.REGISTRY.values():
        assert method.name in text and method.summary in text
        for param in method.params:
            if param.affects_result:
                assert f"{param.name}=" in text


def test_docs_state_every_method_and_never_point_outside_the_repo():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "methods.md").read_text()
    for method in methods.REGISTRY.values():
        assert f"`{method.name}`" in doc, method.name
    for path in [root / "README.md", *root.glob("docs/*.md"), *root.glob("lines_fast/**/*.py"),
                 *root.glob("kernels/*.py")]:
        text = path.read_text()
        outside = ("..", "shared")  # the contract folder a clone does not have, spelled out in parts
        assert "/".join(outside) not in text and "SEMANTICS" + ".md" not in text, path


def test_regressions_through_the_cli(tmp_path, capsys):
    """The two bugs as users met them: `lines-fast generate tiny`, then merge from the CLI."""
    from lines_fast import cli
    from helpers import load

    assert cli.main(["generate", "tiny", str(tmp_path / "fam"), "--models", "3"]) == 0
    fam = tmp_path / "fam"
    # wise_ft with a weight: refused by name, exit 2, nothing written
    code = cli.main(["merge", "--method", "wise_ft", "--base", str(fam / "base"), "--model", str(fam / "ft1"),
                     "--weight", "2.0", "-o", str(tmp_path / "wise"), "-q", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "weight is not a parameter of wise_ft" in err and "Traceback" not in err
    assert not (tmp_path / "wise").exists()
    # linear + LiNeS without normalize: the CPU backend's file equals the reference
    code = cli.main(["merge", "--method", "linear", "--base", str(fam / "base"),
                     *[a for i in (1, 2, 3) for a in ("--model", str(fam / f"ft{i}"))],
                     "--weight", "0.5", "--weight", "0.25", "--weight", "0.5", "--no-normalize",
                     "--lines-alpha", "1.0", "--lines-beta", "0.5", "--device", "cpu",
                     "-o", str(tmp_path / "soup"), "-q", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    base, models = load(fam / "base"), [load(fam / f"ft{i}") for i in (1, 2, 3)]
    want = ref.merge_state_dicts(base, models, "linear", weights=[0.5, 0.25, 0.5], normalize=False,
                                 lines=LinesSpec(alpha=1.0, beta=0.5))
    got = load(tmp_path / "soup")
    for name, tensor in want.items():
        verdict = compare(got[name], tensor)
        assert verdict.ok and verdict.n_different == 0, (name, verdict.why)


def test_lambda_with_lines_is_refused_not_ignored():
    """LiNeS replaces λ: a λ given with it would be silently ignored, so it is an error."""
    with pytest.raises(MergeInputError, match="LiNeS, which replaces it"):
        make_spec("ties", 2, values={"lambda": 0.5, "density": 0.5}, lines=LinesSpec(1.0, 0.5))
    assert make_spec("ties", 2, values={"density": 0.5}, lines=LinesSpec(1.0, 0.5)).lam == 1.0


def test_review_findings_are_refused_or_caught(tmp_path):
    """Inputs a review found slipping through: each is now refused or caught."""
    from lines_fast.config import from_yaml_dict
    from lines_fast.errors import NonFiniteInput

    # a NaN in a soup's LiNeS base is caught on the CPU too (the kernels flag it)
    base = {"layers.0.w": torch.tensor([1.0, float("nan")])}
    models = [{"layers.0.w": torch.tensor([1.0, 1.0])}, {"layers.0.w": torch.tensor([2.0, 2.0])}]
    spec = make_spec("linear", 2, lines=LinesSpec(0.5, 0.5))
    job = MergeJob("layers.0.w", base["layers.0.w"], [m["layers.0.w"] for m in models], None, 0.5, torch.float32)
    with pytest.raises(NonFiniteInput):
        list(CpuBackend().merge_many([job], ElementPlan.from_spec(spec)))
    # a top-level list is a mergekit gradient over depth, not per-model values: fine for a number,
    # refused for a boolean
    doc = {"merge_method": "ties", "base_model": "b", "models": ["x", "y"], "parameters": {"weight": [1, 2]}}
    assert from_yaml_dict(doc, "c.yml").spec_for_tensor("model.layers.0.w", 1.0).weights == (2.0, 2.0)
    doc["parameters"] = {"normalize": [True, False]}
    with pytest.raises(MergeInputError, match="takes one value, not a per-layer list"):
        from_yaml_dict(doc, "c.yml")
    # a seed given twice
    doc = {"merge_method": "dare_ties", "base_model": "b", "models": ["x"], "seed": 1, "parameters": {"seed": 2}}
    with pytest.raises(MergeInputError, match="seed is given twice"):
        from_yaml_dict(doc, "c.yml")
    # weights whose float32 sum is 0 under normalize
    with pytest.raises(MergeInputError, match="sum to 0"):
        make_spec("task_arithmetic", 2, values={"weight": [1e-46, 1e-46], "normalize": True})


def test_cli_overrides_are_blamed_on_the_option():
    from lines_fast.config import from_yaml_dict, with_overrides

    doc = {"merge_method": "ties", "base_model": "b", "models": ["x", "y", "z"]}
    config = from_yaml_dict(doc, "c.yml")
    with pytest.raises(MergeInputError, match="^--density: density 1.5 is outside"):
        with_overrides(config, densities=[1.5])
    assert with_overrides(config, densities=[0.5]).spec.densities == (0.5, 0.5, 0.5)
    soup = from_yaml_dict({"merge_method": "linear", "models": ["x", "y"]}, "c.yml")
    with pytest.raises(MergeInputError, match="^--density: density is not a parameter of linear"):
        with_overrides(soup, densities=[0.5])


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_every_method_takes_int8_mask_as_mergekit_does_and_it_changes_nothing(name):
    """Hub configs carry mergekit's int8_mask (a memory option) on slerp and linear merges too."""
    m = methods.get(name)
    n = m.min_models if m.max_models == m.min_models else max(2, m.min_models)
    required = {"t": 0.5} if name == "slerp" else {}
    plain = make_spec(name, n, values=required)
    masked = make_spec(name, n, values={**required, "int8_mask": True})
    assert ElementPlan.from_spec(masked) == ElementPlan.from_spec(plain)
