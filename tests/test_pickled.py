"""PyTorch .bin checkpoints as inputs: the same merge as from safetensors, read safely."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lines_fast import cli
from lines_fast.checkpoint import Checkpoint
from lines_fast.engine import merge
from lines_fast.errors import MergeInputError
from lines_fast.pickled import BIN_FILE, BIN_INDEX
from lines_fast.synth import recipe, write_checkpoint_family

from helpers import load

pytestmark = pytest.mark.usefixtures("one_thread")


class NotATensor:
    """Pickled by a test: the safe loader must refuse it."""

    def __init__(self):
        self.payload = 1


def save_bin(src: Path, out: Path, shards: int = 1) -> Path:
    """src's tensors as pytorch_model.bin, or as `shards` files with pytorch_model.bin.index.json."""
    tensors = load(src)
    out.mkdir(parents=True)
    shutil.copy(src / "config.json", out / "config.json")
    if shards == 1:
        torch.save(tensors, out / BIN_FILE)
        return out
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        part = {n: tensors[n] for n in names[k::shards]}
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save(part, out / file)
        weight_map.update({n: file for n in part})
    (out / BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("bin")
    fam = write_checkpoint_family(root / "fam", recipe("tiny"), n_finetunes=2, dtype=torch.bfloat16)
    return root, fam


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_bin_inputs_merge_exactly_as_safetensors(family, tmp_path, method):
    root, fam = family
    base = save_bin(fam.base, tmp_path / "base")
    ft1 = save_bin(fam.finetunes[0], tmp_path / "ft1", shards=3)
    ft2 = tmp_path / "ft2.bin"
    torch.save(load(fam.finetunes[1]), ft2)   # a lone file
    params = {"density": 0.4} if method != "task_arithmetic" else {}

    def doc(b, models):
        return {"merge_method": method, "base_model": str(b), "parameters": params,
                "models": [{"model": str(m)} for m in models]}

    merge(doc(base, [ft1, ft2]), tmp_path / "from-bin", device="cpu", progress=False, log=lambda s: None)
    merge(doc(fam.base, fam.finetunes), tmp_path / "from-st", device="cpu", progress=False, log=lambda s: None)
    a, b = load(tmp_path / "from-bin"), load(tmp_path / "from-st")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert (tmp_path / "from-bin" / "model.safetensors").is_file()   # output is safetensors


def test_shards_are_loaded_one_or_two_at_a_time(family, tmp_path):
    _, fam = family
    folder = save_bin(fam.base, tmp_path / "m", shards=4)
    with Checkpoint.open(folder) as ckpt:
        assert len(ckpt.files) == 4
        for name in ckpt.tensors:
            assert torch.equal(ckpt.tensor(name), load(fam.base)[name])
            assert len(ckpt._loaded) <= 2


def test_bad_bin_files_are_refused(family, tmp_path, capsys):
    _, fam = family
    base = save_bin(fam.base, tmp_path / "base")
    tensors = load(fam.finetunes[0])
    cases = {
        "custom object": {**tensors, "extra": NotATensor()},
        "a list": list(tensors.values()),
        "nested": {"state_dict": tensors, "epoch": 3},
    }
    for what, obj in cases.items():
        folder = tmp_path / what.replace(" ", "-")
        folder.mkdir()
        torch.save(obj, folder / BIN_FILE)
        capsys.readouterr()
        rc = cli.main(["merge", "--method", "task_arithmetic", "--base", str(base), "--model", str(folder),
                       "-o", str(tmp_path / "out"), "--no-progress", "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, (what, err)
        assert str(folder / BIN_FILE) in err and not (tmp_path / "out").exists()
        assert {"custom object": "more than plain tensors", "a list": "not a state dict",
                "nested": "training checkpoint"}[what] in err, err
    truncated = tmp_path / "truncated.bin"
    torch.save(tensors, truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(MergeInputError, match="truncated"):
        Checkpoint.open(truncated)
    legacy = tmp_path / "legacy.bin"
    torch.save(tensors, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(MergeInputError, match="zip checkpoint"):
        Checkpoint.open(legacy)
    folder = save_bin(fam.base, tmp_path / "missing-shard", shards=2)
    next(folder.glob("pytorch_model-00002*")).unlink()
    with pytest.raises(MergeInputError, match="does not exist"):
        Checkpoint.open(folder)
