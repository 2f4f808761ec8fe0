"""Bad input that once gave a traceback, a hang or a complete-looking wrong output: each is now
one paragraph naming the file (and tensor), exit 2, nothing written."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lines_fast import cli
from lines_fast.checkpoint import Checkpoint
from lines_fast.errors import MergeInputError
from lines_fast.writer import PARTIAL_SUFFIX
from lines_fast.synth import INT_TENSOR_NAME, recipe, write_checkpoint_family

from helpers import load, write_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_checkpoint_family(tmp_path_factory.mktemp("bad") / "fam", recipe("tiny"), n_finetunes=2,
                                   dtype=torch.bfloat16, int_tensor=True)


@pytest.fixture
def fam(tmp_path, pristine):
    for src, name in ((pristine.base, "base"), (pristine.finetunes[0], "ft1"), (pristine.finetunes[1], "ft2")):
        shutil.copytree(src, tmp_path / name)
    return tmp_path


def args(root: Path, *extra, method="task_arithmetic") -> list[str]:
    return ["merge", "--method", method, "--base", str(root / "base"), "--model", str(root / "ft1"),
            "--model", str(root / "ft2"), "-o", str(root / "out"), "--no-progress", "--device", "cpu",
            *map(str, extra)]


def refused(capsys, root: Path, argv) -> str:
    capsys.readouterr()
    rc = cli.main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert not (root / "out").exists()
    lines = err.strip().splitlines()
    assert sum("error:" in line for line in lines) == 1, err
    return lines[-1]


def config(root: Path, text: str) -> Path:
    path = root / "c.yml"
    path.write_text(f"merge_method: ties\nbase_model: {root / 'base'}\nmodels:\n  - model: {root / 'ft1'}\n" + text)
    return path


# -- configs that are not configs -----------------------------------------------------------
def test_a_binary_file_as_the_config(fam, capsys):
    (fam / "c.yml").write_bytes(b"\x00\x01\xff\xfe\x80")
    msg = refused(capsys, fam, ["merge", fam / "c.yml", fam / "out"])
    assert str(fam / "c.yml") in msg and "not a text file" in msg


def test_a_checkpoint_as_the_config(fam, capsys):
    weights = fam / "ft1" / "model.safetensors"
    msg = refused(capsys, fam, ["merge", weights, fam / "out"])
    assert str(weights) in msg and "safetensors checkpoint, not a YAML" in msg


@pytest.mark.parametrize("text, words", [
    ("exclude: 5\n", "exclude must be a regex"),
    ("exclude: [5]\n", "exclude must be a regex"),
    ("lines: {beta: 1, layer_pattern: 5}\n", "layer_pattern must be a regex"),
])
def test_wrongly_typed_keys(fam, capsys, text, words):
    msg = refused(capsys, fam, ["merge", config(fam, text), fam / "out"])
    assert words in msg and "c.yml" in msg


# -- inputs that are not files, or change under the merge ---------------------------------------
def test_a_fifo_as_a_model_is_refused_without_hanging(fam, capsys):
    fifo = fam / "pipe.safetensors"
    os.mkfifo(fifo)
    argv = args(fam)
    argv[argv.index(str(fam / "ft2"))] = str(fifo)
    msg = refused(capsys, fam, argv)
    assert str(fifo) in msg and "not a regular file" in msg


def test_an_input_truncated_during_the_merge_is_named(fam, capsys, monkeypatch):
    """A file that changes after its header was read is caught before its bytes are mapped (a
    read past a truncated end of a memory map would kill the process with SIGBUS)."""
    victim = fam / "ft2" / "model.safetensors"
    real = Checkpoint._check_unchanged   # what every read (a tensor, a packed span) does first
    calls = {"n": 0}

    def truncating(self, file):
        calls["n"] += file == victim
        if file == victim and calls["n"] == 2:   # mid-merge, before a read of it: cut it to half
            with open(victim, "r+b") as f:
                f.truncate(victim.stat().st_size // 2)
        return real(self, file)

    monkeypatch.setattr(Checkpoint, "_check_unchanged", truncating)
    msg = refused(capsys, fam, args(fam))
    assert str(victim) in msg and "changed while lines_fast was reading it" in msg and "bytes" in msg


def test_an_index_naming_a_shard_outside_the_model_is_refused(fam, capsys, tmp_path):
    sharded = tmp_path / "sharded"
    write_checkpoint_family(sharded, recipe("tiny"), n_finetunes=1, dtype=torch.bfloat16, max_shard_size=40_000)
    index = sharded / "ft1" / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    first = next(iter(doc["weight_map"]))
    shard = doc["weight_map"][first]
    shutil.copy(sharded / "ft1" / shard, tmp_path / "elsewhere.safetensors")
    doc["weight_map"] = {n: ("../../elsewhere.safetensors" if s == shard else s) for n, s in doc["weight_map"].items()}
    index.write_text(json.dumps(doc))
    with pytest.raises(MergeInputError, match="outside"):
        Checkpoint.open(sharded / "ft1")


# -- what a copy would hide ---------------------------------------------------------------
def test_an_int_tensor_of_another_shape_is_refused(fam, capsys):
    tensors = load(fam / "ft2")
    tensors[INT_TENSOR_NAME] = torch.arange(7, dtype=tensors[INT_TENSOR_NAME].dtype)
    write_safetensors(fam / "ft2" / "model.safetensors", tensors)
    msg = refused(capsys, fam, args(fam))
    assert INT_TENSOR_NAME in msg and "model 2" in msg and "do not match" in msg


def test_an_int_tensor_with_other_values_is_reported(fam, capsys):
    tensors = load(fam / "ft2")
    tensors[INT_TENSOR_NAME] = tensors[INT_TENSOR_NAME] + 1
    write_safetensors(fam / "ft2" / "model.safetensors", tensors)
    capsys.readouterr()
    assert cli.main(args(fam)) == 0
    err = capsys.readouterr().err
    assert f"non-float tensor '{INT_TENSOR_NAME}' differs" in err and "model 2" in err
    assert torch.equal(load(fam / "out")[INT_TENSOR_NAME], load(fam / "base")[INT_TENSOR_NAME])


def test_float16_overflow_is_refused_unless_allowed(fam, capsys):
    msg = refused(capsys, fam, args(fam, "--lambda", "1e9", "--out-dtype", "float16"))
    assert "beyond float16's range" in msg and "--allow-nonfinite" in msg and "tensor '" in msg
    capsys.readouterr()
    assert cli.main(args(fam, "--lambda", "1e9", "--out-dtype", "float16", "--allow-nonfinite")) == 0
    assert any(bool(torch.isinf(t).any()) for t in load(fam / "out").values() if t.is_floating_point())


@pytest.mark.parametrize("option", [["--lambda", "nan"], ["--lambda", "inf"], ["--lambda", "1e39"],
                                    ["--weight", "nan"], ["--weight", "inf"]])
def test_non_finite_options_are_refused(fam, capsys, option):
    msg = refused(capsys, fam, args(fam, *option))
    assert "finite" in msg


def test_out_dtype_is_declared_for_transformers_4_and_5(fam, capsys):
    assert cli.main(args(fam, "--out-dtype", "float32")) == 0
    cfg = json.loads((fam / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and cfg["dtype"] == "float32"


def test_the_disk_space_message_says_the_margin(fam, capsys, monkeypatch):
    usage = shutil.disk_usage(fam)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    msg = refused(capsys, fam, args(fam))
    assert "margin of 2% and 64 MB" in msg and "needs" in msg


def test_a_config_lists_all_its_first_problems_at_once(fam, capsys):
    """Refused keys, unknown keys, an unknown method and missing model paths: one paragraph with
    every one of them, numbered, instead of one per attempt."""
    cfg = fam / "c.yml"
    cfg.write_text(f"merge_method: karcher\nbase_model: {fam / 'base'}\nmodules: {{text: {{}}}}\n"
                   f"frobnicate: 1\nmodels:\n  - model: {fam / 'nope1'}\n  - model: {fam / 'ft1'}\n"
                   f"  - model: {fam / 'nope2'}\n")
    msg = refused(capsys, fam, ["merge", cfg, fam / "out"])
    assert "5 problems" in msg and "(5)" in msg
    for words in ("'modules'", "frobnicate", "karcher", "models[0].model", "models[2].model"):
        assert words in msg, words
    assert "models[1]" not in msg


def test_a_config_lists_its_key_block_and_parameter_problems_together(fam, capsys):
    """An unknown key, a bad lines: block, a bad exclude and three bad parameters (one per model,
    one shared): one paragraph listing all six, not the first alone."""
    cfg = fam / "c.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {fam / 'base'}\nfrobnicate: 1\nexclude: 5\n"
                   "lines: {alpha: 0.5, colour: 1}\nparameters: {lambda: big}\n"
                   f"models:\n  - model: {fam / 'ft1'}\n    parameters: {{density: 1.5}}\n"
                   f"  - model: {fam / 'ft2'}\n    parameters: {{weight: x}}\n")
    msg = refused(capsys, fam, ["merge", cfg, fam / "out"])
    assert "6 problems" in msg and "(6)" in msg, msg
    for words in ("frobnicate", "colour", "exclude", "density 1.5", "weight must be a number", "lambda"):
        assert words in msg, words
    # One problem alone reads as before: no count.
    cfg.write_text(f"merge_method: ties\nbase_model: {fam / 'base'}\nparameters: {{lambda: big}}\n"
                   f"models:\n  - model: {fam / 'ft1'}\n")
    msg = refused(capsys, fam, ["merge", cfg, fam / "out"])
    assert "problems" not in msg and "lambda must be a number" in msg


# -- configs as mergekit users write them (a new user's review, session 8) -------------------
def test_a_model_is_named_by_its_own_index_when_the_base_is_listed_too(fam, capsys):
    cfg = fam / "c.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {fam / 'base'}\nmodels:\n  - model: {fam / 'base'}\n"
                   f"  - model: {fam / 'ft1'}\n    parameters: {{densty: 0.5}}\n")
    msg = refused(capsys, fam, ["merge", cfg, fam / "out"])
    assert f"models[1] ({fam / 'ft1'}): densty is not a parameter" in msg and "models[0] (" not in msg


def test_the_base_entrys_parameters_are_ignored_and_said_to_be_not_blamed_on_a_fine_tune(fam, capsys):
    """mergekit ignores the parameters of the base listed among the models of a task-vector method
    (it has no task vector); a copied density or a typo there used to be reported on models[1]."""
    plain = fam / "plain.yml"
    plain.write_text(f"merge_method: ties\nbase_model: {fam / 'base'}\nmodels:\n  - model: {fam / 'ft1'}\n"
                     f"    parameters: {{density: 0.5}}\n")
    listed = fam / "listed.yml"
    listed.write_text(f"merge_method: ties\nbase_model: {fam / 'base'}\nmodels:\n  - model: {fam / 'ft1'}\n"
                      f"    parameters: {{density: 0.5}}\n  - model: {fam / 'base'}\n"
                      f"    parameters: {{densty: 1.5, density: 1.5, weight: 3}}\n")
    assert cli.main(["merge", str(plain), str(fam / "a"), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["merge", str(listed), str(fam / "b"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert (f"{listed}: models[1] is the base model ({fam / 'base'}); its parameters (density, densty, weight) "
            "have no effect on a ties merge") in err
    a, b = load(fam / "a"), load(fam / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert cli.main(["plan", str(listed)]) == 0   # plan says it too
    assert f"{listed}: models[1] is the base model" in capsys.readouterr().err


def test_a_parameter_that_changes_nothing_where_it_is_given_is_said_so(fam, capsys):
    """nuslerp_row_wise applies only without nuslerp_flatten (mergekit ignores it there too): the
    merge goes on, the log says why the setting did nothing, and the output is the plain one."""
    def config(name, extra):
        cfg = fam / name
        cfg.write_text(f"merge_method: nuslerp\nmodels:\n  - model: {fam / 'ft1'}\n    parameters: {{weight: 0.6}}\n"
                       f"  - model: {fam / 'ft2'}\n    parameters: {{weight: 0.4}}\nparameters: {{{extra}}}\n")
        return cfg
    note = "nuslerp_row_wise: true has no effect while nuslerp_flatten is true; set nuslerp_flatten: false"
    unused = config("unused.yml", "nuslerp_row_wise: true")
    assert cli.main(["merge", str(unused), str(fam / "a"), "--no-progress"]) == 0
    assert f"{unused}: {note}" in capsys.readouterr().err
    assert cli.main(["merge", str(config("plain.yml", "")), str(fam / "b"), "--no-progress"]) == 0
    a, b = load(fam / "a"), load(fam / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    for quiet in ("nuslerp_flatten: false, nuslerp_row_wise: true", "nuslerp_row_wise: false",
                  "nuslerp_flatten: true, nuslerp_row_wise: false"):
        capsys.readouterr()
        assert cli.main(["plan", str(config("quiet.yml", quiet))]) == 0
        assert "has no effect" not in capsys.readouterr().err, quiet


def test_a_model_listed_twice_is_refused_as_mergekit_would_merge_it_once(fam, capsys):
    cfg = fam / "twice.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {fam / 'base'}\nmodels:\n  - model: {fam / 'ft1'}\n"
                   f"  - model: {fam / 'ft2'}\n  - model: {fam / 'ft1'}/\n")   # the same directory, spelled otherwise
    msg = refused(capsys, fam, ["merge", cfg, fam / "out"])
    assert "models[0] and models[2] are the same model" in msg and "larger weight" in msg
    msg = refused(capsys, fam, ["merge", "--method", "task_arithmetic", "--base", fam / "base", "--model", fam / "ft1",
                                "--model", fam / "ft1", "-o", fam / "out"])
    assert "model 1 (--model) and model 2 are the same model" in msg


def test_numbers_in_scientific_notation_are_numbers(fam, capsys):
    """PyYAML reads 1e-2 (no dot) as a string; mergekit takes it as a number, so do we."""
    import yaml

    assert yaml.safe_load("x: 1e-2")["x"] == "1e-2"
    text = f"merge_method: ties\nbase_model: {fam / 'base'}\nparameters: {{lambda: 1e0}}\nmodels:\n" + "".join(
        f"  - model: {fam / m}\n    parameters: {{density: 5e-1, weight: 1E0}}\n" for m in ("ft1", "ft2"))
    (fam / "sci.yml").write_text(text)
    (fam / "dec.yml").write_text(text.replace("1e0", "1.0").replace("5e-1", "0.5").replace("1E0", "1.0"))
    assert cli.main(["merge", str(fam / "sci.yml"), str(fam / "a"), "-q", "--no-progress"]) == 0
    assert cli.main(["merge", str(fam / "dec.yml"), str(fam / "b"), "-q", "--no-progress"]) == 0
    assert load(fam / "a").keys() == load(fam / "b").keys()
    assert all(torch.equal(x, load(fam / "b")[k]) for k, x in load(fam / "a").items())
    msg = refused(capsys, fam, ["merge", config(fam, "    parameters: {density: half}\n"), fam / "out"])
    assert "density must be a number, got the text 'half'" in msg


@pytest.mark.parametrize("spelling", ["torch.bfloat16", "bf16", "BFloat16"])
def test_dtype_spellings_mergekit_reads(fam, spelling):
    assert cli.main(["merge", str(config(fam, f"    parameters: {{density: 0.5}}\ndtype: {spelling}\n")),
                     str(fam / "out"), "-q", "--no-progress"]) == 0
    assert {t.dtype for t in load(fam / "out").values() if t.is_floating_point()} == {torch.bfloat16}


def test_a_bad_dtype_is_reported_once(fam, capsys):
    msg = refused(capsys, fam, ["merge", config(fam, "dtype: int8\ntokenizer_source: base\n"), fam / "out"])
    assert "problems" not in msg and msg.count("int8") == 1 and "bf16" in msg and "out_dtype" not in msg


def test_a_parameter_set_twice_on_the_command_line_is_refused(fam, capsys):
    msg = refused(capsys, fam, args(fam, "--density", "0.2", "--param", "density=0.3", method="ties"))
    assert "--param density=0.3 and --density both set density" in msg


def test_a_text_file_given_as_a_model_is_named_as_such(fam, capsys):
    cfg = config(fam, "")
    msg = refused(capsys, fam, ["merge", "--method", "ties", "--base", fam / "base", "--model", cfg,
                                "-o", fam / "out", "--no-progress"])
    assert "starts with text ('merge_me'...)" in msg and "not a safetensors file" in msg


def test_an_empty_model_directory_names_every_format_read(fam, capsys):
    (fam / "empty").mkdir()
    msg = refused(capsys, fam, ["merge", "--method", "ties", "--base", fam / "base", "--model", fam / "empty",
                                "-o", fam / "out", "--no-progress"])
    assert "no .safetensors" in msg and "pytorch_model.bin" in msg and "adapter" in msg


def test_resume_of_a_finished_merge_says_it_is_finished(fam, capsys):
    assert cli.main(args(fam, "-q")) == 0
    capsys.readouterr()
    assert cli.main(args(fam, "--resume")) == 2
    assert "a finished merge: there is nothing to resume" in capsys.readouterr().err


def test_a_refused_merge_with_no_finished_shard_leaves_no_partial_directory(fam, capsys):
    """NaN found in the merge pass before any shard is finished: nothing to resume, so nothing left
    (OUT.lines-fast-partial used to stay behind, holding only the journal)."""
    weights = fam / "ft2" / "model.safetensors"
    tensors = load(fam / "ft2")
    name = next(n for n, t in tensors.items() if t.is_floating_point() and t.dim() == 2)
    tensors[name][0, 0] = float("nan")
    write_safetensors(weights, tensors, {"format": "pt"})
    msg = refused(capsys, fam, args(fam))
    assert name in msg and "NaN" in msg
    assert not (fam / ("out" + PARTIAL_SUFFIX)).exists()


def test_a_base_given_as_a_lone_file_says_the_output_lacks_its_config(fam, capsys):
    weights = fam / "base" / "model.safetensors"
    argv = ["merge", "--method", "task_arithmetic", "--base", str(weights), "--model", str(fam / "ft1"),
            "-o", str(fam / "out"), "--no-progress"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"{weights} is a lone .safetensors file" in err and f"Copy {fam / 'base' / 'config.json'}" in err
    assert not (fam / "out" / "config.json").exists()


def test_lines_alpha_auto_in_any_case_and_a_bad_alpha_names_auto(fam, capsys):
    from lines_fast.config import from_yaml_dict

    doc = {"merge_method": "ties", "base_model": str(fam / "base"),
           "models": [{"model": str(fam / "ft1"), "parameters": {"density": 0.5}}]}
    assert from_yaml_dict({**doc, "lines": {"alpha": "Auto", "beta": 0.5}}, "c.yml").lines.alpha == "auto"
    with pytest.raises(MergeInputError, match=r"lines.alpha must be a number, got 'big'; or auto"):
        from_yaml_dict({**doc, "lines": {"alpha": "big", "beta": 0.5}}, "c.yml")


def test_plan_refuses_inputs_that_disagree_as_merge_does(fam, capsys):
    tensors = load(fam / "ft2")
    name = next(n for n, t in tensors.items() if t.is_floating_point() and t.dim() == 2)
    del tensors[name]
    write_safetensors(fam / "ft2" / "model.safetensors", tensors, {"format": "pt"})
    cfg = config(fam, f"  - model: {fam / 'ft2'}\nparameters: {{density: 0.5}}\n")
    for command in (["plan", cfg], ["merge", cfg, fam / "out"]):
        msg = refused(capsys, fam, command)
        assert f"tensor '{name}' is in base model" in msg and "missing from" in msg


def test_a_bad_exclude_regex_on_the_command_line_is_blamed_on_the_option(fam, capsys):
    cfg = config(fam, f"  - model: {fam / 'ft2'}\nparameters: {{density: 0.5}}\n")
    for argv in (["merge", cfg, fam / "out", "--exclude", "[unclosed"], args(fam, "--exclude", "[unclosed")):
        msg = refused(capsys, fam, argv)
        assert "--exclude '[unclosed' is not a valid regex" in msg and str(cfg) not in msg


def test_a_failed_write_keeps_the_partial_and_its_statistics_for_resume(fam, capsys, monkeypatch):
    """Unlike a refusal of the inputs, a full disk leaves OUT.lines-fast-partial: its journal holds
    the statistics passes' results, which --resume reuses."""
    from lines_fast.writer import JOURNAL, ShardedWriter

    def full(self, shard):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardedWriter, "_close_shard", full)
    msg = refused(capsys, fam, args(fam, "--lines-alpha", "auto", "--lines-beta", "0.5", method="ties"))
    assert "No space left on device" in msg and "--resume" in msg
    partial = fam / ("out" + PARTIAL_SUFFIX)
    assert json.loads((partial / JOURNAL).read_text())["notes"]["stats"]["alpha"] is not None
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(args(fam, "--lines-alpha", "auto", "--lines-beta", "0.5", "--resume", method="ties")) == 0
    assert "reusing the α of the interrupted run" in capsys.readouterr().err
