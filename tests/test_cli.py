"""`lines-fast merge` on bad input: one paragraph naming the file, tensor and models, exit 2,
no traceback, and no OUT_DIR. Bugs (anything but MergeInputError) keep their tracebacks."""
import json
import re
import shutil
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from lines_fast import cli
from lines_fast.checkpoint import INDEX_FILE, SINGLE_FILE
from lines_fast.synth import INT_TENSOR_NAME, recipe, write_checkpoint_family
from lines_fast.writer import PARTIAL_SUFFIX

from helpers import load, write_safetensors

REPO = Path(__file__).resolve().parents[1]
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"


# -- helpers ------------------------------------------------------------------------------
def save_model(folder, tensors):
    """Replace the weights of an HF directory by one model.safetensors holding `tensors`."""
    folder = Path(folder)
    for f in folder.glob("model*.safetensors"):
        f.unlink()
    if (folder / INDEX_FILE).exists():
        (folder / INDEX_FILE).unlink()
    write_safetensors(folder / SINGLE_FILE, tensors)


def edit_model(folder, change):
    tensors = load(folder)
    change(tensors)
    save_model(folder, tensors)


def rewrite_header(file, change):
    """Rewrite a safetensors header (keeping the data buffer as it is)."""
    raw = Path(file).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    Path(file).write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def same_bits(a, b):
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def run(capsys, *args):
    """cli.main in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main(["merge", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def error_of(err):
    """The error paragraph: the last line of stderr, and the only one saying error."""
    lines = err.rstrip("\n").split("\n")
    assert lines[-1].startswith("lines-fast merge: error: "), err
    assert sum("error:" in line for line in lines) == 1, err
    assert "Traceback" not in err
    return lines[-1][len("lines-fast merge: error: "):]


def refused(capsys, out_dir, *args, partial_ok=False):
    """Runs a merge that must be refused; returns its one-line message."""
    rc, stdout, err = run(capsys, *args)
    assert rc == 2, (rc, err)
    assert stdout == ""
    assert not Path(out_dir).exists()
    if not partial_ok:
        assert not Path(str(out_dir) + PARTIAL_SUFFIX).exists()
    return error_of(err)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    family = write_checkpoint_family(root / "single", recipe("tiny"), n_finetunes=2, dtype=torch.bfloat16,
                                     int_tensor=True)
    sharded = write_checkpoint_family(root / "sharded", recipe("tiny"), n_finetunes=2, dtype=torch.bfloat16,
                                      max_shard_size=40_000, int_tensor=True)
    return family, sharded


class Fam:
    """A private copy of the test family: base, ft1, ft2 (one file each) and sharded twins."""

    def __init__(self, root, pristine):
        family, sharded = pristine
        self.root = root
        for src, name in ((family.base, "base"), (family.finetunes[0], "ft1"), (family.finetunes[1], "ft2"),
                          (sharded.base, "sbase"), (sharded.finetunes[0], "sft1")):
            shutil.copytree(src, root / name)
        self.base, self.ft1, self.ft2 = root / "base", root / "ft1", root / "ft2"
        self.sbase, self.sft1 = root / "sbase", root / "sft1"
        self.out = root / "out"

    def args(self, method="task_arithmetic", models=None, base=True, out=None):
        models = [self.ft1, self.ft2] if models is None else models
        a = ["--method", method] + (["--base", self.base] if base else [])
        for m in models:
            a += ["--model", m]
        return a + ["-o", out or self.out, "--no-progress"]


@pytest.fixture
def fam(tmp_path, pristine):
    return Fam(tmp_path, pristine)


def write_yaml(path, doc):
    import yaml

    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def yaml_doc(fam, method="ties", **extra):
    doc = {"merge_method": method, "base_model": str(fam.base),
           "models": [{"model": str(fam.ft1), "parameters": {"weight": 1.0, "density": 0.5}},
                      {"model": str(fam.ft2), "parameters": {"weight": 1.0, "density": 0.5}}]}
    doc.update(extra)
    return doc


# -- inputs that are not checkpoints ------------------------------------------------------
def test_input_path_does_not_exist(fam, capsys):
    missing = fam.root / "no-such-model"
    msg = refused(capsys, fam.out, *fam.args(models=[fam.ft1, missing]))
    assert str(missing) in msg and "does not exist" in msg and "model 2" in msg


def test_input_is_not_a_checkpoint(fam, capsys):
    empty = fam.root / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("hello")
    msg = refused(capsys, fam.out, *fam.args(models=[fam.ft1, empty]))
    assert str(empty) in msg and "no .safetensors" in msg

    text = fam.root / "notes.safetensors"
    text.write_text("this is not a checkpoint at all, just some text\n" * 3)
    msg = refused(capsys, fam.out, *fam.args(models=[text]))
    assert str(text) in msg and "not a safetensors file" in msg

    pickle = fam.root / "pytorch_model.bin"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    msg = refused(capsys, fam.out, *fam.args(models=[pickle]))   # a raw pickle, not torch.save's zip format
    assert str(pickle) in msg and "not a PyTorch zip checkpoint" in msg and "safetensors" in msg


def test_truncated_file(fam, capsys):
    file = fam.ft2 / SINGLE_FILE
    raw = file.read_bytes()
    file.write_bytes(raw[: len(raw) // 2])
    msg = refused(capsys, fam.out, *fam.args())
    assert str(file) in msg and "truncated" in msg and "model 2" in msg

    file.write_bytes(raw[:5])  # not even the header length
    msg = refused(capsys, fam.out, *fam.args())
    assert str(file) in msg and "truncated" in msg


def test_header_lies_about_offsets(fam, capsys):
    file = fam.ft1 / SINGLE_FILE

    def past_the_end(header):
        begin, end = header[HEAD]["data_offsets"]
        header[HEAD]["data_offsets"] = [begin + 1_000_000, end + 1_000_000]

    rewrite_header(file, past_the_end)
    msg = refused(capsys, fam.out, *fam.args())
    assert str(file) in msg and HEAD in msg and "model 1" in msg


def test_header_lies_about_overlap(fam, capsys):
    file = fam.ft1 / SINGLE_FILE

    def overlap(header):
        header[Q1]["data_offsets"] = list(header[UP1]["data_offsets"][:1]) + [
            header[UP1]["data_offsets"][0] + 64 * 64 * 2]

    rewrite_header(file, overlap)
    msg = refused(capsys, fam.out, *fam.args())
    assert str(file) in msg and Q1 in msg and "overlap" in msg


@pytest.mark.parametrize("dtype", ["F32", "I8", "Q4_K"])
def test_header_lies_about_dtype(fam, capsys, dtype):
    file = fam.ft2 / SINGLE_FILE

    def retype(header):
        header[Q1]["dtype"] = dtype

    rewrite_header(file, retype)
    msg = refused(capsys, fam.out, *fam.args())
    assert str(file) in msg and Q1 in msg and dtype in msg and "model 2" in msg


def test_header_not_json(fam, capsys):
    file = fam.ft1 / SINGLE_FILE
    raw = bytearray(file.read_bytes())
    raw[8:16] = b"\xff\xfe garb"
    file.write_bytes(bytes(raw))
    msg = refused(capsys, fam.out, *fam.args())
    assert str(file) in msg and "JSON" in msg


def test_index_names_missing_shard(fam, capsys):
    shards = sorted(fam.sft1.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    msg = refused(capsys, fam.out, *fam.args(models=[fam.sft1, fam.ft2]))
    assert shards[-1].name in msg and INDEX_FILE in msg and "model 1" in msg and "missing shards" in msg


def test_index_names_tensor_its_shard_lacks(fam, capsys):
    index = fam.sft1 / INDEX_FILE
    doc = json.loads(index.read_text())
    shards = sorted(set(doc["weight_map"].values()))
    wrong = next(s for s in shards if s != doc["weight_map"][HEAD])
    doc["weight_map"][HEAD] = wrong
    index.write_text(json.dumps(doc))
    msg = refused(capsys, fam.out, *fam.args(models=[fam.sft1, fam.ft2]))
    assert HEAD in msg and wrong in msg and "no such tensor" in msg and "re-download" in msg


def test_index_not_json(fam, capsys):
    (fam.sft1 / INDEX_FILE).write_text("{ not json")
    msg = refused(capsys, fam.out, *fam.args(models=[fam.sft1, fam.ft2]))
    assert INDEX_FILE in msg and "JSON" in msg


# -- inputs that do not fit together ------------------------------------------------------
def test_tensor_missing_from_model_then_copy_base(fam, capsys):
    edit_model(fam.ft2, lambda t: t.pop(UP1))
    msg = refused(capsys, fam.out, *fam.args("ties"), "--density", "0.5")
    assert UP1 in msg and "model 2" in msg and str(fam.ft2) in msg and "--missing copy-base" in msg

    rc, _, err = run(capsys, *fam.args("ties"), "--density", "0.5", "--missing", "copy-base")
    assert rc == 0, err
    assert "--missing copy-base: 1 (model, tensor) pair(s)" in err
    # The same as model 2 holding the base's value for that tensor.
    twin = fam.root / "ft2-with-base-value"
    shutil.copytree(fam.ft2, twin)
    base_up = load(fam.base)[UP1]
    edit_model(twin, lambda t: t.update({UP1: base_up}))
    expect = fam.root / "expect"
    rc, _, err = run(capsys, *fam.args("ties", models=[fam.ft1, twin], out=expect), "--density", "0.5")
    assert rc == 0, err
    got, want = load(fam.out), load(expect)
    assert list(got) == list(want)
    for name in want:
        assert same_bits(got[name], want[name]), name
    # And the tensor really differs from the base: model 1 still moved it.
    assert not same_bits(got[UP1], base_up)


def test_missing_without_base_does_not_suggest_copy_base(fam, capsys):
    edit_model(fam.ft2, lambda t: t.pop(UP1))
    msg = refused(capsys, fam.out, *fam.args("linear", base=False))
    assert UP1 in msg and "model 2" in msg and "model 1" in msg
    assert "rerun with --missing copy-base" not in msg and "Without a base" in msg


def test_tensor_in_model_not_in_base(fam, capsys):
    edit_model(fam.ft1, lambda t: t.update({"model.layers.1.extra.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}))
    msg = refused(capsys, fam.out, *fam.args())
    assert "model.layers.1.extra.weight" in msg and "model 1" in msg and "base model" in msg
    assert str(fam.ft1) in msg


def test_shape_mismatch(fam, capsys):
    edit_model(fam.ft1, lambda t: t.update({DOWN0: t[DOWN0].t().contiguous()}))
    msg = refused(capsys, fam.out, *fam.args())
    assert DOWN0 in msg and "[64, 160]" in msg and "[160, 64]" in msg
    assert str(fam.ft1 / SINGLE_FILE) in msg and str(fam.base / SINGLE_FILE) in msg
    assert "model 1" in msg and "base model" in msg and "never broadcasts" in msg
    assert "vocabulary" not in msg


@pytest.mark.parametrize("name", [EMBED, HEAD])
def test_vocab_size_mismatch_is_named(fam, capsys, name):
    def grow(t):
        t[name] = torch.cat([t[name], torch.zeros(2, 64, dtype=torch.bfloat16)])

    edit_model(fam.ft2, grow)
    msg = refused(capsys, fam.out, *fam.args("ties"), "--density", "0.5")
    assert name in msg and "model 2" in msg and str(fam.ft2 / SINGLE_FILE) in msg
    assert "vocabulary size (128 vs 130 rows)" in msg and "resize_token_embeddings" in msg


def test_float_in_base_int_in_model(fam, capsys):
    edit_model(fam.ft1, lambda t: t.update({Q1: torch.zeros(64, 64, dtype=torch.int16)}))
    msg = refused(capsys, fam.out, *fam.args())
    assert Q1 in msg and "model 1" in msg and "int16" in msg


# -- NaN and Inf --------------------------------------------------------------------------
NONFINITE_CASES = [
    ("task_arithmetic", []),
    ("ties", ["--density", "0.5"]),
    ("ties", ["--density", "0.5", "--trim-scope", "global"]),
    ("ties", ["--density", "0.5", "--lines-beta", "0.5"]),
    ("dare_ties", ["--density", "0.5", "--seed", "3"]),
    ("dare_linear", ["--density", "0.5"]),
    ("linear", []),
    ("wise_ft", []),
]


@pytest.mark.parametrize("method,extra", NONFINITE_CASES)
@pytest.mark.parametrize("name", [EMBED, Q1])  # the first tensor, and one in the middle
def test_nonfinite_in_model_is_refused(fam, capsys, method, extra, name):
    which = fam.ft1 if method == "wise_ft" else fam.ft2
    label = "model 1" if method == "wise_ft" else "model 2"

    def poison(t):
        t[name][3, 5] = float("nan")

    edit_model(which, poison)
    models = [fam.ft1] if method == "wise_ft" else None
    msg = refused(capsys, fam.out, *fam.args(method, models=models), *extra, partial_ok=True)
    assert f"tensor '{name}' of {label} ({which})" in msg
    assert str(which / SINGLE_FILE) in msg
    assert "NaN or Inf" in msg and "--allow-nonfinite" in msg


@pytest.mark.parametrize("method,extra", [m for m in NONFINITE_CASES if m[0] != "linear"])
def test_nonfinite_in_base_is_refused(fam, capsys, method, extra):
    def poison(t):
        t[UP1][7, 1] = float("inf")

    edit_model(fam.base, poison)
    models = [fam.ft1] if method == "wise_ft" else None
    msg = refused(capsys, fam.out, *fam.args(method, models=models), *extra, partial_ok=True)
    assert f"tensor '{UP1}' of base model" in msg and str(fam.base / SINGLE_FILE) in msg


def test_nonfinite_in_unused_base_of_linear_is_fine(fam, capsys):
    # linear without LiNeS never reads the base's float tensors: θ = Σ w_i θ_i / Σ w_i.
    edit_model(fam.base, lambda t: t[UP1].fill_(float("nan")))
    rc, _, err = run(capsys, *fam.args("linear"))
    assert rc == 0, err
    assert torch.isfinite(load(fam.out)[UP1].float()).all()


def test_allow_nonfinite_merges(fam, capsys):
    def poison(t):
        t[Q1][3, 5] = float("nan")
        t[Q1][4, 6] = float("inf")

    edit_model(fam.ft2, poison)
    rc, _, err = run(capsys, *fam.args(), "--allow-nonfinite")
    assert rc == 0, err
    q = load(fam.out)[Q1].float()
    assert torch.isnan(q[3, 5]) and torch.isinf(q[4, 6])
    assert int((~torch.isfinite(q)).sum()) == 2


# -- parameters and configs ---------------------------------------------------------------
@pytest.mark.parametrize("density", ["0", "1.5", "-0.1"])
def test_density_outside_unit_interval(fam, capsys, density):
    msg = refused(capsys, fam.out, *fam.args("ties"), "--density", density)
    assert "outside (0, 1]" in msg and str(fam.ft1) in msg and f"density {float(density)}" in msg


def test_density_outside_unit_interval_in_yaml(fam, capsys):
    doc = yaml_doc(fam)
    doc["models"][1]["parameters"]["density"] = 1.2
    cfg = write_yaml(fam.root / "c.yml", doc)
    msg = refused(capsys, fam.out, cfg, fam.out)
    assert str(cfg) in msg and "outside (0, 1]" in msg and str(fam.ft2) in msg


def test_weights_summing_to_zero(fam, capsys):
    msg = refused(capsys, fam.out, *fam.args("linear"), "--weight", "1", "--weight", "-1")
    assert "sum to 0" in msg and "linear" in msg and "--no-normalize" in msg
    # Without normalize nothing divides: allowed.
    rc, _, err = run(capsys, *fam.args("linear"), "--weight", "1", "--weight", "-1", "--no-normalize")
    assert rc == 0, err


def test_unknown_method(fam, capsys):
    msg = refused(capsys, fam.out, *fam.args("karcher"))
    assert "unknown merge method 'karcher'" in msg and "ties" in msg
    cfg = write_yaml(fam.root / "c.yml", yaml_doc(fam, method="sce"))
    msg = refused(capsys, fam.out, cfg, fam.out)
    assert str(cfg) in msg and "sce" in msg and "did you mean" not in msg
    for typo, meant in (("TIES", "ties"), ("dare-ties", "dare_ties"), ("slurp", "slerp")):
        cfg = write_yaml(fam.root / "c.yml", yaml_doc(fam, method=typo))
        assert f"unknown merge method '{typo}' (did you mean {meant}?)" in refused(capsys, fam.out, cfg, fam.out)
    assert "(did you mean ties?)" in refused(capsys, fam.out, *fam.args("tie"))


def test_unknown_cli_option(fam, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["merge", *map(str, fam.args()), "--densty", "0.5"])
    assert info.value.code == 2
    assert "--densty" in capsys.readouterr().err
    assert not fam.out.exists()


@pytest.mark.parametrize("edit,words", [
    (lambda d: d.update(epsilon=0.1), ["epsilon"]),
    (lambda d: d["parameters"].update(epsilon=0.1), ["epsilon", "parameter"]),
    (lambda d: d["models"][0]["parameters"].update(filter_wise=True), ["models[0]", "filter_wise"]),
    (lambda d: d["models"][1].update(layer_range=[0, 2]), ["models[1]", "layer_range"]),
])
def test_unknown_yaml_keys(fam, capsys, edit, words):
    doc = yaml_doc(fam, parameters={"lambda": 1.0})
    edit(doc)
    cfg = write_yaml(fam.root / "c.yml", doc)
    msg = refused(capsys, fam.out, cfg, fam.out)
    assert str(cfg) in msg
    for word in words:
        assert word in msg


@pytest.mark.parametrize("edit,words", [
    (lambda d: d.update(modules={"text_decoder": {"models": []}}), ["modules"]),
    (lambda d: d["parameters"].update(rescale="l2"), ["rescale", "true | false"]),
])
def test_unsupported_mergekit_features_refused_by_name(fam, capsys, edit, words):
    doc = yaml_doc(fam, parameters={"lambda": 1.0})
    edit(doc)
    cfg = write_yaml(fam.root / "c.yml", doc)
    msg = refused(capsys, fam.out, cfg, fam.out)
    assert str(cfg) in msg and "not supported" in msg
    for word in words:
        assert word in msg


def test_yaml_config_that_is_not_yaml(fam, capsys):
    cfg = fam.root / "broken.yml"
    cfg.write_text(f"merge_method: ties\nmodels: [{fam.ft1}, {fam.ft2}\n  base_model: {fam.base}\n")
    msg = refused(capsys, fam.out, cfg, fam.out)
    assert str(cfg) in msg and "not valid YAML" in msg and "line 3" in msg

    cfg.write_text("merge_method: ties\n\tmodels: []\n")
    msg = refused(capsys, fam.out, cfg, fam.out)
    assert str(cfg) in msg and "not valid YAML" in msg and "line 2" in msg


@pytest.mark.parametrize("text,words", [
    ("", ["YAML mapping"]),
    ("- merge_method: ties\n", ["YAML mapping"]),
    ("merge_method: ties\nbase_model: b\n", ["models"]),
])
def test_yaml_config_of_wrong_shape(fam, capsys, text, words):
    cfg = fam.root / "c.yml"
    cfg.write_text(text)
    msg = refused(capsys, fam.out, cfg, fam.out)
    assert str(cfg) in msg
    for word in words:
        assert word in msg


def test_config_file_missing(fam, capsys):
    cfg = fam.root / "nope.yml"
    msg = refused(capsys, fam.out, cfg, fam.out)
    assert str(cfg) in msg and "does not exist" in msg


def test_bad_tokenizer_source_fails_before_merging(fam, capsys):
    missing = fam.root / "no-tokenizer-here"
    msg = refused(capsys, fam.out, *fam.args(), "--tokenizer-source", missing)
    assert str(missing) in msg and "tokenizer_source" in msg
    # A good one gives the output its tokenizer files.
    (fam.ft1 / "tokenizer_config.json").write_text('{"from": "ft1"}')
    rc, _, err = run(capsys, *fam.args(), "--tokenizer-source", fam.ft1)
    assert rc == 0, err
    assert (fam.out / "tokenizer_config.json").read_text() == '{"from": "ft1"}'
    assert (fam.out / "config.json").read_text() == (fam.base / "config.json").read_text()


def test_yaml_config_merges(fam, capsys):
    cfg = write_yaml(fam.root / "c.yml", yaml_doc(fam, parameters={"lambda": 1.0}))
    rc, out, err = run(capsys, cfg, fam.out, "--no-progress")
    assert rc == 0, err
    assert str(fam.out) in out and (fam.out / SINGLE_FILE).is_file()


# -- the output location ------------------------------------------------------------------
def test_out_dir_exists(fam, capsys):
    fam.out.mkdir()
    (fam.out / "keep.txt").write_text("old")
    rc, _, err = run(capsys, *fam.args())
    assert rc == 2
    msg = error_of(err)
    assert str(fam.out) in msg and "already exists" in msg and "--force" in msg
    assert (fam.out / "keep.txt").read_text() == "old"
    assert not Path(str(fam.out) + PARTIAL_SUFFIX).exists()

    # --force replaces only what lines_fast wrote: not this directory, which it did not write
    msg = refused_keeping(capsys, fam.out, *fam.args(), "--force")
    assert "not written by lines_fast" in msg and (fam.out / "keep.txt").read_text() == "old"

    (fam.out / "keep.txt").unlink()
    rc, _, err = run(capsys, *fam.args())   # a merge of ours there ...
    assert rc == 2
    shutil.rmtree(fam.out)
    assert run(capsys, *fam.args())[0] == 0
    (fam.out / "keep.txt").write_text("old")
    rc, _, err = run(capsys, *fam.args(), "--force")   # ... is replaced, whatever else it holds
    assert rc == 0, err
    assert not (fam.out / "keep.txt").exists() and (fam.out / SINGLE_FILE).is_file()
    assert sorted(p.name for p in fam.root.iterdir() if p.name.startswith("out")) == ["out"]


def refused_keeping(capsys, out_dir, *args):
    """A merge refused with exit 2 and one paragraph, leaving out_dir as it was."""
    before = sorted((p.name, p.read_bytes()) for p in Path(out_dir).iterdir())
    rc, stdout, err = run(capsys, *args)
    assert rc == 2 and stdout == "", err
    assert sorted((p.name, p.read_bytes()) for p in Path(out_dir).iterdir()) == before
    return error_of(err)


@pytest.mark.parametrize("where", ["inside", "same"])
def test_out_dir_inside_an_input(fam, capsys, where):
    out = fam.ft1 / "merged" if where == "inside" else fam.ft1
    rc, _, err = run(capsys, *fam.args(out=out), "--force")
    assert rc == 2
    msg = error_of(err)
    assert str(fam.ft1) in msg and "input" in msg
    assert not (fam.ft1 / "merged").exists()
    assert sorted(p.name for p in fam.ft1.iterdir()) == sorted(p.name for p in fam.ft2.iterdir())


def test_too_little_disk(fam, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    calls = []

    def tiny_disk(path):
        calls.append(path)
        return usage(10 << 30, (10 << 30) - 1000, 1000)

    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)
    msg = refused(capsys, fam.out, *fam.args())
    assert calls
    assert "free disk" in msg and re.search(r"writes \d+\.\d+ (MB|GB)", msg) and str(fam.root) in msg


# -- what is copied, and bugs -------------------------------------------------------------
def test_non_float_tensors_copied_and_logged(fam, capsys):
    rc, _, err = run(capsys, *fam.args("ties"), "--density", "0.5")
    assert rc == 0, err
    assert (f"copying 1 non-float tensor(s) from base model {fam.base} unchanged: {INT_TENSOR_NAME}"
            in err.splitlines())
    out, base = load(fam.out), load(fam.base)
    assert same_bits(out[INT_TENSOR_NAME], base[INT_TENSOR_NAME])
    assert list(out) == list(base)


def test_non_float_tensor_is_copied_from_the_base_even_if_models_differ(fam, capsys):
    edit_model(fam.ft1, lambda t: t[INT_TENSOR_NAME].add_(7))
    rc, _, err = run(capsys, *fam.args())
    assert rc == 0, err
    assert same_bits(load(fam.out)[INT_TENSOR_NAME], load(fam.base)[INT_TENSOR_NAME])


def test_bugs_keep_their_traceback(fam, capsys, monkeypatch):
    import lines_fast.engine as engine

    def bug(*a, **k):
        raise ZeroDivisionError("a bug, not bad input")

    monkeypatch.setattr(engine, "_plan_tensors", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["merge", *map(str, fam.args())])
    assert not fam.out.exists()


# -- the real command, as a user runs it --------------------------------------------------
def _lines_fast(*args, prelude=""):
    script = prelude + "import sys\nfrom lines_fast.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_console_script_bad_input(fam):
    edit_model(fam.ft2, lambda t: t[Q1].fill_(float("nan")))
    exe = shutil.which("lines-fast")
    cmd = [exe] if exe else [sys.executable, "-m", "lines_fast.cli"]
    proc = subprocess.run(cmd + ["merge", *map(str, fam.args("ties")), "--density", "0.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    msg = error_of(proc.stderr)
    assert Q1 in msg and "model 2" in msg and str(fam.ft2 / SINGLE_FILE) in msg
    assert not fam.out.exists()


def test_the_command_exits_quickly_but_completely(fam):
    """run() (the console script) skips Python's teardown: the merge is complete, its exit status
    kept, atexit functions and other threads finished and the last output flushed."""
    prelude = ("import atexit, sys, threading, time\n"
               "atexit.register(lambda: sys.stdout.write('atexit ran\\n'))\n"
               "threading.Thread(target=lambda: (time.sleep(0.3), sys.stdout.write('thread ran\\n'))).start()\n"
               "sys.stdout.write('buffered, no newline')\n")
    script = prelude + "from lines_fast.cli import run\nsys.argv[0] = 'lines-fast'\nrun()\n"
    for args, status in [(["merge", *map(str, fam.args("ties")), "--density", "0.5"], 0),
                         (["merge", str(fam.root / "missing.yml"), str(fam.root / "o")], 2)]:
        proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO,
                              timeout=120)
        assert proc.returncode == status, proc.stderr
        assert proc.stdout.startswith("buffered, no newline") and "thread ran" in proc.stdout
        assert proc.stdout.rstrip().endswith("atexit ran")   # after the thread: run() joined it first
    merged, base = load(fam.out), load(fam.base)
    assert merged.keys() == base.keys() and all(merged[n].shape == base[n].shape for n in base)


def test_ctrl_c_before_the_merge_starts_exits_130_without_a_traceback(fam):
    script = ("import sys\nimport lines_fast.cli as cli\n"
              "def interrupted():\n    raise KeyboardInterrupt\n"
              "cli._steady_allocator = interrupted\n"   # Ctrl-C while the command starts up
              "sys.argv[0] = 'lines-fast'\ncli.run()\n")
    proc = subprocess.run([sys.executable, "-c", script, "merge", *map(str, fam.args("ties")), "--density", "0.5"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "lines-fast: interrupted."
    assert not fam.out.exists()


def test_subprocess_bad_config_and_bug(fam):
    cfg = write_yaml(fam.root / "c.yml", yaml_doc(fam, slices=[]))
    proc = _lines_fast("merge", cfg, fam.out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "slices" in error_of(proc.stderr)
    assert not fam.out.exists()

    # A bug (here: injected) is not bad input: it exits 1 with its traceback.
    prelude = textwrap.dedent("""
        import lines_fast.engine as engine
        def bug(*a, **k):
            raise ZeroDivisionError("injected bug")
        engine._plan_tensors = bug
    """)
    proc = _lines_fast("merge", *fam.args(), prelude=prelude)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ZeroDivisionError: injected bug" in proc.stderr
    assert not fam.out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is visible")
def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    family = write_checkpoint_family(tmp_path / "in", recipe("tiny"), n_finetunes=1, dtype=torch.bfloat16)
    out = tmp_path / "out"
    code = cli.main(["merge", "--method", "task_arithmetic", "--base", str(family.base), "--model",
                     str(family.finetunes[0]), "-o", str(out), "--device", "cuda", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "no CUDA GPU" in err and "--device cpu" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("weights", [["1", "0"], ["1", "-0.5"]])
def test_normalized_ties_refuses_non_positive_weights(weights, tmp_path, capsys):
    family = write_checkpoint_family(tmp_path / "in", recipe("tiny"), n_finetunes=2, dtype=torch.bfloat16)
    args = ["merge", "--method", "ties", "--base", str(family.base), "--density", "0.5", "-o", str(tmp_path / "o"), "-q"]
    for model, w in zip(family.finetunes, weights):
        args += ["--model", str(model), "--weight", w]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "weights must be positive" in err and "--no-normalize" in err
    # A weighted sum (no division) takes any weights.
    assert cli.main(args + ["--no-normalize"]) == 0


def test_merge_steadies_the_allocator_first(fam, capsys, monkeypatch):
    """glibc's mmap threshold and trim are set before a merge (cli._steady_allocator), with the
    values it documents; `plan` leaves them alone."""
    import ctypes

    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(sys, "platform", "linux")
    rc, _, err = run(capsys, *fam.args())
    assert rc == 0, err
    assert calls == [(-3, 64 << 20), (-1, 128 << 20)]


@pytest.mark.parametrize("command", [[], ["merge"], ["plan"], ["demo"], ["generate"], ["layers"], ["bench"]])
def test_help_reads_as_written(command, capsys):
    """Every --help renders: no argparse formatting left in the text (a description is printed
    as written, so "%%" there shows as two characters; a help= string is %-formatted)."""
    with pytest.raises(SystemExit) as stop:
        cli.main([*command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "usage: lines-fast" in text and "%%" not in text and "%(" not in text


def test_a_reader_gone_does_not_stop_the_work(fam):
    """`... | head -1`: the command goes on to the end, exit 0, no BrokenPipeError traceback."""
    base = [sys.executable, "-m", "lines_fast"]
    layers = subprocess.Popen([*base, "layers", str(fam.base)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    layers.stdout.readline()
    layers.stdout.close()   # as head does after its line
    assert layers.wait(timeout=120) == 0
    assert b"Traceback" not in layers.stderr.read()

    merge = subprocess.Popen([*base, "merge", *map(str, fam.args("ties")), "--density", "0.5"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    merge.stdout.readline()
    merge.stdout.close()
    assert merge.wait(timeout=120) == 0
    assert (fam.out / SINGLE_FILE).exists() and not Path(f"{fam.out}{PARTIAL_SUFFIX}").exists()


def test_a_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["merge", "--density", "abc"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--density" in err and "lines-fast merge --help" in err


def test_a_message_during_a_progress_bar_is_printed_above_it_not_glued_to_it(capsys):
    from lines_fast.progress import Progress, say

    bar = Progress("pass 1/1 merge", 1000, enabled=True)
    bar.advance(100)
    say("compiling CPU kernel merge_chunk ...")   # e.g. the engine's log while numba compiles
    bar.close()
    say("after the bar")
    err = capsys.readouterr().err
    assert "\rcompiling CPU kernel merge_chunk ...\n" in err   # the bar's line cleared first
    assert "]compiling" not in err and err.endswith("after the bar\n")
