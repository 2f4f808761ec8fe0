"""Tests of the synthetic checkpoint generator (lines_fast/synth.py). Only the tiny recipe is
ever written; the big recipes are checked through their shapes, which need no data."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lines_fast
from lines_fast import methods, synth
from lines_fast.errors import MergeInputError


def llama_count(hidden, intermediate, layers, heads, kv_heads, vocab, tied=False):
    """Parameters of a Llama model, written out term by term from the HF module definitions."""
    head_dim = hidden // heads
    attn = hidden * hidden + 2 * (kv_heads * head_dim * hidden) + hidden * hidden  # q, k, v, o
    mlp = 3 * intermediate * hidden  # gate, up, down
    norms = 2 * hidden  # input_layernorm, post_attention_layernorm
    head = 0 if tied else vocab * hidden
    return vocab * hidden + layers * (attn + mlp + norms) + hidden + head


def load_model(model_dir):
    """All tensors of an HF directory, sharded or not."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        out = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(model_dir / shard))
        return out
    return load_file(model_dir / "model.safetensors")


def deltas(family, ft=0):
    base, tuned = load_model(family.base), load_model(family.finetunes[ft])
    return {k: tuned[k].float() - base[k].float() for k in base if base[k].is_floating_point()}


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return synth.write_checkpoint_family(out, synth.recipe("tiny"), n_finetunes=3, int_tensor=True)


# --------------------------------------------------------------------------- shapes, no data


def test_tiny_shapes_and_count_by_hand():
    r = synth.recipe("tiny")
    shapes = synth.tensor_shapes(r)
    assert shapes[0] == ("model.embed_tokens.weight", (128, 64))
    assert shapes[1:10] == [
        ("model.layers.0.input_layernorm.weight", (64,)),
        ("model.layers.0.self_attn.q_proj.weight", (64, 64)),
        ("model.layers.0.self_attn.k_proj.weight", (32, 64)),  # 2 kv heads * head_dim 16
        ("model.layers.0.self_attn.v_proj.weight", (32, 64)),
        ("model.layers.0.self_attn.o_proj.weight", (64, 64)),
        ("model.layers.0.post_attention_layernorm.weight", (64,)),
        ("model.layers.0.mlp.gate_proj.weight", (160, 64)),
        ("model.layers.0.mlp.up_proj.weight", (160, 64)),
        ("model.layers.0.mlp.down_proj.weight", (64, 160)),
    ]
    assert shapes[-2:] == [("model.norm.weight", (64,)), ("lm_head.weight", (128, 64))]
    assert len(shapes) == 1 + 2 * 9 + 2
    per_layer = 64 * 64 * 2 + 32 * 64 * 2 + 160 * 64 * 3 + 64 * 2
    assert synth.param_count(r) == 128 * 64 * 2 + 2 * per_layer + 64 == 102_720
    assert synth.checkpoint_bytes(r, "bfloat16") == 2 * 102_720


def test_llama_336m_and_1b_counts():
    assert synth.param_count(synth.recipe("llama-336m")) == llama_count(2048, 5632, 4, 16, 16, 32000)
    assert synth.param_count(synth.recipe("llama-336m")) == 336_611_328
    # TinyLlama-1.1B's published count.
    assert synth.param_count(synth.recipe("llama-1b")) == llama_count(2048, 5632, 22, 32, 4, 32000)
    assert synth.param_count(synth.recipe("llama-1b")) == 1_100_048_384


def test_llama3_70b_shapes_without_data():
    r = synth.recipe("llama3-70b")
    shapes = dict(synth.tensor_shapes(r))
    assert len(shapes) == 1 + 80 * 9 + 2
    assert shapes["model.embed_tokens.weight"] == (128256, 8192)
    assert shapes["lm_head.weight"] == (128256, 8192)
    assert shapes["model.layers.79.self_attn.q_proj.weight"] == (8192, 8192)
    assert shapes["model.layers.79.self_attn.k_proj.weight"] == (1024, 8192)  # 8 kv heads * 128
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (8192, 28672)
    assert "model.layers.80.mlp.up_proj.weight" not in shapes

    embed = 128256 * 8192
    layer = 8192 * 8192 * 2 + 1024 * 8192 * 2 + 28672 * 8192 * 3 + 8192 * 2
    total = 2 * embed + 80 * layer + 8192
    assert total == llama_count(8192, 28672, 80, 64, 8, 128256)
    assert synth.param_count(r) == total == 70_553_706_496
    assert synth.param_count(r) == pytest.approx(70.55e9, rel=1e-3)
    assert synth.checkpoint_bytes(r, torch.bfloat16) == 2 * total


