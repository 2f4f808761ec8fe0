"""Multi-document configs (mergekit-multi's format): merges in dependency order, names standing
for earlier outputs, each published atomically, --resume skipping the finished ones."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lines_fast import cli
from lines_fast.engine import merge
from lines_fast.synth import recipe, write_checkpoint_family

from helpers import load

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return write_checkpoint_family(tmp_path_factory.mktemp("multi") / "fam", recipe("tiny"), n_finetunes=2,
                                   dtype=torch.bfloat16)


def soup(fam):
    return {"name": "soup", "merge_method": "linear",
            "models": [{"model": str(fam.finetunes[0])}, {"model": str(fam.finetunes[1])}]}


def final(fam):
    return {"merge_method": "task_arithmetic", "base_model": str(fam.base), "parameters": {"lambda": 0.5},
            "models": [{"model": "soup"}, {"model": str(fam.finetunes[0])}]}


def write_docs(path: Path, docs) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def run(capsys, *argv):
    capsys.readouterr()
    rc = cli.main(["merge", *map(str, argv), "--device", "cpu", "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_merges_run_in_dependency_order_and_names_stand_for_outputs(fam, tmp_path, capsys):
    cfg = write_docs(tmp_path / "multi.yml", [final(fam), soup(fam)])   # the final one first in the file
    rc, out, err = run(capsys, cfg, tmp_path / "out")
    assert rc == 0, err
    soup_dir = tmp_path / "out-intermediate" / "soup"
    doc = soup(fam)
    del doc["name"]
    merge(doc, tmp_path / "soup-alone", device="cpu", progress=False, log=lambda s: None)
    merge(dict(final(fam), models=[{"model": str(soup_dir)}, {"model": str(fam.finetunes[0])}]),
          tmp_path / "final-alone", device="cpu", progress=False, log=lambda s: None)
    for got, want in ((soup_dir, tmp_path / "soup-alone"), (tmp_path / "out", tmp_path / "final-alone")):
        a, b = load(got), load(want)
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert err.index("merge 'soup'") < err.index("the final (unnamed) merge")
    assert out.count("merged ") == 2


def test_a_relative_out_dir_works(fam, tmp_path, capsys, monkeypatch):
    """README's `lines-fast merge CONFIG OUT_DIR` with a relative OUT_DIR: the intermediate output
    substituted for `soup` is a path, not read as a Hugging Face repo id."""
    cfg = write_docs(tmp_path / "multi.yml", [soup(fam), final(fam)])
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "multi.yml", "mout")
    assert rc == 0, err
    assert (tmp_path / "mout-intermediate" / "soup").is_dir() and (tmp_path / "mout").is_dir()
    rc, out, err = run(capsys, cfg, tmp_path / "absolute")   # the same merge, written elsewhere
    assert rc == 0, err
    a, b = load(tmp_path / "mout"), load(tmp_path / "absolute")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_resume_skips_finished_merges(fam, tmp_path, capsys):
    cfg = write_docs(tmp_path / "multi.yml", [soup(fam), final(fam)])
    assert run(capsys, cfg, tmp_path / "out")[0] == 0
    rc, _, err = run(capsys, cfg, tmp_path / "out")   # everything exists: refused without --resume
    assert rc == 2 and "already exists" in err
    shutil.rmtree(tmp_path / "out")   # the final merge is lost; the soup is still there
    rc, out, err = run(capsys, cfg, tmp_path / "out", "--resume")
    assert rc == 0, err
    assert "merge 'soup': already merged" in err and out.count("merged ") == 1


def test_every_merge_named_writes_them_under_out(fam, tmp_path, capsys):
    second = dict(final(fam), name="second")
    cfg = write_docs(tmp_path / "multi.yml", [soup(fam), second])
    assert run(capsys, cfg, tmp_path / "out")[0] == 0
    assert (tmp_path / "out" / "soup" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "second" / "model.safetensors").is_file()


@pytest.mark.parametrize("docs, words", [
    (lambda f: [dict(soup(f), models=[{"model": "second"}]), dict(final(f), name="second")], "cycle"),
    (lambda f: [final(f), final(f)], "at most one"),
    (lambda f: [soup(f), soup(f)], "two merges are named 'soup'"),
])
def test_bad_multi_configs(fam, tmp_path, capsys, docs, words):
    cfg = write_docs(tmp_path / "multi.yml", docs(fam))
    rc, _, err = run(capsys, cfg, tmp_path / "out")
    assert rc == 2 and words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-intermediate").exists()


def test_per_merge_flags_and_single_merge_commands_are_refused_clearly(fam, tmp_path, capsys):
    cfg = write_docs(tmp_path / "multi.yml", [soup(fam), final(fam)])
    rc, _, err = run(capsys, cfg, tmp_path / "out", "--lambda", "0.3")
    assert rc == 2 and "--lambda" in err and "multi-document" in err
    capsys.readouterr()
    assert cli.main(["plan", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "multi-document config (2 merges: soup, (unnamed))" in err and "not valid YAML" not in err


def test_a_mergekit_moe_config_is_named_as_such(fam, tmp_path, capsys):
    cfg = tmp_path / "moe.yml"
    cfg.write_text(yaml.safe_dump({"base_model": str(fam.base), "gate_mode": "hidden", "dtype": "bfloat16",
                                   "experts": [{"source_model": str(fam.finetunes[0]), "positive_prompts": ["x"]}]}))
    rc, _, err = run(capsys, cfg, tmp_path / "out")
    assert rc == 2 and "mergekit-moe config" in err and "out of scope" in err
    # Said once (not once per mergekit-moe key), without its missing merge_method and models as more problems.
    assert err.count("mergekit-moe config") == 1 and "merge_method is missing" not in err and "problems" not in err


def test_every_document_is_checked_before_the_first_merge_runs(fam, tmp_path, capsys):
    """A typo in the final merge (a name no merge has) stops the run before the soup is merged."""
    typo = dict(final(fam), models=[{"model": "sopu"}, {"model": str(fam.finetunes[0])}])
    cfg = write_docs(tmp_path / "multi.yml", [soup(fam), typo])
    rc, out, err = run(capsys, cfg, tmp_path / "out")
    assert rc == 2, err
    assert "(the final (unnamed) merge)" in err
    assert "models[0].model: sopu does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out-intermediate").exists() and not (tmp_path / "out").exists()
