"""mergekit's `slices:` (layer ranges, renumbered), passthrough, and a base listed among the models.

Expected outputs are built here from the source checkpoints by renaming layers by hand and
merging each tensor with the reference, so the routing (which source layer lands where), the
per-slice gradient position, and LiNeS's output depth are each checked independently.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
import yaml

from lines_fast import cli
from lines_fast import reference as ref
from lines_fast.engine import merge
from lines_fast.errors import MergeInputError
from lines_fast.layers import BlockRef, lines_scale
from lines_fast.synth import recipe, write_checkpoint_family

from helpers import load

BF16 = torch.bfloat16
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A 6-layer tiny Llama family: base, ft1, ft2 (bf16)."""
    root = tmp_path_factory.mktemp("slices")
    return write_checkpoint_family(root / "fam", replace(recipe("tiny"), layers=6, name="tiny6"),
                                   n_finetunes=2, dtype=BF16)


def layer_name(name: str, k: int) -> str:
    return re.sub(r"\.layers\.\d+\.", f".layers.{k}.", name, count=1)


def layer_of(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def src(path, start, end, **params):
    out = {"model": str(path), "layer_range": [start, end]}
    if params:
        out["parameters"] = params
    return out


def run_merge(doc, out, device="cpu"):
    return merge(doc, out, device=device, progress=False, log=lambda m: None)


def devices():
    yield "cpu"
    pytest.importorskip("triton")
    yield "interpret"


def test_frankenmerge_routes_every_layer_and_renumbers(fam, tmp_path):
    ft1, ft2 = fam.finetunes[0], fam.finetunes[1]
    doc = {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [src(ft1, 0, 4)]}, {"sources": [src(ft2, 2, 6)]}, {"sources": [src(ft1, 5, 6)]}]}
    run_merge(doc, tmp_path / "out")
    got, a, b = load(tmp_path / "out"), load(ft1), load(ft2)
    # output layer k <- (model, source layer): 0-3 from ft1 0-3, 4-7 from ft2 2-5, 8 from ft1 5
    plan = [(a, k) for k in range(4)] + [(b, k) for k in range(2, 6)] + [(a, 5)]
    expected = {"model.embed_tokens.weight": a["model.embed_tokens.weight"],   # the first slice's
                "model.norm.weight": a["model.norm.weight"], "lm_head.weight": a["lm_head.weight"]}  # the last's
    for k, (sd, layer) in enumerate(plan):
        for name, t in sd.items():
            if layer_of(name) == layer:
                expected[layer_name(name, k)] = t
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 9


def test_passthrough_scale_and_post_weights_from_the_last_slice(fam, tmp_path):
    ft1, ft2 = fam.finetunes[0], fam.finetunes[1]
    doc = {"merge_method": "passthrough", "dtype": "bfloat16", "parameters": {"scale": 0.5},
           "slices": [{"sources": [src(ft1, 0, 2)]}, {"sources": [src(ft2, 4, 6)]}]}
    run_merge(doc, tmp_path / "out")
    got, a, b = load(tmp_path / "out"), load(ft1), load(ft2)
    half = lambda t: (t.float() * 0.5).to(BF16)   # noqa: E731  (exact: a power of two)
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], half(b["model.layers.5.mlp.up_proj.weight"]))
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], half(a["model.layers.1.mlp.up_proj.weight"]))
    assert torch.equal(got["lm_head.weight"], half(b["lm_head.weight"]))
    assert torch.equal(got["model.embed_tokens.weight"], half(a["model.embed_tokens.weight"]))


