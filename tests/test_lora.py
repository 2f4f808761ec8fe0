"""PEFT LoRA adapters as models: merging an adapter equals merging the fine-tune it encodes.

Each adapter here is written in PEFT's on-disk format (keys `base_model.model.<module>.lora_A.weight`
[r, in] and `lora_B.weight` [out, r], `lora_embedding_A/B` for embeddings, modules_to_save saved
whole, adapter_config.json). The fine-tune it encodes is materialised independently in the test
(W + scaling * B @ A in float32, transposed for fan_in_fan_out and embeddings) and saved as a full
float32 checkpoint; every method merges both ways, on the CPU backend and the Triton kernels
(interpreted), and the outputs agree within docs/methods.md's tolerances.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lines_fast import cli, methods
from lines_fast.engine import merge
from lines_fast.methods import Inputs
from lines_fast.synth import recipe, write_checkpoint_family
from lines_fast.tolerance import compare

from helpers import load, write_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")
PREFIX = "base_model.model."


def write_adapter(folder: Path, base: dict, targets: dict, *, r=4, alpha=8.0, seed=0, **config):
    """A PEFT LoRA adapter over `base` for targets {module: kind} (kind "linear" or "embedding");
    config: extra adapter_config.json entries. Returns the adapter's tensors by key."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    rank_pattern = config.get("rank_pattern", {})
    for module, kind in targets.items():
        rank = next((v for k, v in rank_pattern.items() if module.endswith(k)), r)
        rows, cols = base[f"{module}.weight"].shape
        if kind == "embedding":   # A [r, vocab], B [dim, r]
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = (torch.randn(rank, rows, generator=g) * 0.1).to(torch.bfloat16)
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = (torch.randn(cols, rank, generator=g) * 0.1).to(torch.bfloat16)
        else:
            if config.get("fan_in_fan_out"):
                rows, cols = cols, rows
            tensors[f"{PREFIX}{module}.lora_A.weight"] = (torch.randn(rank, cols, generator=g) * 0.1).to(torch.bfloat16)
            tensors[f"{PREFIX}{module}.lora_B.weight"] = (torch.randn(rows, rank, generator=g) * 0.1).to(torch.bfloat16)
    for name in config.pop("whole", []):   # modules_to_save / trained biases: saved whole
        tensors[f"{PREFIX}{name}"] = (base[name].float() + 0.05).to(base[name].dtype)
    folder.mkdir(parents=True)
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted({m.split(".")[-1] for m in targets}),
         **config}))
    return tensors


def materialise(folder: Path, base_dir: Path, adapter: dict, config: dict) -> None:
    """The adapter's fine-tune written out in full (float32 where the adapter changes a tensor)."""
    base = load(base_dir)
    out = dict(base)
    modules = {k[len(PREFIX):].rsplit(".", 2)[0] if ".lora_A." in k or ".lora_B." in k else k[len(PREFIX):].rsplit(".", 1)[0]
               for k in adapter if "lora" in k}
    for module in modules:
        embedding = f"{PREFIX}{module}.lora_embedding_A" in adapter
        a = adapter[f"{PREFIX}{module}.lora_embedding_A" if embedding else f"{PREFIX}{module}.lora_A.weight"].float()
        b = adapter[f"{PREFIX}{module}.lora_embedding_B" if embedding else f"{PREFIX}{module}.lora_B.weight"].float()
        rank = a.shape[0]
        alpha = next((v for k, v in config.get("alpha_pattern", {}).items() if module.endswith(k)), config["lora_alpha"])
        scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        delta = b @ a
        if embedding or config.get("fan_in_fan_out"):
            delta = delta.t()
        out[f"{module}.weight"] = base[f"{module}.weight"].float() + delta * scaling
    for key, value in adapter.items():
        if "lora" not in key:
            out[key[len(PREFIX):]] = value
    folder.mkdir(parents=True)
    write_safetensors(folder / "model.safetensors", out)
    shutil.copy(base_dir / "config.json", folder / "config.json")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return adapter_family(tmp_path_factory.mktemp("lora"))