def test_layer_cut_keeps_names_and_shapes():
    full, cut = synth.recipe("llama3-70b"), synth.recipe("llama3-70b", layers=2)
    assert (cut.layers, cut.hidden, cut.vocab) == (2, 8192, 128256)
    full_shapes = dict(synth.tensor_shapes(full))
    cut_shapes = synth.tensor_shapes(cut)
    assert len(cut_shapes) == 1 + 2 * 9 + 2
    for name, shape in cut_shapes:
        assert full_shapes[name] == shape
    assert synth.hf_config(cut)["num_hidden_layers"] == 2
    assert synth.recipe("tiny", layers=2) is synth.RECIPES["tiny"]


def test_bad_recipe_and_cut():
    with pytest.raises(MergeInputError) as err:
        synth.recipe("llama-7000b")
    for known in synth.RECIPES:
        assert known in str(err.value)
    for bad in (0, 3, -1):
        with pytest.raises(MergeInputError):
            synth.recipe("tiny", layers=bad)


def test_hf_config():
    cfg = synth.hf_config(synth.recipe("llama3-70b"), torch.bfloat16)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (8192, 28672, 80)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (64, 8, 128256)
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["tie_word_embeddings"] is False
    assert cfg["rope_theta"] == 500000.0
    assert {"max_position_embeddings", "rms_norm_eps"} <= cfg.keys()
    assert synth.hf_config(synth.recipe("tiny"), "float32")["torch_dtype"] == "float32"
    with pytest.raises(MergeInputError):
        synth.hf_config(synth.recipe("tiny"), "int8")


def test_tied_embeddings_drop_lm_head():
    r = synth.Recipe("t", hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, vocab=50, tie_embeddings=True)
    names = [n for n, _ in synth.tensor_shapes(r)]
    assert "lm_head.weight" not in names
    assert synth.param_count(r) == llama_count(32, 64, 1, 2, 1, 50, tied=True)


# --------------------------------------------------------------------------- written families


def test_family_files_names_shapes_dtypes(tiny_family):
    r = synth.recipe("tiny")
    expected = synth.tensor_shapes(r, int_tensor=True)
    assert [p.name for p in tiny_family.finetunes] == ["ft1", "ft2", "ft3"]
    for model_dir in tiny_family.models:
        for side in ("config.json", "generation_config.json", "tokenizer_config.json"):
            assert (model_dir / side).is_file()
        assert json.loads((model_dir / "config.json").read_text()) == synth.hf_config(r, torch.bfloat16)
        assert not (model_dir / "model.safetensors.index.json").exists()
        tensors = load_file(model_dir / "model.safetensors")
        assert {n: tuple(t.shape) for n, t in tensors.items()} == dict(expected)
        for name, t in tensors.items():
            assert t.dtype == (torch.int64 if name == synth.INT_TENSOR_NAME else torch.bfloat16)
        with safe_open(model_dir / "model.safetensors", "pt") as f:
            assert f.metadata() == {"format": "pt", "lines_fast_synthetic": "tiny"}