@pytest.mark.parametrize("device", list(devices()))
@pytest.mark.parametrize("scale", [None, 0.0])
def test_passthrough_copies_bits_and_keeps_the_sign_of_zero(fam, tmp_path, device, scale):
    """mergekit's passthrough returns the tensor itself (times its scale): a copied layer is the
    source's bytes, -0.0 included, and scale 0 gives -0.0 for negative weights (a product); a sum
    from +0.0 would give +0.0 for both."""
    import shutil
    from safetensors.torch import save_file

    source = tmp_path / "ft1"
    shutil.copytree(fam.finetunes[0], source)
    weights = load(fam.finetunes[0])
    for name, t in weights.items():
        if t.is_floating_point():
            t.view(-1)[::7] = -0.0
    for file in source.glob("*.safetensors"):
        file.unlink()
    save_file(weights, str(source / "model.safetensors"))
    doc = {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [{"sources": [src(source, 1, 4)]}]}
    if scale is not None:
        doc["parameters"] = {"scale": scale}
    run_merge(doc, tmp_path / "out", device)
    got = load(tmp_path / "out")
    up = got["model.layers.0.mlp.up_proj.weight"]
    want = weights["model.layers.1.mlp.up_proj.weight"]
    if scale is not None:
        want = (want.float() * scale).to(BF16)   # torch's product keeps the sign: -x * 0 = -0.0
        assert bool(torch.signbit(want.float()).any()) and not bool(want.float().ne(0).any())
    assert int((want.view(torch.int16) == -32768).sum()) > 0   # -0.0's bits are in the input
    assert torch.equal(up.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("device", list(devices()))
def test_slerp_slices_use_each_slices_own_gradient_position(fam, tmp_path, device):
    """mergekit evaluates a gradient at offset / (n - 1) within each slice, not over the output."""
    base, ft1 = fam.base, fam.finetunes[0]
    doc = {"merge_method": "slerp", "base_model": str(base), "dtype": "bfloat16",
           "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.25}]},
           "slices": [{"sources": [src(base, 0, 3), src(ft1, 0, 3)]},
                      {"sources": [src(base, 2, 5), src(ft1, 2, 5)]}]}
    run_merge(doc, tmp_path / "out", device)
    got, b, f = load(tmp_path / "out"), load(base), load(ft1)
    for k in range(6):
        source_layer, offset = (k, k) if k < 3 else (k - 1, k - 3)
        for name in [n for n in b if layer_of(n) == source_layer]:
            t = offset / 2 if "self_attn" in name else 0.25   # the gradient [0, 1] at offset / (3 - 1)
            spec = ref.spec_from_params("slerp", 2, t=t)
            want = ref.merge_with_spec(None, [{"w": b[name]}, {"w": f[name]}], spec, out_dtype=BF16)["w"]
            assert torch.equal(got[layer_name(name, k)], want), (k, name)
    spec = ref.spec_from_params("slerp", 2, t=0.25)   # outside the layers: t = 0.25 (the default entry)
    want = ref.merge_with_spec(None, [{"w": b["lm_head.weight"]}, {"w": f["lm_head.weight"]}], spec, out_dtype=BF16)
    assert torch.equal(got["lm_head.weight"], want["w"])


def test_lines_sees_the_output_depth_of_a_sliced_merge(fam, tmp_path):
    """Layers 1-2 of the sources appear twice; LiNeS scales output layer k by alpha + beta k / 5."""
    base, ft1 = fam.base, fam.finetunes[0]
    doc = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "bfloat16",
           "lines": {"alpha": 0.2, "beta": 0.8},
           "slices": [{"sources": [src(base, 0, 3), src(ft1, 0, 3)]},
                      {"sources": [src(ft1, 1, 4), src(base, 1, 4)]}]}   # the base found by name, any position
    run_merge(doc, tmp_path / "out")
    got, b, f = load(tmp_path / "out"), load(base), load(ft1)
    for k, source_layer in enumerate([0, 1, 2, 1, 2, 3]):
        scale = lines_scale(BlockRef("model.layers", k), 6, 0.2, 0.8)   # alpha + beta * k / 5
        for name in [n for n in b if layer_of(n) == source_layer]:
            tau = {name: f[name].float() - b[name].float()}
            want = ref.apply_task_vector({name: b[name]}, tau, scale)[name].to(BF16)
            assert torch.equal(got[layer_name(name, k)], want), (k, name)
    name = "lm_head.weight"   # outside the layers: alpha
    want = ref.apply_task_vector({name: b[name]}, {name: f[name].float() - b[name].float()}, 0.2)[name].to(BF16)
    assert torch.equal(got[name], want)