def adapter_family(root: Path):
    """A tiny base, three adapters (plain + modules_to_save; rsLoRA + patterns + embedding;
    fan_in_fan_out) and each one's materialised fine-tune: (base, adapters, fulls)."""
    fam = write_checkpoint_family(root / "fam", recipe("tiny"), n_finetunes=1, dtype=torch.bfloat16)
    base = load(fam.base)
    attn = {f"model.layers.{i}.self_attn.{p}": "linear" for i in range(2) for p in ("q_proj", "v_proj")}
    mlp = {f"model.layers.{i}.mlp.down_proj": "linear" for i in range(2)}
    specs = [
        dict(targets=attn, r=4, alpha=8.0, whole=["lm_head.weight"], modules_to_save=["lm_head"]),
        dict(targets={**mlp, "model.embed_tokens": "embedding", "model.layers.1.self_attn.q_proj": "linear"}, r=4,
             alpha=16.0, use_rslora=True, rank_pattern={"layers.1.self_attn.q_proj": 2},
             alpha_pattern={"down_proj": 4.0}),
        dict(targets={"model.layers.0.self_attn.q_proj": "linear"}, r=3, alpha=6.0, fan_in_fan_out=True),
    ]
    adapters, fulls = [], []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        targets, r, alpha = spec.pop("targets"), spec.pop("r"), spec.pop("alpha")
        whole = spec.get("whole", [])
        tensors = write_adapter(root / f"adapter{i}", base, targets, r=r, alpha=alpha, seed=i, **spec)
        cfg = json.loads((root / f"adapter{i}" / "adapter_config.json").read_text())
        assert "whole" not in cfg and whole == spec.get("whole", whole)
        materialise(root / f"full{i}", fam.base, tensors, cfg)
        adapters.append(root / f"adapter{i}")
        fulls.append(root / f"full{i}")
    return fam.base, adapters, fulls


def devices():
    yield "cpu"
    pytest.importorskip("triton")
    yield "interpret"


def doc_for(method: methods.Method, base: Path, models: list[Path]) -> dict:
    params = {p.name: 0.4 for p in method.params if p.required}
    if method.takes("density"):
        params["density"] = 0.5
    return {"merge_method": method.name, "base_model": str(base), "parameters": params,
            "models": [{"model": str(m)} for m in models]}


def _methods():
    for m in methods.REGISTRY.values():
        if m.inputs is not Inputs.MODELS:
            yield m.name


@pytest.mark.parametrize("device", list(devices()))
@pytest.mark.parametrize("method", list(_methods()))
def test_every_method_merges_an_adapter_as_its_fine_tune(family, tmp_path, method, device):
    base, adapters, fulls = family
    m = methods.get(method)
    n = m.max_models or 3
    n = n - 1 if m.inputs is Inputs.BASE_AND_MODELS else n
    n = min(n, 3)
    got_doc, want_doc = doc_for(m, base, adapters[:n]), doc_for(m, base, fulls[:n])
    options = dict(device=device, progress=False, log=lambda s: None)
    try:
        merge(want_doc, tmp_path / "want", **options)
    except Exception as err:   # a method this backend refuses (della on the kernels) is refused for both
        with pytest.raises(type(err)):
            merge(got_doc, tmp_path / "got", **options)
        return
    merge(got_doc, tmp_path / "got", **options)
    got, want = load(tmp_path / "got"), load(tmp_path / "want")
    assert set(got) == set(want)
    for name in want:
        verdict = compare(got[name], want[name])
        assert verdict.ok, (name, verdict.why)


def test_mixed_adapters_and_full_fine_tunes_with_lines_and_global_ties(family, tmp_path):
    base, adapters, fulls = family
    doc = {"merge_method": "ties", "base_model": str(base), "lines": {"alpha": "auto", "beta": 0.5},
           "parameters": {"density": 0.3, "trim_scope": "global"},
           "models": [{"model": str(adapters[0])}, {"model": str(fulls[1])}, {"model": str(adapters[2])}]}
    merge(doc, tmp_path / "got", device="cpu", progress=False, log=lambda s: None)
    doc["models"] = [{"model": str(p)} for p in (fulls[0], fulls[1], fulls[2])]
    merge(doc, tmp_path / "want", device="cpu", progress=False, log=lambda s: None)
    got, want = load(tmp_path / "got"), load(tmp_path / "want")
    for name in want:
        assert compare(got[name], want[name]).ok, name