def test_base_statistics(tiny_family):
    base = load_model(tiny_family.base)
    q = base["model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(q.mean()) < 0.005 and 0.015 < q.std() < 0.025
    norm = base["model.layers.1.input_layernorm.weight"].float()
    assert abs(norm.mean() - 1.0) < 0.02 and norm.std() < 0.05


def test_int_tensor_identical_in_every_model(tiny_family):
    values = [load_model(d)[synth.INT_TENSOR_NAME] for d in tiny_family.models]
    assert values[0].dtype == torch.int64 and tuple(values[0].shape) == (1, 16)
    for v in values[1:]:
        assert torch.equal(v, values[0])


def test_finetunes_differ_from_each_other(tiny_family):
    d1, d2 = deltas(tiny_family, 0), deltas(tiny_family, 1)
    name = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(d1[name], d2[name])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_fraction_of_deltas(tmp_path, dtype):
    fam = synth.write_checkpoint_family(tmp_path, synth.recipe("tiny"), n_finetunes=1, dtype=dtype, zero_fraction=0.3)
    d = deltas(fam)
    matrices = torch.cat([v.flatten() for k, v in d.items() if v.dim() == 2])
    zeros = (matrices == 0).float().mean().item()
    if dtype == "float32":
        # fp32 keeps every nonzero delta, so the zeros are the drawn ones.
        assert zeros == pytest.approx(0.3, abs=0.01)
    else:
        # bf16 rounds some small deltas away on top of the drawn zeros -- but not most of them.
        assert 0.3 <= zeros <= 0.45


def test_zero_fraction_extremes(tmp_path):
    r = synth.recipe("tiny")
    none = synth.write_checkpoint_family(tmp_path / "a", r, n_finetunes=1, dtype="float32", zero_fraction=0.0)
    d = torch.cat([v.flatten() for v in deltas(none).values()])
    assert (d == 0).float().mean() < 1e-3
    every = synth.write_checkpoint_family(tmp_path / "b", r, n_finetunes=1, zero_fraction=1.0)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in deltas(every).values())
    with pytest.raises(MergeInputError):
        synth.write_checkpoint_family(tmp_path / "c", r, zero_fraction=1.5)


def test_deltas_grow_with_depth(tmp_path):
    # Four layers so the trend is visible beyond a single pair; fp32 so rounding cannot blur it.
    r = synth.Recipe("deep", hidden=64, intermediate=128, layers=4, heads=4, kv_heads=4, vocab=96)
    fam = synth.write_checkpoint_family(tmp_path, r, n_finetunes=1, dtype="float32")
    d = deltas(fam)

    def layer_mean(i):
        vals = [v.abs().flatten() for k, v in d.items() if k.startswith(f"model.layers.{i}.") and v.dim() == 2]
        return torch.cat(vals).mean().item()

    means = [layer_mean(i) for i in range(4)]
    assert all(a < b for a, b in zip(means, means[1:])), means
    assert means[-1] / means[0] == pytest.approx(3.0, rel=0.15)  # 1.5x / 0.5x of delta_std
    assert d["model.embed_tokens.weight"].abs().mean() < d["lm_head.weight"].abs().mean()


def test_bf16_finetune_is_quantized_base_plus_delta(tiny_family):
    base, ft = load_model(tiny_family.base), load_model(tiny_family.finetunes[0])
    name = "model.layers.1.mlp.down_proj.weight"
    d = ft[name].float() - base[name].float()
    # Exactly-zero deltas are exactly the base, and quantization makes magnitudes repeat.
    assert torch.equal(ft[name][d == 0], base[name][d == 0])
    nonzero = d[d != 0].abs()
    assert nonzero.unique().numel() < nonzero.numel() / 2


def test_sharded_output_and_index(tmp_path):
    r = synth.recipe("tiny")
    plain = synth.write_checkpoint_family(tmp_path / "plain", r, n_finetunes=1, int_tensor=True)
    sharded = synth.write_checkpoint_family(
        tmp_path / "sharded", r, n_finetunes=1, int_tensor=True, max_shard_size=60_000
    )
    for model_dir in sharded.models:
        assert not (model_dir / "model.safetensors").exists()
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        shard_files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        n = len(shard_files)
        assert n > 1
        assert shard_files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        assert set(index["weight_map"].values()) == set(shard_files)
        assert list(index["weight_map"]) == sorted(index["weight_map"])
        total = 0
        for shard in shard_files:
            tensors = load_file(model_dir / shard)
            assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 60_000 or len(tensors) == 1
            for name, t in tensors.items():
                assert index["weight_map"][name] == shard
                total += t.numel() * t.element_size()
        assert index["metadata"]["total_size"] == total
        assert set(index["weight_map"]) == {n for n, _ in synth.tensor_shapes(r, int_tensor=True)}
    # The layout does not change the values: pieces are seeded by name, not by file position.
    for a, b in zip(plain.models, sharded.models):
        ta, tb = load_model(a), load_model(b)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_rewrite_removes_stale_shards(tmp_path):
    r = synth.recipe("tiny")
    synth.write_checkpoint_family(tmp_path, r, n_finetunes=1, max_shard_size=60_000)
    fam = synth.write_checkpoint_family(tmp_path, r, n_finetunes=1)
    assert sorted(p.name for p in fam.base.glob("*.safetensors")) == ["model.safetensors"]
    assert not (fam.base / "model.safetensors.index.json").exists()


