"""Vocabulary union, the tokenizer: block and chat_template: the same YAML through mergekit and lines_fast.

    python bench/mergekit_tokenizer.py --mergekit /tmp/mk-venv/bin/mergekit-yaml [--out DIR]

mergekit 0.1.5 lives in its own venv (never our dependency). The inputs are tiny Llamas with
tokenizers (lines_fast/synth_vocabulary.py): a base of 14 tokens, one fine-tune adding kk and
ll, one adding ll and mm (and a chat template), one numbering the base's tokens in another
order; and three with byte-level BPE tokenizers trained by the tokenizers library (merges, other
special tokens, other ids). Every config merges with task_arithmetic in float32 (dtype: float32), where the merge
itself is exact in both tools, so any difference comes from the vocabulary.

Compared per config: the output vocabulary as a set of tokens, and the ids (mergekit numbers a
union's new tokens in hash-map order, so its ids of new tokens change from run to run: reported,
not required); every embedding and lm_head row matched by token (and the padding rows), every
other tensor, the config's vocab_size, each added token's flags, and the chat template (as text,
and rendered by jinja2 as transformers renders it: our chatml is our own text of the format).
Writes bench/results/mergekit-tokenizer-<stamp>.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lines_fast.checkpoint import Checkpoint  # noqa: E402
from lines_fast.tokenizer_files import template_of  # noqa: E402
from lines_fast.synth_vocabulary import BASE, SPECIAL, write_model  # noqa: E402

VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def load(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint.open(path) as ckpt:
        return {n: ckpt.tensor(n).clone() for n in ckpt.tensors}


def tokenizer(folder: Path) -> tuple[dict[str, int], dict[str, dict]]:
    doc = json.loads((folder / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    added = {e["content"]: {k: e[k] for k in ("special", "normalized", "lstrip", "rstrip", "single_word")}
             for e in doc["added_tokens"]}
    return {**vocab, **{e["content"]: e["id"] for e in doc["added_tokens"]}}, added


_TRAIN = """
import json, sys
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
def train(text, size, specials):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([text] * 50, trainers.BpeTrainer(vocab_size=size, special_tokens=specials,
                                                             show_progress=False))
    return json.loads(tok.to_str())
print(json.dumps([train("the quick brown fox jumps over the lazy dog merging models", 120, ["<unk>", "<s>", "</s>"]),
                  train("the quick brown cat sleeps under the warm sun lines scales layers", 140,
                        ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])]))