def test_an_untouched_tensor_is_the_base_and_a_targeted_one_moves(family, tmp_path):
    base, adapters, _ = family
    merge({"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(adapters[2])}]},
          tmp_path / "out", device="cpu", progress=False, log=lambda s: None)
    out, b = load(tmp_path / "out"), load(base)
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert not torch.equal(out["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])


# -- bad adapters: one paragraph naming the adapter and the key, exit 2, nothing written --------
def _refused(capsys, tmp_path, base, adapter) -> str:
    capsys.readouterr()
    rc = cli.main(["merge", "--method", "task_arithmetic", "--base", str(base), "--model", str(adapter),
                   "-o", str(tmp_path / "out"), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    return err.strip().splitlines()[-1]


def test_bad_adapters_are_refused(family, tmp_path, capsys):
    base, adapters, _ = family
    b = load(base)

    def variant(name, edit_tensors=None, edit_config=None):
        folder = tmp_path / name
        shutil.copytree(adapters[0], folder)
        if edit_tensors:
            tensors = load(folder / "adapter_model.safetensors")
            edit_tensors(tensors)
            write_safetensors(folder / "adapter_model.safetensors", tensors)
        if edit_config:
            cfg = json.loads((folder / "adapter_config.json").read_text())
            edit_config(cfg)
            (folder / "adapter_config.json").write_text(json.dumps(cfg))
        return folder

    key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"
    bad = variant("shape", lambda t: t.__setitem__(key, torch.zeros(32, 4, dtype=torch.bfloat16)))
    msg = _refused(capsys, tmp_path, base, bad)
    assert str(bad) in msg and "q_proj" in msg and "another shape" in msg
    def other_base(t):
        t[f"{PREFIX}model.layers.9.mlp.gate_proj.lora_A.weight"] = torch.zeros(4, 64, dtype=torch.bfloat16)
        t[f"{PREFIX}model.layers.9.mlp.gate_proj.lora_B.weight"] = torch.zeros(160, 4, dtype=torch.bfloat16)

    bad = variant("other-base", other_base)
    msg = _refused(capsys, tmp_path, base, bad)
    assert "layers.9" in msg and "another base" in msg
    bad = variant("dora", edit_config=lambda c: c.update(use_dora=True))
    assert "DoRA" in _refused(capsys, tmp_path, base, bad)
    bad = variant("magnitude", lambda t: t.__setitem__(
        f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector", torch.ones(64, dtype=torch.bfloat16)))
    assert "DoRA" in _refused(capsys, tmp_path, base, bad)
    bad = variant("rank", edit_config=lambda c: c.update(r=8))
    assert "rank 4" in _refused(capsys, tmp_path, base, bad)
    bad = tmp_path / "corrupt"
    shutil.copytree(adapters[0], bad)
    (bad / "adapter_config.json").write_text("{not json")
    msg = _refused(capsys, tmp_path, base, bad)
    assert "adapter_config.json" in msg and "not valid JSON" in msg
    bad = variant("ia3", edit_config=lambda c: c.update(peft_type="IA3"))
    assert "IA3" in _refused(capsys, tmp_path, base, bad)
    bad = variant("half", lambda t: t.pop(key))
    assert "has only lora_A" in _refused(capsys, tmp_path, base, bad)
    assert all(torch.equal(v, load(base)[k]) for k, v in b.items())   # the base is read, never changed


def test_an_adapter_as_the_base_is_refused(family, tmp_path, capsys):
    base, adapters, _ = family
    msg = _refused(capsys, tmp_path, adapters[0], base)
    assert "PEFT adapter" in msg
