"""The front end runs without torch (lines_fast/lazy.py): `plan`, `layers` and a merge refused for
its config, its inputs or its output directory never import it (1.5-2 s), so they answer in a
fraction of a second; a merge that goes ahead imports it once the checks have passed, and its
summary says how long that took. Each case runs the command in a fresh process."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lines_fast.checkpoint import SINGLE_FILE
from lines_fast.synth import INT_TENSOR_NAME, recipe, write_checkpoint_family
from helpers import load, write_safetensors

REPO = Path(__file__).resolve().parents[1]
# Runs the CLI as the console script does, then says whether torch was imported.
SCRIPT = ("import sys\nfrom lines_fast.cli import main\ncode = main(sys.argv[1:])\n"
          "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\nsys.exit(code)\n")


def lines_fast(*args):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout.strip().splitlines()[-1], proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    fam = write_checkpoint_family(root / "fam", recipe("tiny"), n_finetunes=2, dtype=torch.bfloat16, int_tensor=True)
    config = root / "ties.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(fam.base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in fam.finetunes]}))
    return root, fam, config


def test_plan_and_layers_do_not_import_torch(family):
    root, fam, config = family
    code, torch_line, out = lines_fast("plan", config)
    assert code == 0 and "predicted" in out and torch_line == "torch not imported", out
    code, torch_line, out = lines_fast("layers", fam.base)
    assert code == 0 and "model.layers" in out and torch_line == "torch not imported", out


def test_refused_merges_do_not_import_torch(family, tmp_path):
    root, fam, config = family
    bad_key = tmp_path / "bad.yml"
    bad_key.write_text(config.read_text().replace("density: 0.5", "density: 1.5", 1))
    # A model without one of the base's tensors, and the int tensor's values changed in the other
    # (compared from the files' bytes: a warning, not a refusal, and no torch either).
    short, changed = tmp_path / "short", tmp_path / "changed"
    shutil.copytree(fam.finetunes[0], short)
    shutil.copytree(fam.finetunes[1], changed)
    tensors = load(short)
    dropped = next(n for n in tensors if n != INT_TENSOR_NAME)
    del tensors[dropped]
    write_safetensors(short / SINGLE_FILE, tensors)
    tensors = load(changed)
    tensors[INT_TENSOR_NAME] = tensors[INT_TENSOR_NAME] + 1
    write_safetensors(changed / SINGLE_FILE, tensors)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    cases = [
        (["merge", bad_key, tmp_path / "o1"], "density"),
        (["merge", "--method", "ties", "--base", fam.base, "--model", changed, "--model", short,
          "-o", tmp_path / "o2"], dropped),
        (["merge", config, occupied], str(occupied)),
        (["merge", "--method", "ties", "--base", fam.base, "--model", tmp_path / "absent", "-o", tmp_path / "o3"],
         "absent"),
    ]
    for args, named in cases:
        code, torch_line, out = lines_fast(*args, "--no-progress")
        assert code == 2 and named in out and torch_line == "torch not imported", (args, out)
    assert "notes.txt" in {p.name for p in occupied.iterdir()}
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_a_merge_imports_torch_once_the_checks_pass(family, tmp_path):
    root, fam, config = family
    code, torch_line, out = lines_fast("merge", config, tmp_path / "out", "--no-progress")
    assert code == 0 and torch_line == "torch imported", out   # the check above can see torch
    assert "importing torch)" in out and (tmp_path / "out" / SINGLE_FILE).exists()
    assert load(tmp_path / "out").keys() == load(fam.base).keys()


def test_a_passthrough_copies_stored_bytes_without_torch(family, tmp_path):
    """A frankenmerge's every tensor is an input's stored bytes: the merge pass writes them from the
    memory maps, the NaN/Inf check read from their bits (dtypes.all_finite), and torch stays out."""
    root, fam, _ = family
    ft1, ft2 = (tmp_path / "ft1", tmp_path / "ft2")
    shutil.copytree(fam.finetunes[0], ft1)
    shutil.copytree(fam.finetunes[1], ft2)
    layers = sorted({int(n.split(".")[2]) for n in load(ft1) if n.startswith("model.layers.")})
    assert layers == [0, 1]   # the tiny recipe's
    config = tmp_path / "pt.yml"
    config.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": str(ft1), "layer_range": [1, 2]}]},
        {"sources": [{"model": str(ft2), "layer_range": [0, 2]}]}]}))
    code, torch_line, out = lines_fast("merge", config, tmp_path / "out", "--no-progress")
    assert code == 0 and torch_line == "torch not imported" and "importing torch" not in out, out
    got, a, b = load(tmp_path / "out"), load(ft1), load(ft2)
    up = "model.layers.{}.mlp.up_proj.weight"
    # Output layer 0 is ft1's 1; layers 1, 2 are ft2's 0, 1; embeddings from the first slice's
    # model, the head from the last's (mergekit's rule).
    for out_layer, (model, layer) in enumerate([(a, 1), (b, 0), (b, 1)]):
        assert torch.equal(got[up.format(out_layer)].view(torch.int16), model[up.format(layer)].view(torch.int16))
    assert torch.equal(got["model.embed_tokens.weight"].view(torch.int16), a["model.embed_tokens.weight"].view(torch.int16))
    assert torch.equal(got["lm_head.weight"].view(torch.int16), b["lm_head.weight"].view(torch.int16))
    assert up.format(3) not in got

    # A NaN in a copied tensor: refused, naming the tensor and the file; --allow-nonfinite copies
    # it with its payload bits.
    tensors = load(ft2)
    bad = tensors[up.format(1)].view(-1)
    bad[3] = float("nan")
    payload = int(bad.view(torch.int16)[3])
    write_safetensors(ft2 / SINGLE_FILE, tensors)
    code, torch_line, out = lines_fast("merge", config, tmp_path / "refused", "--no-progress")
    assert code == 2 and up.format(2) in out and str(ft2 / SINGLE_FILE) in out and "NaN or Inf" in out, out
    assert not (tmp_path / "refused").exists()
    code, torch_line, out = lines_fast("merge", config, tmp_path / "kept", "--no-progress", "--allow-nonfinite")
    assert code == 0 and torch_line == "torch not imported", out
    assert int(load(tmp_path / "kept")[up.format(2)].view(-1).view(torch.int16)[3]) == payload


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the driver files looked for are Linux's")
def test_auto_device_needs_no_torch_without_a_gpu_driver(tmp_path):
    """--device auto on a Linux machine without a GPU driver's files is the CPU, decided without
    importing torch; where one exists, torch is asked."""
    script = ("import sys\nfrom lines_fast import engine\nengine._GPU_DRIVER_FILES = tuple(sys.argv[1:])\n"
              "print(engine.resolve_device('auto'), 'torch' in sys.modules)\n")
    driver = tmp_path / "dxg"

    def resolved():
        proc = subprocess.run([sys.executable, "-c", script, str(driver)], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert resolved() == ["cpu", "False"]
    driver.write_text("")
    assert resolved() == ["cuda" if torch.cuda.is_available() else "cpu", "True"]
