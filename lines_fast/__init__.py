"""lines_fast: fast, reference-exact model merging for sharded safetensors checkpoints.

    lines_fast.merge(config_or_path, out_dir, **options)   # the streaming engine
    lines_fast.merge_state_dicts(base, models, method=...)  # the pure-PyTorch reference
"""
__version__ = "0.1.0"


def merge(config_or_path, out_dir, **options):
    """Merge checkpoints as the config (a YAML path, a mergekit-style dict or a MergeConfig) says."""
    from .engine import merge as _merge

    return _merge(config_or_path, out_dir, **options)


def merge_state_dicts(base, models, method, **params):
    """The reference merge of in-memory state dicts {name: tensor}; see lines_fast.reference."""
    from .reference import merge_state_dicts as _reference

    return _reference(base, models, method, **params)


__all__ = ["__version__", "merge", "merge_state_dicts"]