def test_a_base_listed_among_the_models_is_the_base(fam, tmp_path):
    """mergekit lists the base among the models freely; it is not a (zero) task vector."""
    base, ft1, ft2 = fam.base, fam.finetunes[0], fam.finetunes[1]
    models = [{"model": str(ft1), "parameters": {"density": 0.5, "weight": 1.0}},
              {"model": str(ft2), "parameters": {"density": 0.7, "weight": 0.5}}]
    doc = {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16", "models": models}
    listed = dict(doc, models=[{"model": str(base)}] + models)
    run_merge(doc, tmp_path / "a")
    run_merge(listed, tmp_path / "b")
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)
    # and as a slice source, in any position, with the same meaning
    sliced = dict(doc, models=None)
    del sliced["models"]
    sliced["slices"] = [{"sources": [src(ft1, 0, 6, density=0.5, weight=1.0), src(base, 0, 6),
                                     src(ft2, 0, 6, density=0.7, weight=0.5)]}]
    run_merge(sliced, tmp_path / "c")
    c = load(tmp_path / "c")
    assert all(torch.equal(a[n], c[n]) for n in a)


def test_parameters_per_slice_and_per_source_follow_mergekits_precedence(fam, tmp_path):
    """A source's parameters, then its slice's, then the top-level ones; outside the layers the
    first slice decides for embeddings and the last for the rest."""
    ft1, ft2 = fam.finetunes[0], fam.finetunes[1]
    doc = {"merge_method": "passthrough", "dtype": "bfloat16", "parameters": {"scale": 0.25},
           "slices": [{"sources": [src(ft1, 0, 2)]},
                      {"sources": [src(ft2, 2, 4)], "parameters": {"scale": 0.5}},
                      {"sources": [src(ft1, 4, 6, scale=2.0)], "parameters": {"scale": 0.5}}]}
    run_merge(doc, tmp_path / "out")
    got, a, b = load(tmp_path / "out"), load(ft1), load(ft2)
    scaled = lambda t, s: (t.float() * s).to(BF16)   # noqa: E731  (exact: powers of two)
    name = "mlp.up_proj.weight"
    assert torch.equal(got[f"model.layers.1.{name}"], scaled(a[f"model.layers.1.{name}"], 0.25))   # top level
    assert torch.equal(got[f"model.layers.3.{name}"], scaled(b[f"model.layers.3.{name}"], 0.5))    # its slice's
    assert torch.equal(got[f"model.layers.5.{name}"], scaled(a[f"model.layers.5.{name}"], 2.0))    # its source's
    assert torch.equal(got["model.embed_tokens.weight"], scaled(a["model.embed_tokens.weight"], 0.25))
    assert torch.equal(got["lm_head.weight"], scaled(a["lm_head.weight"], 2.0))   # the last slice's source


def test_per_slice_t_for_slerp(fam, tmp_path):
    base, ft1 = fam.base, fam.finetunes[0]
    doc = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.5},
           "slices": [{"sources": [src(base, 0, 3), src(ft1, 0, 3)], "parameters": {"t": 0.1}},
                      {"sources": [src(base, 3, 6), src(ft1, 3, 6)]}]}
    run_merge(doc, tmp_path / "out")
    got, b, f = load(tmp_path / "out"), load(base), load(ft1)
    for layer, t in ((1, 0.1), (4, 0.5)):
        name = f"model.layers.{layer}.self_attn.o_proj.weight"
        spec = ref.spec_from_params("slerp", 2, t=t)
        assert torch.equal(got[name], ref.merge_with_spec(None, [{"w": b[name]}, {"w": f[name]}], spec,
                                                          out_dtype=BF16)["w"])


