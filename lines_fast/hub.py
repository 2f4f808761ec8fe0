"""Hugging Face Hub model names as models: `org/name` or `org/name@revision`, as mergekit takes them.

A model reference that is not an existing local path and looks like a Hub repo id is fetched
with huggingface_hub (the optional extra: `pip install "lines_fast[hub]"`) into the standard
Hugging Face cache, which honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and the token from
HF_TOKEN or `huggingface-cli login`. Only what a merge reads is fetched: the safetensors weights
and their index, config and generation config, tokenizer files (and the PyTorch .bin weights only
for a repo without safetensors). The path returned is the cached snapshot, a local directory.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from .errors import MergeInputError

_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
SAFETENSORS_FILES = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                     "tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "added_tokens.json",
                     "chat_template*", "*.model", "adapter_config.json"]
BIN_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.bin"]


def lora_syntax(reference: str) -> str:
    """Why mergekit's `model+lora` reference is refused, and what to do instead."""
    return (f"{reference!r} is mergekit's model+LoRA syntax, which lines_fast does not read; list the adapter "
            "as a model of its own (a PEFT adapter directory is merged on top of the base)")


def parse(reference: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `reference` reads as a Hub name, else None."""
    if "+" in reference:
        return None
    m = _REPO_ID.match(reference)
    return (m.group("repo"), m.group("revision")) if m else None


_REMOTE_PREFIX = "hf-headers:"   # Path() would fold a "//"
_headers_only = False


@contextlib.contextmanager
def headers_only():
    """Within it, a Hub name that is not cached resolves to a placeholder path instead of being
    downloaded: `lines-fast plan` then reads its tensors' names, shapes and dtypes from the
    safetensors headers on the Hub (HTTP range reads: header_tensors), not the weights."""
    global _headers_only
    previous, _headers_only = _headers_only, True
    try:
        yield
    finally:
        _headers_only = previous


def remote(path: Path) -> tuple[str, str | None] | None:
    """(repo, revision) of a headers_only placeholder path, else None."""
    text = str(path)
    if not text.startswith(_REMOTE_PREFIX):
        return None
    repo, _, revision = text[len(_REMOTE_PREFIX):].partition("@")
    return repo, revision or None


def header_tensors(path: Path, label: str) -> dict:
    """A placeholder path's tensors (checkpoint.TensorInfo by name) from the Hub's safetensors
    headers: only the first bytes of each shard are fetched."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    from .checkpoint import DTYPES, TensorInfo

    repo, revision = remote(path)
    try:
        meta = huggingface_hub.get_safetensors_metadata(repo, revision=revision)
    except (hub_errors.HfHubHTTPError, hub_errors.NotASafetensorsRepoError, OSError) as err:
        raise MergeInputError(f"{label}: reading the safetensors headers of {repo} from the Hub failed "
                              f"({str(err).splitlines()[0]}).") from None
    tensors = {}
    for file, info in sorted(meta.files_metadata.items()):
        for name, t in sorted(info.tensors.items(), key=lambda item: item[1].data_offsets):
            if meta.weight_map and meta.weight_map.get(name, file) != file:
                continue
            begin, end = t.data_offsets
            tensors[name] = TensorInfo(name, DTYPES[t.dtype], tuple(t.shape), Path(file), begin, end - begin)
    return tensors


def resolve(reference: str, where: str) -> Path:
    """The local directory of model reference `reference` (config key `where`, for messages): the
    path itself when it exists or is not a Hub name, else the Hub snapshot, fetched if needed
    (within headers_only(), a cached snapshot or a placeholder for header_tensors)."""
    path = Path(reference).expanduser()
    if "+" in reference and not path.exists():
        raise MergeInputError(f"{where}: {lora_syntax(reference)}.")
    parsed = parse(reference)
    if path.exists() or parsed is None:
        return path
    repo, revision = parsed
    # Said in every refusal below: a mistyped or relative local path reads as a Hub name too.
    local = f" ({os.path.abspath(path)} does not exist: relative paths are read from the current directory)"
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise MergeInputError(f"{where}: {reference!r} is not a local path{local}, and reading it from the Hugging Face Hub "
                              "needs huggingface_hub: pip install \"lines_fast[hub]\" (or give a local path)."
                              ) from None
    name = f"{repo}@{revision}" if revision else repo
    if _headers_only:
        try:
            return Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=SAFETENSORS_FILES,
                                                          local_files_only=True))
        except hub_errors.LocalEntryNotFoundError:
            return Path(_REMOTE_PREFIX + name)
    try:
        folder = Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=SAFETENSORS_FILES))
        if not any(folder.glob("*.safetensors")):
            folder = Path(huggingface_hub.snapshot_download(repo, revision=revision,
                                                            allow_patterns=SAFETENSORS_FILES + BIN_FILES))
    except hub_errors.RevisionNotFoundError:
        raise MergeInputError(f"{where}: {name}: the Hub repo has no revision {revision!r} (a branch, tag or commit "
                              "hash). Check the name after '@'.") from None
    except (hub_errors.GatedRepoError, hub_errors.RepositoryNotFoundError) as err:
        gated = isinstance(err, hub_errors.GatedRepoError)
        raise MergeInputError(f"{where}: {name}: " + ("the repo is gated: accept its terms on the Hub and log in "
                              "(huggingface-cli login, or HF_TOKEN)." if gated else "no such model on the Hub, or it "
                              "is private (log in with huggingface-cli login, or set HF_TOKEN), or a local path "
                              f"that does not exist{local}.")) from None
    except hub_errors.LocalEntryNotFoundError:
        raise MergeInputError(f"{where}: {name} is not a local path{local} and is not in the Hugging Face cache "
                              f"({huggingface_hub.constants.HF_HUB_CACHE}), and the Hub cannot be reached (HF_HUB_OFFLINE "
                              "is set, or no network). Download it first (huggingface-cli download "
                              f"{repo}{' --revision ' + revision if revision else ''}) or give a local path.") from None
    except (hub_errors.HfHubHTTPError, OSError) as err:
        raise MergeInputError(f"{where}: {name}: fetching it from the Hub failed ({str(err).splitlines()[0]}). "
                              "Check the network and the name, or give a local path.") from None
    return folder
