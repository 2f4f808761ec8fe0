"""`lines-fast plan` (a dry run priced from shapes) and `lines-fast generate`."""
from __future__ import annotations

import re

import pytest
import yaml

from lines_fast.checkpoint import Checkpoint
from lines_fast.cli import main

# Llama-3-70B: 80 layers of (q 8192^2 + k,v 1024*8192 each + o 8192^2 + 3 * 28672*8192 + 2 norms 8192)
# + embed and lm_head 128256*8192 each + final norm 8192.
LAYER = 8192 * 8192 * 2 + 1024 * 8192 * 2 + 3 * 28672 * 8192 + 2 * 8192
PARAMS_70B = 80 * LAYER + 2 * 128256 * 8192 + 8192


def _pass_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()
            if re.match(r"\s+(magnitudes|refine|norms|merge)\s", line)]


def test_plan_llama3_70b_from_shapes_alone(capsys):
    assert PARAMS_70B == 70_553_706_496
    assert main(["plan", "--recipe", "llama3-70b", "--method", "ties", "--models", "3", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    rows = _pass_rows(out)
    assert [r[0] for r in rows] == ["merge"]          # tensor-scope TIES: one pass
    reads = PARAMS_70B * 2 * 4                         # bf16, base + 3 models, read once
    assert rows[0][1:3] == [f"{reads / 1e9:,.1f}", "GB"]
    assert rows[0][3:5] == [f"{PARAMS_70B * 2 / 1e9:,.1f}", "GB"]   # one bf16 output
    assert "70.6B parameters" in out and "peak GPU memory" in out


def test_plan_global_trim_with_auto_alpha_takes_four_passes(capsys):
    assert main(["plan", "--recipe", "llama3-70b", "--method", "ties", "--trim-scope", "global",
                 "--lines-alpha", "auto"]) == 0
    out = capsys.readouterr().out
    rows = _pass_rows(out)
    assert [r[0] for r in rows] == ["magnitudes", "refine", "norms", "merge"]
    assert all(r[3] == "0.0" for r in rows[:3]) and rows[3][3] != "0.0"   # only the merge writes
    # The refine pass is conditional: the total is also given without it.
    seconds = [float(r[5].rstrip("s").replace(",", "")) for r in rows]
    without = re.search(r"without the refine pass .*: ([\d,]+) s", out)
    assert without and abs(int(without.group(1).replace(",", "")) - (sum(seconds) - seconds[1])) <= 1


def test_generate_writes_a_family_and_a_config_plan_reads(tmp_path, capsys):
    out = tmp_path / "fam"
    assert main(["generate", "tiny", str(out), "--models", "2", "--config", "ties"]) == 0
    config = yaml.safe_load((out / "ties.yaml").read_text())
    assert config["merge_method"] == "ties" and len(config["models"]) == 2
    with Checkpoint.open(out / "base") as base, Checkpoint.open(out / "ft2") as ft:
        assert list(base.tensors) == list(ft.tensors) and base.total_bytes() == ft.total_bytes()
        in_bytes = 3 * base.total_bytes()
    capsys.readouterr()
    assert main(["plan", str(out / "ties.yaml")]) == 0
    rows = _pass_rows(capsys.readouterr().out)
    assert rows[0][0] == "merge" and rows[0][1:3] == [f"{in_bytes / 1e6:,.1f}", "MB"]


def test_plan_without_a_config_or_recipe_is_a_clear_error(capsys):
    assert main(["plan"]) == 2
    assert "--recipe" in capsys.readouterr().err


def test_plan_of_a_config_refuses_the_recipe_options_it_would_ignore(tmp_path, capsys):
    out = tmp_path / "fam"
    assert main(["generate", "tiny", str(out), "--models", "2", "--config", "ties"]) == 0
    capsys.readouterr()
    assert main(["plan", str(out / "ties.yaml"), "--recipe", "llama3-70b", "--models", "7"]) == 2
    err = capsys.readouterr().err
    assert "--recipe, --models describe a merge without a config" in err


@pytest.mark.parametrize("method, models", [("slerp", 1), ("wise_ft", 1), ("nuslerp", 2), ("ties", 3)])
def test_plan_of_a_recipe_prices_as_many_models_as_the_method_takes(method, models, capsys):
    assert main(["plan", "--recipe", "tiny", "--method", method]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"{method}, {models} fine-tuned model" in first