def test_same_seed_same_bytes(tmp_path):
    r = synth.recipe("tiny")
    a = synth.write_checkpoint_family(tmp_path / "a", r, n_finetunes=2, seed=7, int_tensor=True)
    b = synth.write_checkpoint_family(tmp_path / "b", r, n_finetunes=2, seed=7, int_tensor=True)
    c = synth.write_checkpoint_family(tmp_path / "c", r, n_finetunes=2, seed=8, int_tensor=True)
    for x, y, z in zip(a.models, b.models, c.models):
        for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"):
            assert (x / f).read_bytes() == (y / f).read_bytes()
        assert (x / "model.safetensors").read_bytes() != (z / "model.safetensors").read_bytes()


def test_pieces_and_layer_cut(tmp_path, monkeypatch):
    # Tiny pieces force multi-piece tensors (and pieces that end mid-row) through the streaming
    # writer and the generation window.
    monkeypatch.setattr(synth, "_PIECE_ELEMS", 500)
    full = synth.generate("tiny", tmp_path / "full", n_finetunes=2)
    cut = synth.generate("tiny", tmp_path / "cut", n_finetunes=2, layers=1)
    tf, tc = load_model(full.base), load_model(cut.base)
    assert set(tc) == {n for n, _ in synth.tensor_shapes(synth.recipe("tiny", layers=1))}
    # A cut model's base is the full model's base under the same names.
    assert all(torch.equal(tc[k], tf[k]) for k in tc)
    assert json.loads((cut.base / "config.json").read_text())["num_hidden_layers"] == 1