"""


def trained_models(root: Path, python: str) -> dict[str, Path]:
    """A base, a fine-tune of its tokenizer and one of another: byte-level BPE tokenizers trained by
    the tokenizers library (in mergekit's venv) on two texts, with merges and other special tokens."""
    a, b = json.loads(subprocess.run([python, "-c", _TRAIN], capture_output=True, text=True, check=True).stdout)

    def rows(doc):
        return max([*doc["model"]["vocab"].values(), *[e["id"] for e in doc["added_tokens"]]]) + 1
    return {"base": write_model(root / "tbase", None, 4, rows=rows(a), tok_doc=a),
            "ft1": write_model(root / "tft1", None, 5, rows=rows(a), tok_doc=a),
            "ft2": write_model(root / "tft2", None, 6, rows=rows(b), tok_doc=b)}


def configs(m: dict[str, Path], trained: dict[str, Path]) -> dict[str, dict]:
    def ta(**extra):
        return {"merge_method": "task_arithmetic", "base_model": str(m["base"]), "dtype": "float32",
                "out_dtype": "bfloat16",
                "models": [{"model": str(m["ft1"]), "parameters": {"weight": 0.7}},
                           {"model": str(m["ft2"]), "parameters": {"weight": 0.5}}], **extra}
    shuffled = ta(tokenizer_source="base")
    shuffled["models"] = [{"model": str(m["shuffled"]), "parameters": {"weight": 1.0}}]
    return {
        "union + chatml": ta(tokenizer_source="union", chat_template="chatml"),
        "tokenizer block (tokens, force, zero, padding) + auto template": ta(
            tokenizer={"source": "union", "pad_to_multiple_of": 8, "tokens": {
                "kk": {"source": str(m["ft1"])}, "zz": {"source": {"kind": "zero"}},
                "b": {"source": {"kind": "model_token", "model": str(m["ft1"]), "token": "c"}, "force": True}}},
            chat_template="auto"),
        "tokenizer_source: a model": ta(tokenizer_source=str(m["ft2"])),
        "tokenizer_source: base, ids in another order": shuffled,
        "union of trained byte-level BPE tokenizers": {
            **ta(tokenizer_source="union"), "base_model": str(trained["base"]),
            "models": [{"model": str(trained["ft1"]), "parameters": {"weight": 0.7}},
                       {"model": str(trained["ft2"]), "parameters": {"weight": 0.5}}]},
    }


_RENDER = """
import json, sys, jinja2, jinja2.sandbox
env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
print(json.dumps([env.from_string(t).render(messages=messages, add_generation_prompt=g)
                  for t in json.loads(sys.stdin.read()) for g in (False, True)]))
"""


def rendered(python: str, templates: list[str]) -> list[str]:
    """The templates rendered as transformers renders chat templates (trim_blocks, lstrip_blocks), by
    the mergekit venv's jinja2, for a four-message chat with and without the generation prompt."""
    run = subprocess.run([python, "-c", _RENDER], input=json.dumps(templates), capture_output=True, text=True,
                         check=True)
    return json.loads(run.stdout)


def compare(ours: Path, theirs: Path, python: str) -> dict:
    va, fa = tokenizer(ours)
    vb, fb = tokenizer(theirs)
    a, b = load(ours), load(theirs)
    rows_differ = other_differ = 0
    for name in a:
        if name in VOCABULARY_TENSORS:
            rows_differ += sum(not torch.equal(a[name][va[t]], b[name][vb[t]]) for t in va if t in vb)
            if a[name].shape[0] > len(va):
                rows_differ += int(not torch.equal(a[name][len(va):], b[name][len(vb):]))
        elif a[name].shape != b[name].shape or not torch.equal(a[name], b[name]):
            other_differ += 1
    template = [template_of(d) for d in (ours, theirs)]
    same_render = template[0] == template[1] or (
        None not in template and (lambda r: r[:2] == r[2:])(rendered(python, template)))
    return {
        "tokens": len(va), "same_tokens": sorted(va) == sorted(vb),
        "ids_differ": sorted(t for t in va if t in vb and va[t] != vb[t]),
        "rows_differ": rows_differ,
        "shapes": {n: [list(a[n].shape), list(b[n].shape)] for n in VOCABULARY_TENSORS},
        "other_tensors_differ": other_differ,
        "vocab_size": [json.loads((d / "config.json").read_text())["vocab_size"] for d in (ours, theirs)],
        "added_flags_differ": sorted(t for t in fa if t in fb and fa[t] != fb[t]),
        "chat_template_text_same": template[0] == template[1], "chat_template_renders_same": same_render,
        "chat_template_given": template[0] is not None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", required=True, help="mergekit-yaml of a venv with mergekit 0.1.5")
    ap.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    args = ap.parse_args(argv)
    root = Path(args.out or tempfile.mkdtemp(prefix="mk-tokenizer-"))
    models = {
        "base": write_model(root / "base", BASE, 0),
        "ft1": write_model(root / "ft1", BASE + ["kk", "ll"], 1),
        "ft2": write_model(root / "ft2", BASE + ["ll", "mm"], 2,
                           template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"),
        "shuffled": write_model(root / "shuffled", SPECIAL + ["ab"] + list("jihgfedcba") + ["extra"], 3),
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {}
    trained = trained_models(root, str(Path(args.mergekit).parent / "python"))
    for i, (name, doc) in enumerate(configs(models, trained).items()):
        cfg = root / f"c{i}.yml"
        cfg.write_text(yaml.safe_dump(doc))
        ours, theirs = root / f"ours{i}", root / f"mergekit{i}"
        subprocess.run([sys.executable, "-m", "lines_fast", "merge", str(cfg), str(ours), "--device", "cpu",
                        "--force"], check=True, capture_output=True)
        subprocess.run([args.mergekit, str(cfg), str(theirs)], check=True, capture_output=True, env=env)
        results[name] = compare(ours, theirs, str(Path(args.mergekit).parent / "python"))
        r = results[name]
        print(f"{name}: {r['tokens']} tokens, same set {r['same_tokens']}, ids differ {r['ids_differ']}, "
              f"rows differ {r['rows_differ']}, other tensors differ {r['other_tensors_differ']}, vocab_size "
              f"{r['vocab_size']}, flags differ {r['added_flags_differ']}, template text same {r['chat_template_text_same']}, renders same {r['chat_template_renders_same']}")
    mk_version = subprocess.run([str(Path(args.mergekit).parent / "python"), "-c",
                                 "import mergekit, transformers, tokenizers; print(mergekit.__version__ if "
                                 "hasattr(mergekit, '__version__') else '0.1.5', transformers.__version__, "
                                 "tokenizers.__version__)"], capture_output=True, text=True).stdout.split()
    stamp = time.strftime("%Y%m%dT%H%M", time.gmtime())
    out = Path(__file__).parent / "results" / f"mergekit-tokenizer-{stamp}.json"
    out.write_text(json.dumps({"what": "bench/mergekit_tokenizer.py", "machine": platform.node(),
                               "python": platform.python_version(), "torch": torch.__version__,
                               "mergekit_transformers_tokenizers": mk_version, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
