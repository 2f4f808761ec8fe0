"""tokenizer_source / the tokenizer: block / chat_template (lines_fast/vocabulary.py,
realign.py, tokenizer_files.py).

The expected outputs are built here independently: each model's rows are realigned by token
string with plain loops (mergekit's rules written out), the realigned checkpoints are saved,
and a merge of those without any tokenizer option must give the same bytes; the vocabulary
ids are written out by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import load, write_safetensors
from lines_fast.cli import main

from lines_fast.synth_vocabulary import BASE, H, SPECIAL, tokenizer_json, write_model


def vocab_of(folder: Path) -> dict[str, int]:
    doc = json.loads((folder / "tokenizer.json").read_text())
    return {**doc["model"]["vocab"], **{e["content"]: e["id"] for e in doc["added_tokens"]}}


def realign_by_hand(folders: list[Path], vocab: dict[str, int], rows: int, base: int | None,
                    out_root: Path, tokens_cfg: dict | None = None) -> list[Path]:
    """mergekit's PermutedVocabulary, written out token by token: every model's vocabulary rows in
    the output order, in the models' dtype (bfloat16: averages are a running bfloat16 sum, then one
    division, as mergekit computes them), saved as new checkpoints."""
    tokens_cfg = tokens_cfg or {}
    models = [load(f) for f in folders]
    vocabs = [vocab_of(f) if (f / "tokenizer.json").exists() else vocab_of(folders[base or 0]) for f in folders]
    out_paths = []
    names = ["model.embed_tokens.weight", "lm_head.weight"]
    aligned = [dict(m) for m in models]
    for name in names:
        src = [m[name] for m in models]
        for j in range(len(models)):
            new = torch.zeros(rows, H, dtype=torch.bfloat16)
            for token, i in vocab.items():
                have = [k for k in range(len(models)) if token in vocabs[k]]
                cfg = tokens_cfg.get(token)
                if cfg is not None and (cfg.get("force") or j not in have):
                    kind, who, what = cfg["source"]
                    new[i] = 0 if kind == "zero" else src[who][vocabs[who][what]]
                elif j in have:
                    new[i] = src[j][vocabs[j][token]]
                elif len(have) == 1:
                    new[i] = src[have[0]][vocabs[have[0]][token]]
                elif base is not None and base in have:
                    new[i] = src[base][vocabs[base][token]]
                elif have:
                    row = torch.zeros(H, dtype=torch.bfloat16)
                    for k in have:
                        row = row + src[k][vocabs[k][token]]
                    new[i] = row / len(have)
            if rows > len(vocab):
                new[len(vocab):] = new[:len(vocab)].mean(0)
            aligned[j][name] = new
    for j, m in enumerate(aligned):
        folder = out_root / f"aligned{j}"
        folder.mkdir()
        write_safetensors(folder / "model.safetensors", m, {"format": "pt"})
        (folder / "config.json").write_text((folders[j] / "config.json").read_text())
        out_paths.append(folder)
    return out_paths


@pytest.fixture
def family(tmp_path):
    """base (14 tokens); ft1 adds kk, ll; ft2 adds ll, mm and has a chat template."""
    return {"root": tmp_path,
            "base": write_model(tmp_path / "base", BASE, 0),
            "ft1": write_model(tmp_path / "ft1", BASE + ["kk", "ll"], 1),
            "ft2": write_model(tmp_path / "ft2", BASE + ["ll", "mm"], 2, template="{{ 'ft2 template' }}{# x #}")}


def merge(capsys, root: Path, doc: dict, out: Path, *extra) -> tuple[int, str]:
    cfg = root / f"{out.name}.yml"
    cfg.write_text(yaml.safe_dump(doc))
    rc = main(["merge", str(cfg), str(out), "--device", "cpu", *extra])
    return rc, capsys.readouterr().err


def ta_doc(base, models, weights=(0.7, 0.5), **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)],
            "out_dtype": "float32", **extra}


def test_union_numbers_new_tokens_in_model_order_and_realigns_rows(family, capsys):
    f = family
    rc, err = merge(capsys, f["root"], ta_doc(f["base"], [f["ft1"], f["ft2"]], tokenizer_source="union"),
                    f["root"] / "out")
    assert rc == 0, err
    out = f["root"] / "out"
    # By hand: the base's 14 ids, then ft1's kk (14), ll (15), then ft2's mm (16).
    want = {t: i for i, t in enumerate(BASE + ["kk", "ll", "mm"])}
    assert vocab_of(out) == want
    doc = json.loads((out / "tokenizer.json").read_text())
    assert [(e["id"], e["content"], e["special"], e["normalized"]) for e in doc["added_tokens"][3:]] == [
        (14, "kk", False, True), (15, "ll", False, True), (16, "mm", False, True)]
    assert doc["model"]["vocab"] == {t: i for i, t in enumerate(BASE)}   # the model's own vocabulary is kept
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 17
    # The same merge of checkpoints realigned by hand gives the same bytes.
    aligned = realign_by_hand([f["base"], f["ft1"], f["ft2"]], want, 17, 0, f["root"])
    rc, err = merge(capsys, f["root"], ta_doc(aligned[0], aligned[1:]), f["root"] / "by-hand")
    assert rc == 0, err
    got, ref = load(out), load(f["root"] / "by-hand")
    assert got.keys() == ref.keys()
    for name in got:
        assert torch.equal(got[name], ref[name]), name
    # kk is only ft1's: every model's kk row is ft1's, so the merge keeps it exactly.
    ft1 = load(f["ft1"])
    assert torch.equal(got["model.embed_tokens.weight"][14], ft1["model.embed_tokens.weight"][14].float())


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.5, "weight": 1.0, "trim_scope": "global"}),
    ("dare_ties", {"density": 0.6, "weight": 1.0, "seed": 3}),
    ("slerp", {"t": 0.3}),
])
def test_every_method_sees_the_realigned_rows(family, capsys, method, params):
    f = family
    models = [f["ft1"]] if method == "slerp" else [f["ft1"], f["ft2"]]
    doc = {"merge_method": method, "base_model": str(f["base"]), "out_dtype": "float32",
           "models": [{"model": str(m)} for m in models], "parameters": dict(params),
           "tokenizer_source": "union", "lines": {"alpha": 0.5, "beta": 0.5}}
    if method == "slerp":
        del doc["lines"]
    rc, err = merge(capsys, f["root"], doc, f["root"] / "out")
    assert rc == 0, err
    extra = ["kk", "ll"] + ([] if method == "slerp" else ["mm"])
    want = {t: i for i, t in enumerate(BASE + extra)}
    assert vocab_of(f["root"] / "out") == want
    aligned = realign_by_hand([f["base"], *models], want, len(want), 0, f["root"])
    plain = {k: v for k, v in doc.items() if k != "tokenizer_source"}
    plain["base_model"] = str(aligned[0])
    plain["models"] = [{"model": str(m)} for m in aligned[1:]]
    rc, err = merge(capsys, f["root"], plain, f["root"] / "by-hand")
    assert rc == 0, err
    got, ref = load(f["root"] / "out"), load(f["root"] / "by-hand")
    for name in got:
        assert torch.equal(got[name], ref[name]), name


def test_the_tokenizer_block_tokens_force_zero_and_padding(family, capsys):
    f = family
    tokens = {"kk": {"source": str(f["ft1"])},
              "zz": {"source": {"kind": "zero"}},
              "b": {"source": {"kind": "model_token", "model": str(f["ft1"]), "token": "c"}, "force": True}}
    doc = ta_doc(f["base"], [f["ft1"], f["ft2"]],
                 tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 5})
    rc, err = merge(capsys, f["root"], doc, f["root"] / "out")
    assert rc == 0, err
    want = {t: i for i, t in enumerate(BASE + ["kk", "ll", "mm", "zz"])}   # zz: a token of the block, added
    assert vocab_of(f["root"] / "out") == want
    got = load(f["root"] / "out")
    emb = got["model.embed_tokens.weight"]
    assert emb.shape == (20, H) and json.loads((f["root"] / "out" / "config.json").read_text())["vocab_size"] == 20
    ft1 = load(f["ft1"])["model.embed_tokens.weight"].float()
    assert torch.equal(emb[want["zz"]], torch.zeros(H))
    assert torch.equal(emb[want["b"]], ft1[BASE.index("c")])   # forced in every model: tau = 0
    # Padding rows: each model's mean of its vocabulary rows; a linear merge of means.
    assert torch.allclose(emb[18:], emb[:18].mean(0).expand(2, H), atol=1e-2)   # bf16 means; exact below
    cfg = {"kk": ("model", 1, "kk"), "zz": ("zero", None, None), "b": ("model", 1, "c")}
    tokens_cfg = {t: {"source": c, "force": t == "b"} for t, c in cfg.items()}
    aligned = realign_by_hand([f["base"], f["ft1"], f["ft2"]], want, 20, 0, f["root"], tokens_cfg)
    rc, err = merge(capsys, f["root"], ta_doc(aligned[0], aligned[1:]), f["root"] / "by-hand")
    assert rc == 0, err
    ref = load(f["root"] / "by-hand")
    for name in got:
        assert torch.equal(got[name], ref[name]), name


def test_base_source_realigns_a_model_whose_ids_differ(tmp_path, capsys):
    """tokenizer_source: base keeps the base's vocabulary; a fine-tune that numbers the same tokens
    otherwise (and has one more) is read by token, not by row."""
    base = write_model(tmp_path / "base", BASE, 0)
    shuffled = SPECIAL + ["ab"] + list("jihgfedcba") + ["extra"]
    ft = write_model(tmp_path / "ft", shuffled, 1)
    rc, err = merge(capsys, tmp_path, ta_doc(base, [ft], weights=(1.0,), tokenizer_source="base"), tmp_path / "out")
    assert rc == 0, err
    got = load(tmp_path / "out")["model.embed_tokens.weight"]
    b, m = load(base)["model.embed_tokens.weight"].float(), load(ft)["model.embed_tokens.weight"].float()
    assert got.shape == (len(BASE), H) and vocab_of(tmp_path / "out") == {t: i for i, t in enumerate(BASE)}
    for token in "abj":   # weight 1: the fine-tune's own row of that token
        assert torch.allclose(got[BASE.index(token)], b[BASE.index(token)] + (m[shuffled.index(token)]
                                                                             - b[BASE.index(token)]))
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()


def test_a_model_path_source_gives_its_vocabulary(family, capsys):
    f = family
    rc, err = merge(capsys, f["root"], ta_doc(f["base"], [f["ft1"], f["ft2"]], tokenizer_source=str(f["ft2"])),
                    f["root"] / "out")
    assert rc == 0, err
    want = vocab_of(f["ft2"])
    assert vocab_of(f["root"] / "out") == want and "kk" not in want
    aligned = realign_by_hand([f["base"], f["ft1"], f["ft2"]], want, len(want), 0, f["root"])
    rc, err = merge(capsys, f["root"], ta_doc(aligned[0], aligned[1:]), f["root"] / "by-hand")
    got, ref = load(f["root"] / "out"), load(f["root"] / "by-hand")
    for name in got:
        assert torch.equal(got[name], ref[name]), name


def test_one_vocabulary_changes_nothing(tmp_path, capsys):
    base = write_model(tmp_path / "base", BASE, 0)
    fts = [write_model(tmp_path / f"ft{i}", BASE, i) for i in (1, 2)]
    rc, err = merge(capsys, tmp_path, ta_doc(base, fts, tokenizer_source="union"), tmp_path / "out")
    assert rc == 0, err
    rc, err = merge(capsys, tmp_path, ta_doc(base, fts), tmp_path / "plain")
    assert rc == 0, err
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    a, b = load(tmp_path / "out"), load(tmp_path / "plain")
    assert all(torch.equal(a[n], b[n]) for n in a) and a.keys() == b.keys()


def test_the_base_is_stripped_of_tokens_past_its_vocab_size(tmp_path, capsys):
    """mergekit's stripped base: a tokenizer with ids past the config's vocab_size loses them."""
    tokens = BASE + ["pad0", "pad1"]
    base = write_model(tmp_path / "base", tokens, 0, rows=len(BASE))   # config vocab_size < its tokens
    ft = write_model(tmp_path / "ft", BASE, 1)
    rc, err = merge(capsys, tmp_path, ta_doc(base, [ft], weights=(1.0,), tokenizer_source="base"), tmp_path / "out")
    assert rc == 0, err
    assert vocab_of(tmp_path / "out") == {t: i for i, t in enumerate(BASE)}
    doc = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert doc["model"]["merges"] == ["a b"]


def test_chat_templates(family, capsys):
    f = family
    rc, err = merge(capsys, f["root"], ta_doc(f["base"], [f["ft1"], f["ft2"]], chat_template="auto",
                                                          tokenizer_source="union"),
                    f["root"] / "auto")
    assert rc == 0, err
    # auto: the most common template among the models; only ft2 has one.
    assert (f["root"] / "auto" / "chat_template.jinja").read_text() == "{{ 'ft2 template' }}{# x #}"
    assert json.loads((f["root"] / "auto" / "tokenizer_config.json").read_text())["chat_template"] == \
        "{{ 'ft2 template' }}{# x #}"
    rc, err = merge(capsys, f["root"], ta_doc(f["base"], [f["ft2"]], chat_template="chatml",
                                                          tokenizer_source="base"), f["root"] / "chatml")
    assert rc == 0, err
    text = (f["root"] / "chatml" / "chat_template.jinja").read_text()
    assert "<|im_start|>" in text and "add_generation_prompt" in text
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    rc, err = merge(capsys, f["root"], ta_doc(f["base"], [f["ft2"]], chat_template=literal,
                                                          tokenizer_source="base"), f["root"] / "lit")
    assert rc == 0, err
    assert (f["root"] / "lit" / "chat_template.jinja").read_text() == literal


@pytest.mark.parametrize("edit,words", [
    (lambda d, f: d.update(chat_template="llama9"), ["llama9", "chat_template", "chatml"]),
    (lambda d, f: d.update(chat_template="{x}"), ["not a Jinja chat template"]),
    (lambda d, f: d.update(tokenizer_source="union", tokenizer={"source": "union"}), ["not both"]),
    (lambda d, f: d.update(tokenizer={"source": "union", "pad_to_multiple_of": 0}), ["pad_to_multiple_of"]),
    (lambda d, f: d.update(tokenizer={"tokens": {"mm": {"source": str(f["ft1"])}}}), ["'mm'", "lacks"]),
    (lambda d, f: d.update(tokenizer={"tokens": {"x": {"source": str(f["base"] / "..")}}}), ["not among"]),
    (lambda d, f: d.update(tokenizer={"tokens": {"x": {"source": {"kind": "model_token", "model": str(f["ft1"]),
                                                                  "token": "nope"}}}}), ["'nope'"]),
    (lambda d, f: d.update(tokenizer={"tokens": {"x": {"source": {"kind": "other"}}}}), ["kind"]),
    (lambda d, f: d.update(tokenizer={"source": "union", "colour": 1}), ["colour"]),
])
def test_bad_tokenizer_options_are_refused(family, capsys, edit, words):
    f = family
    doc = ta_doc(f["base"], [f["ft1"], f["ft2"]])
    edit(doc, f)
    rc, err = merge(capsys, f["root"], doc, f["root"] / "out")
    assert rc == 2, err
    assert "Traceback" not in err and str(f["root"] / "out.yml") in err
    for w in words:
        assert w in err, (w, err)
    assert not (f["root"] / "out").exists()


def test_a_union_without_tokenizers_or_with_a_broken_one_is_refused(tmp_path, capsys):
    base = write_model(tmp_path / "base", None, 0, rows=len(BASE))
    ft = write_model(tmp_path / "ft", BASE, 1)
    rc, err = merge(capsys, tmp_path, ta_doc(base, [ft], weights=(1.0,), tokenizer_source="union"), tmp_path / "out")
    assert rc == 2 and "tokenizer.json" in err and str(base) in err
    (ft / "tokenizer.json").write_text("{not json")
    ft2 = write_model(tmp_path / "ft2", BASE, 2)
    rc, err = merge(capsys, tmp_path, ta_doc(ft, [ft2], weights=(1.0,), tokenizer_source="base"), tmp_path / "out")
    assert rc == 2 and str(ft / "tokenizer.json") in err
    assert not (tmp_path / "out").exists()


def test_conflicting_special_tokens_are_refused(tmp_path, capsys):
    base = write_model(tmp_path / "base", BASE, 0)
    plain_s = [{"id": 0, "content": "<unk>", "special": True, "normalized": False},
               {"id": 1, "content": "<s>", "special": False, "normalized": True},
               {"id": 2, "content": "</s>", "special": True, "normalized": False}]
    ft = write_model(tmp_path / "ft", None, 1, rows=len(BASE), tok_doc=tokenizer_json(BASE, plain_s))
    rc, err = merge(capsys, tmp_path, ta_doc(base, [ft], weights=(1.0,), tokenizer_source="union"), tmp_path / "out")
    assert rc == 2 and "'<s>'" in err and "special" in err and str(ft) in err
    assert not (tmp_path / "out").exists()
    rc, err = merge(capsys, tmp_path, ta_doc(base, [ft], weights=(1.0,), tokenizer_source="base"), tmp_path / "out")
    assert rc == 0, err


def test_models_without_tokenizers_copy_the_source_files(tmp_path, capsys):
    """tokenizer_source: base on models that have no tokenizer.json: nothing to realign; the
    tokenizer files are copied as they are, as before."""
    base = write_model(tmp_path / "base", None, 0, rows=len(BASE))
    (base / "tokenizer_config.json").write_text('{"from": "base"}')
    ft = write_model(tmp_path / "ft", None, 1, rows=len(BASE))
    rc, err = merge(capsys, tmp_path, ta_doc(base, [ft], weights=(1.0,), tokenizer_source="base"), tmp_path / "out")
    assert rc == 0 and "no model has a tokenizer.json" in err
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"from": "base"}'
    # Padding the embeddings needs the vocabulary: refused, as tokens: is (it was silently dropped).
    doc = ta_doc(base, [ft], weights=(1.0,))
    doc["tokenizer"] = {"source": "base", "pad_to_multiple_of": 96}
    rc, err = merge(capsys, tmp_path, doc, tmp_path / "padded")
    assert rc == 2 and f"{base} has no tokenizer.json, which pad_to_multiple_of: 96 needs" in err
    assert not (tmp_path / "padded").exists()


def test_the_triton_path_merges_realigned_rows_alike(family, capsys):
    f = family
    doc = ta_doc(f["base"], [f["ft1"], f["ft2"]], tokenizer_source="union")
    rc, err = merge(capsys, f["root"], doc, f["root"] / "cpu")
    assert rc == 0, err
    cfg = f["root"] / "i.yml"
    cfg.write_text(yaml.safe_dump(doc))
    rc = main(["merge", str(cfg), str(f["root"] / "interp"), "--device", "interpret"])
    assert rc == 0, capsys.readouterr().err
    a, b = load(f["root"] / "cpu"), load(f["root"] / "interp")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_plan_counts_the_realigned_rows(family, capsys):
    f = family
    cfg = f["root"] / "p.yml"
    cfg.write_text(yaml.safe_dump(ta_doc(f["base"], [f["ft1"], f["ft2"]], tokenizer_source="union")))
    assert main(["plan", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "realigned embedding rows" in out
    from lines_fast.config import load_yaml
    from lines_fast.cost import _realigned_bytes
    # 3 inputs x 17 rows x 8 x 2 bytes (bfloat16) for one vocabulary tensor at a time.
    assert _realigned_bytes(load_yaml(cfg)) == 3 * 17 * H * 2


def test_sliced_inputs_of_two_vocabularies_are_refused(family, capsys):
    f = family
    doc = {"merge_method": "slerp", "base_model": str(f["base"]), "parameters": {"t": 0.5},
           "tokenizer_source": "union",
           "slices": [{"sources": [{"model": str(f["base"]), "layer_range": [0, 1]},
                                   {"model": str(f["ft1"]), "layer_range": [0, 1]}]}]}
    rc, err = merge(capsys, f["root"], doc, f["root"] / "out")
    assert rc == 2 and "vocabularies differ" in err and "sliced" in err, err
    assert not (f["root"] / "out").exists()


def test_resume_refuses_a_partial_merge_made_with_another_vocabulary(tmp_path, capsys, monkeypatch):
    """--resume keeps finished shards only if the realigned rows would be the same: a tokenizer
    edited between the runs makes it another merge."""
    from lines_fast.writer import ShardedWriter

    base = write_model(tmp_path / "base", BASE, 0)
    ft1 = write_model(tmp_path / "ft1", BASE + ["kk"], 1)
    ft2 = write_model(tmp_path / "ft2", BASE + ["mm"], 2)
    doc = ta_doc(base, [ft1, ft2], tokenizer_source="union")
    out = tmp_path / "out"

    def interrupted(self, *args, **kwargs):   # Ctrl-C once every shard is written, before publishing
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ShardedWriter, "finish", interrupted)
        rc, err = merge(capsys, tmp_path, doc, out, "--max-shard-size", "1KB")
    assert rc == 130 and "--resume" in err, err
    assert (out.with_name(out.name + ".lines-fast-partial")).is_dir()
    tokenizer = json.loads((ft2 / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["nn"] = tokenizer["model"]["vocab"].pop("mm")
    (ft2 / "tokenizer.json").write_text(json.dumps(tokenizer))
    rc, err = merge(capsys, tmp_path, doc, out, "--resume", "--max-shard-size", "1KB")
    assert rc == 2 and "written for a different merge" in err, err


def test_a_forced_row_applies_even_where_every_vocabulary_is_the_same(tmp_path, capsys):
    base = write_model(tmp_path / "base", BASE, 0)
    ft = write_model(tmp_path / "ft", BASE, 1)
    doc = ta_doc(base, [ft], weights=(1.0,), tokenizer={"source": "base",
                                                          "tokens": {"a": {"source": {"kind": "zero"}, "force": True}}})
    rc, err = merge(capsys, tmp_path, doc, tmp_path / "out")
    assert rc == 0, err
    got = load(tmp_path / "out")
    assert torch.equal(got["model.embed_tokens.weight"][BASE.index("a")], torch.zeros(H))
    assert torch.equal(got["lm_head.weight"][BASE.index("b")],
                       load(ft)["lm_head.weight"][BASE.index("b")].float())   # the others: the fine-tune's


def test_a_tokenizer_folder_without_weights_is_a_source(family, capsys):
    f = family
    only = f["root"] / "tokenizer-only"
    only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (only / name).write_bytes((f["ft2"] / name).read_bytes())
    rc, err = merge(capsys, f["root"], ta_doc(f["base"], [f["ft1"], f["ft2"]], tokenizer_source=str(only)),
                    f["root"] / "out")
    assert rc == 0, err
    assert vocab_of(f["root"] / "out") == vocab_of(f["ft2"])


@pytest.mark.parametrize("spoil,words", [
    (lambda d: (d / "tokenizer.json").unlink() or (d / "tokenizer.model").write_bytes(b"spm"),
     ["tokenizer.model", "no tokenizer.json"]),
    (lambda d: (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"})),
     ["'<pad>'", "lacks"]),
    (lambda d: (d / "tokenizer.json").write_text(json.dumps(
        {**json.loads((d / "tokenizer.json").read_text()), "added_tokens": [{"id": 0}]})), ["not a tokenizer.json"]),
])
def test_fine_tune_tokenizers_lines_fast_cannot_read_as_mergekit_would_are_refused(family, capsys, spoil, words):
    f = family
    spoil(f["ft2"])
    rc, err = merge(capsys, f["root"], ta_doc(f["base"], [f["ft1"], f["ft2"]], tokenizer_source="union"),
                    f["root"] / "out")
    assert rc == 2 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not (f["root"] / "out").exists()


def test_a_vocabulary_change_without_known_embedding_names_is_refused(tmp_path, capsys):
    base = write_model(tmp_path / "base", BASE, 0)
    ft = write_model(tmp_path / "ft", SPECIAL + ["ab"] + list("jihgfedcba"), 1)   # the same tokens, other ids
    for folder in (base, ft):
        tensors = load(folder)
        renamed = {n.replace("model.embed_tokens", "backbone.embeddings").replace("lm_head", "head.proj"): t
                   for n, t in tensors.items()}
        write_safetensors(folder / "model.safetensors", renamed, {"format": "pt"})
    rc, err = merge(capsys, tmp_path, ta_doc(base, [ft], weights=(1.0,), tokenizer_source="base"), tmp_path / "out")
    assert rc == 2 and "embedding or output head" in err, err


def test_vocabularies_that_differ_without_a_tokenizer_source_are_warned_about(tmp_path, capsys):
    """Rows are then merged by id, as mergekit does: the log says which ids mean other tokens."""
    base = write_model(tmp_path / "base", BASE, 0)
    same = write_model(tmp_path / "same", BASE, 1)
    swapped = write_model(tmp_path / "swapped", BASE[:3] + [BASE[4], BASE[3]] + BASE[5:], 2)
    rc, err = merge(capsys, tmp_path, ta_doc(base, [same], weights=(1.0,)), tmp_path / "a")
    assert rc == 0 and "warning" not in err, err
    rc, err = merge(capsys, tmp_path, ta_doc(base, [same, swapped]), tmp_path / "b")
    assert rc == 0, err
    assert (f"warning: the tokenizer of models[1] ({swapped}) gives 2 token id(s) to other tokens than base model "
            f"{base}'s (3: {BASE[3]!r} vs {BASE[4]!r}, 4: {BASE[4]!r} vs {BASE[3]!r})") in err
    assert "tokenizer_source: union" in err and err.count("warning") == 1


def test_a_base_without_a_tokenizer_names_what_needs_one(tmp_path, capsys):
    base = write_model(tmp_path / "base", None, 0, rows=len(BASE))
    ft = write_model(tmp_path / "ft", BASE, 1)
    for block, needs in (({"source": "base"}, "tokenizer_source: base needs"),
                         ({"source": "union"}, "tokenizer_source: union needs"),
                         ({"source": "base", "pad_to_multiple_of": 8}, "tokenizer_source: base needs")):
        doc = ta_doc(base, [ft], weights=(1.0,))
        doc["tokenizer"] = block
        rc, err = merge(capsys, tmp_path, doc, tmp_path / "out")
        assert rc == 2 and f"{base} has no tokenizer.json, which {needs}" in err and "None" not in err, err
