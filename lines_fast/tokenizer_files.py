"""The output's tokenizer files and chat template (mergekit's tokenizer_source / chat_template)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

from .errors import MergeInputError
from .vocabulary import Built

# Tokenizer files that spell a vocabulary out in another format: left out of an output whose
# vocabulary differs from its source's (they would contradict its tokenizer.json).
SLOW_TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
                        "merges.txt", "added_tokens.json")
# The files of a tokenizer, copied into the output from its source.
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "vocab", "merges", "added_tokens", "chat_template",
                      "spiece", "sentencepiece")
def chat_template(value: str, folders: list[Path], source: str) -> str | None:
    """The chat template to write: `auto` (the most common among the inputs, mergekit's choice), a
    built-in name (chatml), or the template itself; None when auto finds none."""
    if value == "auto":
        found = [t for t in (template_of(f) for f in folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        if value in BUILT_IN_TEMPLATES:
            return BUILT_IN_TEMPLATES[value]
        raise MergeInputError(f"{source}: chat_template: {value!r} is not a template lines_fast knows by name (it has "
                              f"{', '.join(sorted(BUILT_IN_TEMPLATES))} and auto; mergekit also names alpaca, exaone, "
                              "llama3 and mistral). Paste the Jinja template itself as the value.")
    if len(value) < 20 or "{" not in value:
        raise MergeInputError(f"{source}: chat_template: {value!r} is not a Jinja chat template (mergekit refuses "
                              "it too: a template has {{ }} or {% %} and at least 20 characters).")
    return value


def template_of(folder: Path) -> str | None:
    """A model's chat template: chat_template.jinja, or tokenizer_config.json's chat_template
    (its `default` entry when it lists several), stripped (mergekit compares them stripped)."""
    folder = Path(folder)
    if folder.name.endswith(".index.json"):
        folder = folder.parent
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8").strip() or None
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    t = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(t, list):
        t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
    elif isinstance(t, dict):
        t = t.get("default")
    return t.strip() or None if isinstance(t, str) else None


# ChatML, as OpenAI documents it: <|im_start|>ROLE\nCONTENT<|im_end|>\n per message.
BUILT_IN_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
               "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|im_start|>assistant\\n' }}{% endif %}"),
}


def output_files(files: list[Path], built: Built | None, template: str | None, scratch: Path,
                 log: Callable[[str], None]) -> list[Path]:
    """The tokenizer files to write: `files` (the source's), with tokenizer.json replaced by the
    built vocabulary's, the formats that would contradict it left out, tokenizer_config.json's
    added tokens updated, and the chat template written into tokenizer_config.json and
    chat_template.jinja (transformers 5 reads the file, earlier versions the config key)."""
    by_name = {f.name: f for f in files}
    if built is not None and built.tokenizer_json is not None:
        dropped = [n for n in by_name if n in SLOW_TOKENIZER_FILES]
        for n in dropped:
            del by_name[n]
        if dropped:
            log(f"the output vocabulary differs from {built.source_folder}'s: not copying {', '.join(dropped)} "
                "(tokenizer.json holds the new vocabulary)")
        out = scratch / "tokenizer.json"
        out.write_text(json.dumps(built.tokenizer_json, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        by_name["tokenizer.json"] = out
    config_file = by_name.get("tokenizer_config.json")
    if config_file is not None and (template is not None or (built is not None and built.tokenizer_json)):
        try:
            cfg = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise MergeInputError(f"{config_file}: not valid JSON ({err}); the output's tokenizer_config.json "
                                  "is made from it. Fix the file.") from None
        if built is not None and built.tokenizer_json and isinstance(cfg.get("added_tokens_decoder"), dict):
            cfg["added_tokens_decoder"] = {
                str(e["id"]): {"content": e["content"], **{k: bool(e.get(k, False)) for k in (
                    "lstrip", "normalized", "rstrip", "single_word", "special")}}
                for e in built.tokenizer_json["added_tokens"]}
        if template is not None:
            cfg["chat_template"] = template
        out = scratch / "tokenizer_config.json"
        out.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        by_name["tokenizer_config.json"] = out
    if template is not None:
        by_name.pop("chat_template.json", None)
        out = scratch / "chat_template.jinja"
        out.write_text(template, encoding="utf-8")
        by_name["chat_template.jinja"] = out
    return list(by_name.values())
