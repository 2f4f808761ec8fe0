"""The "reference" tool (`python -m lines_fast.benchmark reference CONFIG OUT`): what a user
without lines_fast would write, whole state dicts through lines_fast.reference."""
from __future__ import annotations

import json
from pathlib import Path


def _load_state_dict(model_dir: Path) -> dict:
    """All tensors of an HF directory (sharded or not), read into memory with safetensors."""
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif model_dir.is_file():
        return load_file(model_dir)
    else:
        shards = ["model.safetensors"] if (model_dir / "model.safetensors").is_file() else \
            sorted(p.name for p in model_dir.glob("*.safetensors"))
    state: dict = {}
    for shard in shards:
        state.update(load_file(model_dir / shard))
    return state


def reference_main(config_path: str, out_dir: str) -> int:
    """The "reference" tool: whole state dicts through lines_fast.reference, saved with safetensors."""
    from safetensors.torch import save_file

    from ..config import load_yaml
    from ..reference import merge_with_spec

    config = load_yaml(Path(config_path))
    base = _load_state_dict(config.base) if config.base is not None else None
    models = [_load_state_dict(p) for p in config.merge_inputs]
    merged = merge_with_spec(base, models, config.method_spec(), exclude=config.exclude,
                             out_dtype=config.out_dtype.torch if config.out_dtype else None,
                             finetuned=config.finetuned_models)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    return 0