def test_slerp_with_the_base_listed_takes_two_inputs(fam, tmp_path):
    base, ft1 = fam.base, fam.finetunes[0]
    doc = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.3},
           "models": [{"model": str(base)}, {"model": str(ft1)}]}
    run_merge(doc, tmp_path / "out")
    got, b, f = load(tmp_path / "out"), load(base), load(ft1)
    spec = ref.spec_from_params("slerp", 2, t=0.3)
    name = "model.layers.2.mlp.down_proj.weight"
    assert torch.equal(got[name], ref.merge_with_spec(None, [{"w": b[name]}, {"w": f[name]}], spec, out_dtype=BF16)["w"])


# -- bad input: one paragraph, exit 2, nothing written ------------------------------------------
def _refused(tmp_path, capsys, doc):
    cfg = tmp_path / "bad.yml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    capsys.readouterr()
    rc = cli.main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))
    line = err.strip().splitlines()[-1]
    assert str(cfg) in line
    return line


def test_bad_slices_are_refused_naming_the_key(fam, tmp_path, capsys):
    base, ft1, ft2 = fam.base, fam.finetunes[0], fam.finetunes[1]
    frank = {"merge_method": "passthrough"}
    msg = _refused(tmp_path, capsys, dict(frank, slices=[{"sources": [src(ft1, 4, 8)]}]))
    assert "slices[0].sources[0].layer_range" in msg and "6 layers" in msg
    msg = _refused(tmp_path, capsys, dict(frank, slices=[{"sources": [src(ft1, 3, 3)]}]))
    assert "START < END" in msg
    msg = _refused(tmp_path, capsys, dict(frank, slices=[{"sources": [src(ft1, 0, 2), src(ft2, 0, 2)]}]))
    assert "passthrough merges exactly 1" in msg
    msg = _refused(tmp_path, capsys, {"merge_method": "ties", "base_model": str(base),
                                      "slices": [{"sources": [src(base, 0, 4), src(ft1, 0, 3)]}]})
    assert "slices[0]" in msg and "same number of layers" in msg
    msg = _refused(tmp_path, capsys, {"merge_method": "ties", "base_model": str(base),
                                      "slices": [{"sources": [src(ft1, 0, 3), src(ft2, 0, 3)]}]})
    assert "no source from base_model" in msg
    msg = _refused(tmp_path, capsys, dict(frank, slices=[{"sources": [src(ft1, 0, 3)]}],
                                          models=[{"model": str(ft1)}]))
    assert "either models" in msg
    msg = _refused(tmp_path, capsys, {"merge_method": "ties", "base_model": str(base),
                                      "slices": [{"sources": [src(base, 0, 3), src(ft1, 0, 3), src(ft1, 3, 6)]}]})
    assert "twice" in msg
    msg = _refused(tmp_path, capsys, {"merge_method": "passthrough", "base_model": str(base),
                                      "models": [{"model": str(ft1)}]})
    assert "base_model" in msg and "one model" in msg


def test_plan_prices_the_sliced_output(fam, tmp_path, capsys):
    ft1 = fam.finetunes[0]
    cfg = tmp_path / "frank.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [
        {"sources": [src(ft1, 0, 6)]}, {"sources": [src(ft1, 0, 6)]}]}))
    capsys.readouterr()
    assert cli.main(["plan", str(cfg)]) == 0
    out = capsys.readouterr().out
    per_layer = sum(1 for n in load(ft1) if layer_of(n) == 0)
    assert f"{3 + 12 * per_layer} tensors" in out


def test_a_sliced_config_is_validated_without_opening_checkpoints():
    with pytest.raises(MergeInputError, match="slices: must be a non-empty list"):
        from lines_fast.config import from_yaml_dict
        from_yaml_dict({"merge_method": "passthrough", "slices": []}, "c.yml")
