"""Tiny Llama checkpoints with tokenizers of chosen vocabularies: the inputs of the vocabulary
tests (tests/test_vocabulary.py) and of the comparison with mergekit (bench/mergekit_tokenizer.py).

A model is one layer, hidden size 8, bfloat16, with an embedding and an lm_head row per token,
a BPE tokenizer.json whose vocabulary is the given tokens by id (the first three are special
added tokens), a config.json with vocab_size, and a tokenizer_config.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

H, I = 8, 16
SPECIAL = ["<unk>", "<s>", "</s>"]
BASE = SPECIAL + list("abcdefghij") + ["ab"]   # ids 0..13 ("ab": the one merge, a b)


def tokenizer_json(tokens: list[str], added=None) -> dict:
    """A BPE tokenizer.json whose vocabulary is `tokens` by id; the specials are added tokens."""
    vocab = {t: i for i, t in enumerate(tokens)}
    added = added or [{"id": vocab[t], "content": t, "special": True, "normalized": False} for t in SPECIAL]
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"single_word": False, "lstrip": False, "rstrip": False, **e} for e in added],
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": ["a b"]}}


def write_model(folder: Path, tokens: list[str] | None, seed: int, rows: int | None = None,
                template: str | None = None, tok_doc: dict | None = None) -> Path:
    """A one-layer Llama whose embedding and lm_head have a row per token (or `rows`)."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    n = rows or len(tokens)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": r(n, H)}
    for p in "qkvo":
        t[f"model.layers.0.self_attn.{p}_proj.weight"] = r(H, H)
    t["model.layers.0.mlp.gate_proj.weight"] = r(I, H)
    t["model.layers.0.mlp.up_proj.weight"] = r(I, H)
    t["model.layers.0.mlp.down_proj.weight"] = r(H, I)
    t["model.layers.0.input_layernorm.weight"] = r(H)
    t["model.layers.0.post_attention_layernorm.weight"] = r(H)
    t["model.norm.weight"] = r(H)
    t["lm_head.weight"] = r(n, H)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": n,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    if tokens is not None or tok_doc is not None:
        (folder / "tokenizer.json").write_text(json.dumps(tok_doc or tokenizer_json(tokens)))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
        if template:
            cfg["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


