"""`lines-fast layers MODEL`: the table a user reads before a LiNeS merge, from headers only."""
from __future__ import annotations

import re

import torch
from safetensors.torch import save_file

from lines_fast.cli import main


def _rows(text: str) -> dict[str, list[str]]:
    """tensor name -> the row's other cells, from the printed table (header and rules skipped)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"\s*\|\s*|\s{2,}", line.strip()) if c.strip()]
        if len(cells) >= 5 and cells[0] != "tensor":
            rows[cells[0]] = cells[1:]
    return rows


def test_llama_checkpoint_table(tmp_path, capsys):
    names = ["model.embed_tokens.weight"]
    for i in range(3):
        names += [f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.mlp.down_proj.weight",
                  f"model.layers.{i}.input_layernorm.weight"]
    names += ["model.norm.weight", "lm_head.weight"]
    tensors = {n: torch.zeros(2, 2) for n in names}
    tensors["model.rotary.inv_freq_steps"] = torch.zeros(2, dtype=torch.int64)  # non-float: not listed
    save_file(tensors, str(tmp_path / "model.safetensors"))

    assert main(["layers", str(tmp_path), "--alpha", "0.5", "--beta", "1.0"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    # L = 3: block l gets 0.5 + 1.0 * l / 2 -> 0.5, 1.0, 1.5; outside every block: alpha = 0.5.
    assert rows["model.layers.0.self_attn.q_proj.weight"][:4] == ["model.layers", "0", "3", "0.5"]
    assert rows["model.layers.1.mlp.down_proj.weight"][:4] == ["model.layers", "1", "3", "1"]
    assert rows["model.layers.2.input_layernorm.weight"][:4] == ["model.layers", "2", "3", "1.5"]
    for outside in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]:
        assert rows[outside][0] == "outside" and rows[outside][-1] == "0.5"
    assert "model.rotary.inv_freq_steps" not in out
    assert "3 tensors outside every block" in out


def test_open_clip_checkpoint_table_has_two_stacks(tmp_path, capsys):
    names = ["visual.class_embedding", "visual.positional_embedding", "visual.conv1.weight", "visual.proj",
             "token_embedding.weight", "ln_final.weight", "text_projection"]
    names += [f"visual.transformer.resblocks.{i}.attn.in_proj_weight" for i in range(12)]
    names += [f"transformer.resblocks.{i}.mlp.c_fc.weight" for i in range(5)]
    save_file({n: torch.zeros(1) for n in names}, str(tmp_path / "open_clip.safetensors"))

    assert main(["layers", str(tmp_path / "open_clip.safetensors"), "--alpha", "0.2", "--beta", "0.8",
                 "--outside", "last"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    # Vision tower: L = 12, block 11 -> 0.2 + 0.8 = 1.0; block 6 -> 0.2 + 0.8 * 6/11 = 0.636364.
    assert rows["visual.transformer.resblocks.11.attn.in_proj_weight"][:4] == \
        ["visual.transformer.resblocks", "11", "12", "1"]
    assert rows["visual.transformer.resblocks.6.attn.in_proj_weight"][3] == "0.636364"
    # Text tower: its own L = 5, block 2 -> 0.2 + 0.8 * 2/4 = 0.6.
    assert rows["transformer.resblocks.2.mlp.c_fc.weight"][:4] == ["transformer.resblocks", "2", "5", "0.6"]
    # outside: last -> alpha + beta = 1.0 for embeddings, projections, final norm.
    assert rows["visual.class_embedding"][-1] == "1" and rows["text_projection"][-1] == "1"
    assert "2 stacks" in out


def test_layers_on_a_missing_path_is_a_clear_error(tmp_path, capsys):
    assert main(["layers", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