def test_not_fsynced_and_nothing_left_over(tmp_path, monkeypatch):
    # Synthetic data is written with durable=False, through the writer's partial directories.
    def no_fsync(fd):
        raise AssertionError("synthetic checkpoints must not be fsynced")

    monkeypatch.setattr(os, "fsync", no_fsync)
    synth.write_checkpoint_family(tmp_path, synth.recipe("tiny"), n_finetunes=1, max_shard_size=60_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft1"]


def test_failure_leaves_no_partial_output(tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(synth, "_generate_piece", boom)
    with pytest.raises(RuntimeError, match="boom"):
        synth.write_checkpoint_family(tmp_path, synth.recipe("tiny"), n_finetunes=1)
    assert list(tmp_path.iterdir()) == []


def test_empty_tensors(tmp_path):
    # A tensor without elements still gets its (empty) place in the file.
    r = synth.Recipe("empty-mlp", hidden=8, intermediate=0, layers=1, heads=2, kv_heads=1, vocab=4)
    fam = synth.write_checkpoint_family(tmp_path, r, n_finetunes=1)
    tensors = load_model(fam.finetunes[0])
    assert {n: tuple(t.shape) for n, t in tensors.items()} == dict(synth.tensor_shapes(r))
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (8, 0)


def test_streaming_writer_matches_save_file(tmp_path, tiny_family):
    # The streamed file must read exactly like one made by save_file.
    ours = load_file(tiny_family.base / "model.safetensors")
    save_file(ours, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    ref = load_file(tmp_path / "ref.safetensors")
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ours)
    raw = (tiny_family.base / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0  # data starts aligned, as safetensors writes it
    header = json.loads(raw[8 : 8 + header_len])
    names = [k for k in header if k != "__metadata__"]
    assert names == [n for n, _ in synth.tensor_shapes(synth.recipe("tiny"), int_tensor=True)]


def test_yaml_config(tmp_path, tiny_family):
    path = synth.write_yaml_config(tmp_path / "ties.yaml", tiny_family, method="ties", density=0.2)
    cfg = yaml.safe_load(path.read_text())
    assert cfg["merge_method"] == "ties"
    assert cfg["base_model"] == str(tiny_family.base.resolve())
    assert [m["model"] for m in cfg["models"]] == [str(p.resolve()) for p in tiny_family.finetunes]
    assert all(m["parameters"] == {"weight": 1.0, "density": 0.2} for m in cfg["models"])
    assert cfg["parameters"] == {}   # lambda and normalize only when given: the method's defaults
    soup = yaml.safe_load(synth.write_yaml_config(tmp_path / "l.yaml", tiny_family, method="linear",
                                                  normalize=False).read_text())
    # only what linear takes, and no base_model (mergekit would average it in)
    assert soup["parameters"] == {"normalize": False} and "base_model" not in soup
    assert all(m["parameters"] == {"weight": 1.0} for m in soup["models"])
    assert (cfg["dtype"], cfg["out_dtype"]) == ("float32", "bfloat16")

    ta = yaml.safe_load(
        synth.write_yaml_config(tmp_path / "ta.yaml", tiny_family, method="task_arithmetic", weight=[0.5, 0.3, 0.2]).read_text()
    )
    assert [m["parameters"] for m in ta["models"]] == [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]
    with pytest.raises(MergeInputError):
        synth.write_yaml_config(tmp_path / "bad.yaml", tiny_family, weight=[1.0])


def test_generate_writes_yaml(tmp_path):
    fam = synth.generate("tiny", tmp_path, n_finetunes=2, dtype="float16", yaml_method="dare_ties", density=0.5)
    cfg = yaml.safe_load((tmp_path / "dare_ties.yaml").read_text())
    assert cfg["merge_method"] == "dare_ties" and len(cfg["models"]) == 2
    assert cfg["models"][0]["parameters"]["density"] == 0.5
    assert load_model(fam.base)["lm_head.weight"].dtype == torch.float16
    assert re.fullmatch(r"ft\d", fam.finetunes[1].name)


@pytest.mark.parametrize("method", methods.names())
def test_every_generated_config_merges_as_written(method, tmp_path):
    """`lines-fast generate --config M` writes a YAML that `lines-fast merge` runs unchanged, for
    every registered method: the model count it takes, its required parameters, the family's
    dtype as out_dtype; and refuses, before writing anything, a count the method cannot take."""
    fam = synth.generate("tiny", tmp_path / "fam", n_finetunes=3, dtype="float16", yaml_method=method)
    config = yaml.safe_load((tmp_path / "fam" / f"{method}.yaml").read_text())
    definition = methods.get(method)
    assert config["out_dtype"] == "float16"
    listed = [m["model"] for m in config["models"]]
    if definition.inputs is methods.Inputs.BASE_AND_MODELS:
        assert listed[0] == str(fam.base.resolve())
    assert definition.min_models <= len(listed) <= (definition.max_models or 3)
    result = lines_fast.merge(tmp_path / "fam" / f"{method}.yaml", tmp_path / "out", device="cpu", progress=False,
                              log=lambda m: None)
    assert result.merged_tensors > 0
    needed = definition.min_models - (definition.inputs is methods.Inputs.BASE_AND_MODELS)
    if needed > 1:
        with pytest.raises(MergeInputError, match=f"--models {needed}"):
            synth.generate("tiny", tmp_path / "few", n_finetunes=needed - 1, yaml_method=method)
        assert not (tmp_path / "few").exists()


def test_a_smaller_family_over_a_larger_one_removes_its_extra_fine_tunes_only(tmp_path):
    synth.write_checkpoint_family(tmp_path, synth.recipe("tiny"), n_finetunes=3)
    synth.write_checkpoint_family(tmp_path, synth.recipe("tiny"), n_finetunes=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft1"]
    # A folder that is not a generated model stays (and stops the clean-up there).
    synth.write_checkpoint_family(tmp_path, synth.recipe("tiny"), n_finetunes=3)
    shutil.rmtree(tmp_path / "ft2")
    (tmp_path / "ft2").mkdir()
    (tmp_path / "ft2" / "notes.txt").write_text("mine")
    synth.write_checkpoint_family(tmp_path, synth.recipe("tiny"), n_finetunes=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft1", "ft2", "ft3"]
    assert (tmp_path / "ft2" / "notes.txt").read_text() == "mine"
