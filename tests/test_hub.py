"""Hub model names (org/name[@revision]) through huggingface_hub's real code path, offline: the
test lays out a Hugging Face cache in the hub's own layout (blobs, snapshots, refs) and runs
lines-fast with HF_HOME pointing at it and HF_HUB_OFFLINE=1 (these machines have no Hub access)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lines_fast.hub import parse
from lines_fast.synth import recipe, write_checkpoint_family

from helpers import load

pytest.importorskip("huggingface_hub")
REPO = Path(__file__).resolve().parents[1]


def cache_model(home: Path, repo: str, src: Path, commit: str, refs=("main",)) -> Path:
    """src's files as a cached snapshot of `repo` at `commit`, in the hub cache layout."""
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in src.iterdir():
        blob = root / "blobs" / f"{commit[:8]}-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    fam = write_checkpoint_family(root / "fam", recipe("tiny"), n_finetunes=2, dtype=torch.bfloat16)
    home = root / "hf-home"
    cache_model(home, "acme/tiny-base", fam.base, "a" * 40)
    cache_model(home, "acme/tiny-ft1", fam.finetunes[0], "b" * 40)
    cache_model(home, "acme/tiny-ft2", fam.finetunes[1], "c" * 40, refs=("main", "v1"))
    return root, fam, home


def lines_fast(home: Path, *args):
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "lines_fast.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_a_config_of_hub_names_merges_from_the_cache(hub, tmp_path):
    root, fam, home = hub
    cfg = tmp_path / "ties.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": "acme/tiny-base",
                                   "parameters": {"density": 0.5},
                                   "models": [{"model": "acme/tiny-ft1"}, {"model": "acme/tiny-ft2@v1"}]}))
    proc = lines_fast(home, "merge", cfg, tmp_path / "out", "--device", "cpu", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    local = tmp_path / "local.yml"
    local.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(fam.base), "parameters": {"density": 0.5},
                                     "models": [{"model": str(p)} for p in fam.finetunes]}))
    assert lines_fast(home, "merge", local, tmp_path / "ref", "--device", "cpu", "--no-progress").returncode == 0
    a, b = load(tmp_path / "out"), load(tmp_path / "ref")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert (tmp_path / "out" / "config.json").is_file()   # copied from the cached base


def test_cli_names_and_plan_read_the_cache(hub, tmp_path):
    _, _, home = hub
    proc = lines_fast(home, "merge", "--method", "task_arithmetic", "--base", "acme/tiny-base", "--model",
                      "acme/tiny-ft1", "-o", tmp_path / "out", "--device", "cpu", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "acme/tiny-base",
                                   "models": [{"model": "acme/tiny-ft1"}]}))
    proc = lines_fast(home, "plan", cfg)
    assert proc.returncode == 0 and "21 tensors" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("name, words", [
    ("acme/not-cached", "not in the Hugging Face cache"),
    ("acme/tiny-ft1@v9", "not in the Hugging Face cache"),   # offline, an unknown revision is not cached
    ("acme/tiny-ft1+some/lora", "model+LoRA syntax"),
])
def test_missing_hub_models_are_refused_offline(hub, tmp_path, name, words):
    _, _, home = hub
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "acme/tiny-base",
                                   "models": [{"model": name}]}))
    proc = lines_fast(home, "merge", cfg, tmp_path / "out", "--device", "cpu")
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "models[0].model" in proc.stderr and str(cfg) in proc.stderr
    assert not (tmp_path / "out").exists()
    if "cache" in words:   # a relative local path that does not exist reads as a Hub name: the message says so
        assert f"({os.path.join(REPO, name)} does not exist: relative paths are read from the current directory)" in \
            proc.stderr


def test_what_reads_as_a_hub_name():
    assert parse("mistralai/Mistral-7B-v0.1") == ("mistralai/Mistral-7B-v0.1", None)
    assert parse("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert parse("./local/dir") is None and parse("/abs/path") is None and parse("name") is None
    assert parse("a/b/c") is None   # three components: a local path


def test_plan_reads_only_the_headers_of_models_not_in_the_cache(hub, tmp_path, monkeypatch, capsys):
    """`lines-fast plan` on Hub names that are not cached: the safetensors headers come from the
    Hub (huggingface_hub.get_safetensors_metadata, faked here from local files), nothing is
    downloaded, and the plan equals the one of the same models on disk."""
    import huggingface_hub
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    from lines_fast import cli
    from lines_fast.checkpoint import Checkpoint

    root, fam, _ = hub
    local = {"acme/base": fam.base, "acme/ft1": fam.finetunes[0]}
    fetched = []

    def headers(repo_id, *, revision=None, **_):
        fetched.append(repo_id)
        with Checkpoint.open(local[repo_id]) as ckpt:
            file = ckpt.files[0].name
            tensors = {n: TensorInfo(i.dtype.code, list(i.shape), (i.offset, i.offset + i.nbytes))
                       for n, i in ckpt.tensors.items()}
        return SafetensorsRepoMetadata(None, False, {n: file for n in tensors},
                                       {file: SafetensorsFileMetadata({}, tensors)})

    def no_download(*args, local_files_only=False, **kwargs):
        assert local_files_only, "plan must not download weights"
        return real_snapshot(*args, local_files_only=True, **kwargs)

    real_snapshot = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", headers)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    remote_cfg = tmp_path / "remote.yml"
    remote_cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": "acme/base",
                                          "models": [{"model": "acme/ft1"}], "parameters": {"density": 0.3}}))
    local_cfg = tmp_path / "local.yml"
    local_cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(fam.base),
                                         "models": [{"model": str(fam.finetunes[0])}], "parameters": {"density": 0.3}}))
    capsys.readouterr()
    assert cli.main(["plan", str(remote_cfg)]) == 0
    remote_plan = capsys.readouterr().out
    assert cli.main(["plan", str(local_cfg)]) == 0
    local_plan = capsys.readouterr().out
    assert sorted(fetched) == ["acme/base", "acme/ft1"]
    strip = lambda text: text.split("\n", 1)[1]   # noqa: E731  (the first line names the config)
    assert strip(remote_plan) == strip(local_plan) and "21 tensors" in remote_plan
