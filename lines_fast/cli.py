"""`lines-fast`: merge, demo, layers, plan, bench.

Bad input (anything MergeInputError covers) prints one paragraph and exits with status 2,
without a traceback; an interrupted merge says where its partial work is and how to resume.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import EXIT_BAD_INPUT, MergeInputError

_MERGE_EPILOG = """\
examples:
  lines-fast merge ties.yml merged/                    # a mergekit YAML config
  lines-fast merge --method ties --base base/ --model ft1/ --model ft2/ \\
      --density 0.2 --lines-beta 1.0 -o merged/       # TIES + LiNeS (alpha auto)
  lines-fast merge --method wise_ft --base base/ --model ft/ --lambda 0.5 -o wise/

{methods}

A parameter the method does not take is an error. With a CONFIG, the method parameter,
LiNeS and output options override its values; the models, the method and their weights
come from the config only. Output: HF layout (model.safetensors, or shards +
model.safetensors.index.json; config and tokenizer files from the base), written under
OUT_DIR.lines-fast-partial and renamed only when complete; --resume continues an
interrupted merge.
"""


def _add_merge_parser(sub) -> None:
    from . import methods

    p = sub.add_parser(
        "merge", help="merge checkpoints (main job)", epilog=_MERGE_EPILOG.format(methods=methods.help_text()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge a base and N fine-tuned checkpoints: HF directories, .safetensors or PyTorch .bin\n"
                    "files, Hugging Face Hub names (org/name[@revision], with lines_fast[hub]) or PEFT LoRA\n"
                    "adapter directories. A CONFIG is mergekit's YAML: models: or slices: (layer ranges;\n"
                    "passthrough for frankenmerges), per-layer parameter lists and filters, or several\n"
                    "documents (mergekit-multi), run in order.")
    p.add_argument("paths", nargs="*", metavar="CONFIG.yml OUT_DIR",
                   help="a mergekit-format YAML config and the output directory")
    p.add_argument("-o", "--out", metavar="OUT_DIR", help="output directory (instead of the positional)")
    g = p.add_argument_group("what to merge (without a CONFIG)")
    g.add_argument("--method", metavar="METHOD", help=" | ".join(methods.names()) + " (see the list below)")
    g.add_argument("--base", metavar="DIR", help="the pre-trained model θ0")
    g.add_argument("--base-weight", type=float, metavar="W",
                   help="linear only: average the base in as a model with weight W (as a mergekit YAML with "
                        "base_model and a top-level weight does); without it --base is only LiNeS's θ0")
    g.add_argument("--model", metavar="DIR", action="append", default=[],
                   help="a fine-tuned model; repeat, in order")
    g = p.add_argument_group("method parameters")
    g.add_argument("--weight", type=float, action="append", metavar="W",
                   help="model weight: once for every model, or once per --model in order (default 1)")
    g.add_argument("--density", type=float, action="append", metavar="D",
                   help=f"fraction of each task vector kept ({methods.takers('density')}): once, or once per "
                        "model (default 1: keep everything)")
    g.add_argument("--lambda", dest="lam", type=float, metavar="L",
                   help=f"scale of the merged task vector (wise_ft: the mixing coefficient); default "
                        f"{methods.defaults_text('lambda')}")
    g.add_argument("--trim-scope", choices=["tensor", "global"],
                   help=f"{methods.takers('trim_scope')}: trim per tensor (mergekit, the default) or over the whole "
                        "model (the TIES paper)")
    g.add_argument("--normalize", dest="normalize", action="store_true", default=None,
                   help=f"divide by the sum of the (agreeing) weights; defaults as mergekit: "
                        f"{methods.defaults_text('normalize')}")
    g.add_argument("--no-normalize", dest="normalize", action="store_false")
    g.add_argument("--rescale", choices=["true", "false", "inverse"],
                   help="kept values of a sparsified task vector: true matches each tensor's L1 norm (mergekit), "
                        "inverse divides by the keep probability (the DARE paper), false leaves them; default "
                        f"{methods.defaults_text('rescale')}")
    g.add_argument("--seed", type=int,
                   help=f"the drop masks' seed ({methods.takers('seed')}; default 0): masks are a pure function "
                        "of (seed, model, tensor, element), the same on CPU and GPU")
    g.add_argument("--param", action="append", metavar="NAME=VALUE", default=[],
                   help="any parameter of the method, as in the YAML's top-level parameters (one value for "
                        "every model): --param t=0.3 (slerp), --param gamma=0.01 (breadcrumbs), "
                        "--param filter_wise=true (model_stock); repeatable. The method list below names them")
    g.add_argument("--exclude", action="append", metavar="REGEX",
                   help="copy tensors whose name matches from the base (without a base: from the first model) "
                        "instead of merging; repeatable")
    g = p.add_argument_group("LiNeS: update of block l of L scaled by alpha + beta*l/(L-1)")
    g.add_argument("--lines-alpha", metavar="A|auto",
                   help="alpha, or 'auto' (default): (1/N)·‖Σ τ_i‖₁/‖τ_MTL‖₁, the official rule")
    g.add_argument("--lines-beta", type=float, metavar="B", help="beta; giving it turns LiNeS on")
    g.add_argument("--lines-outside", choices=["alpha", "last"],
                   help="scale of tensors outside every block: alpha (official) or alpha+beta")
    g.add_argument("--layer-pattern", metavar="REGEX",
                   help="regex with one integer group giving the block index (see `lines-fast layers`)")
    g = p.add_argument_group("output and execution")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "interpret"],
                   help="auto: cuda if a GPU is visible, else cpu; interpret: the Triton kernels on CPU (slow, for checking)")
    g.add_argument("--out-dtype", choices=["bfloat16", "float16", "float32", "bf16", "fp16", "fp32"],
                   help="output dtype (default: the base's); math is always float32")
    g.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="e.g. 5GB, 2GiB, 500MB (default 5GB)")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="CPU: merge with N processes of this machine, each with its share of whole output shards "
                        "and cores/N threads (default 1). Faster than one process's threads where there are "
                        "several shards per worker (see --max-shard-size); same bytes as one process. For "
                        "several GPUs or nodes use torchrun")
    g.add_argument("--tokenizer-source", metavar="SOURCE",
                   help="the output's vocabulary, as the YAML's tokenizer_source: union (every model's tokens), "
                        "base, or a model DIR; embedding and lm_head rows follow it (default: none, the base's "
                        "tokenizer files copied as they are)")
    g.add_argument("--missing", choices=["error", "copy-base"],
                   help="a tensor the base has and a model lacks: error (default) or use the base's value")
    g.add_argument("--allow-nonfinite", action="store_true", default=None,
                   help="merge tensors containing NaN/Inf instead of refusing")
    g.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists (only once the new one is complete)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted merge from its verified shards (same inputs and options), "
                        "reusing its α and global thresholds instead of repeating the statistics passes")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("-q", "--quiet", action="store_true", help="print only the final summary")
    g.add_argument("--intermediate-dir", metavar="DIR",
                   help="a multi-document CONFIG (mergekit-multi): where the named merges go "
                        "(default OUT_DIR-intermediate; OUT_DIR itself when every merge is named)")


def _lines_from_args(args, base_lines):
    from .config import parse_lines
    from .spec import is_auto

    if args.lines_alpha is None and args.lines_beta is None and args.lines_outside is None \
            and args.layer_pattern is None:
        return None
    block = {}
    if base_lines is not None:
        block = {"alpha": base_lines.alpha, "beta": base_lines.beta, "outside": base_lines.outside,
                 "layer_pattern": base_lines.layer_pattern}
    if args.lines_alpha is not None:
        block["alpha"] = "auto" if is_auto(args.lines_alpha) else _float(args.lines_alpha, "--lines-alpha")
    if args.lines_beta is not None:
        block["beta"] = args.lines_beta
    if args.lines_outside is not None:
        block["outside"] = args.lines_outside
    if args.layer_pattern is not None:
        block["layer_pattern"] = args.layer_pattern
    if "beta" not in block:
        raise MergeInputError("LiNeS options were given without --lines-beta; LiNeS needs beta "
                              "(the paper tunes it: 0.1-1.5 for ties, 0.1-1.0 for task arithmetic).")
    return parse_lines(block, "command line")


def _rescale(text: str | None):
    """--rescale's text as the config value: true, false or "inverse"."""
    return None if text is None else {"true": True, "false": False}.get(text, text)


def _scalar(text: str):
    """An option's value: an int or a float where it reads as one (1e-3 too, which YAML 1.1 reads
    as a string), else a YAML scalar (true, inverse)."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _params_from_args(args) -> dict:
    """--param NAME=VALUE pairs; VALUE is read as a YAML scalar (0.3, true, inverse)."""
    found = {}
    for item in args.param:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise MergeInputError(f"--param {item!r}: expected NAME=VALUE, e.g. --param t=0.3.")
        if name in found:
            raise MergeInputError(f"--param {name} is given twice; give it once.")
        own = _OWN_OPTIONS.get(name)
        if own is not None and getattr(args, own[1]) is not None:
            raise MergeInputError(f"--param {name}={text} and {own[0]} both set {name}; give it once.")
        found[name] = _scalar(text)
    return found


# Parameters that have an option of their own: (the option, its argparse dest).
_OWN_OPTIONS = {"lambda": ("--lambda", "lam"), "trim_scope": ("--trim-scope", "trim_scope"), "seed": ("--seed", "seed"),
                "normalize": ("--normalize", "normalize"), "rescale": ("--rescale", "rescale"),
                "weight": ("--weight", "weight"), "density": ("--density", "density")}


def _float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise MergeInputError(f"{flag} must be a number or 'auto', got {text!r}.") from None


def _config_from_args(args):
    from .config import MergeConfig, load_yaml, parse_dtype, validate, with_overrides

    paths = list(args.paths)
    out = args.out
    config_path = None
    if len(paths) == 2:
        config_path, out = paths
        if args.out:
            raise MergeInputError("give OUT_DIR once: either as the second argument or with -o.")
    elif len(paths) == 1:
        if out:
            config_path = paths[0]
        elif args.method:
            out = paths[0]
        else:
            raise MergeInputError(f"one argument given ({paths[0]}): expected CONFIG.yml OUT_DIR, "
                                  "or --method/--base/--model with -o OUT_DIR.")
    elif len(paths) > 2:
        raise MergeInputError(f"too many arguments: {' '.join(paths)}; expected CONFIG.yml OUT_DIR.")
    if out is None:
        raise MergeInputError("no output directory: give OUT_DIR (or -o OUT_DIR).")
    out_dtype = parse_dtype(args.out_dtype, "command line", "--out-dtype") if args.out_dtype else None
    if config_path is not None:
        if args.method or args.base or args.model or args.weight or args.density and len(args.density) > 1:
            raise MergeInputError(f"{config_path}: --method/--base/--model/--weight come from the config; "
                                  "give them either in the YAML or on the command line, not both.")
        config = load_yaml(Path(config_path))
        lines = _lines_from_args(args, config.lines)
        if args.base_weight is not None:
            raise MergeInputError(f"{config_path}: --base-weight comes from the config (a top-level weight with "
                                  "base_model averages the base into a linear merge).")
        config = with_overrides(
            config, lam=args.lam, trim_scope=args.trim_scope, seed=args.seed, normalize=args.normalize,
            rescale=_rescale(args.rescale), lines=lines, out_dtype=out_dtype, missing=args.missing,
            allow_nonfinite=args.allow_nonfinite,
            exclude=(config.exclude + _excludes(args)) if args.exclude else None,
            densities=list(args.density) if args.density else None, params=_params_from_args(args),
            tokenizer=_tokenizer_from_args(args))
        return config, Path(out)
    if not args.method:
        raise MergeInputError("no CONFIG.yml and no --method: give a config file, or --method, --base and "
                              "--model (repeatable). See `lines-fast merge --help`.")
    params = {name: value for name, value in (
        ("lambda", args.lam), ("trim_scope", args.trim_scope), ("seed", args.seed), ("normalize", args.normalize),
        ("rescale", _rescale(args.rescale))) if value is not None}
    params.update(_params_from_args(args))
    model_params = {name: list(values) for name, values in (("weight", args.weight), ("density", args.density))
                    if values}
    from .hub import resolve as model_path   # a local path, or a Hub name (org/name[@revision])

    config = MergeConfig(
        method=args.method, models=[model_path(m, "--model") for m in args.model],
        base=model_path(args.base, "--base") if args.base else None, params=params, model_params=model_params,
        base_weight=args.base_weight, lines=_lines_from_args(args, None),
        out_dtype=out_dtype, exclude=_excludes(args),
        tokenizer=_tokenizer_from_args(args),
        missing=args.missing or "error", allow_nonfinite=bool(args.allow_nonfinite))
    return validate(config), Path(out)


def _tokenizer_from_args(args):
    """--tokenizer-source as the YAML's tokenizer_source (a model given as a path or a Hub name)."""
    if not args.tokenizer_source:
        return None
    from .config import parse_tokenizer
    return parse_tokenizer({"tokenizer_source": args.tokenizer_source}, "--tokenizer-source")


def _multi_config(args):
    """(CONFIG, its documents, OUT_DIR) when the config file holds several merges, else None."""
    from .multi import documents

    paths = list(args.paths)
    if len(paths) == 2 and not args.out:
        config_path, out = paths
    elif len(paths) == 1 and args.out:
        config_path, out = paths[0], args.out
    else:
        return None
    if not Path(config_path).is_file():
        return None
    docs = documents(Path(config_path))
    if len(docs) < 2:
        return None
    per_merge = [flag for flag, value in (
        ("--method", args.method), ("--base", args.base), ("--model", args.model), ("--weight", args.weight),
        ("--density", args.density), ("--lambda", args.lam), ("--trim-scope", args.trim_scope), ("--seed", args.seed),
        ("--normalize", args.normalize), ("--rescale", args.rescale), ("--lines-alpha", args.lines_alpha),
        ("--lines-beta", args.lines_beta), ("--param", args.param), ("--out-dtype", args.out_dtype),
        ("--exclude", args.exclude), ("--tokenizer-source", args.tokenizer_source)) if value]
    if per_merge:
        raise MergeInputError(f"{config_path}: a multi-document config ({len(docs)} merges); {', '.join(per_merge)} "
                              "would apply to one merge: give them in its document instead.")
    return Path(config_path), docs, Path(out)


def _excludes(args) -> list[str]:
    """--exclude's regexes, each checked here so that a bad one is blamed on the option, not a config."""
    import re

    for pattern in args.exclude or []:
        try:
            re.compile(pattern)
        except re.error as err:
            raise MergeInputError(f"--exclude {pattern!r} is not a valid regex ({err}).") from None
    return list(args.exclude or [])


def _cmd_merge(args) -> int:
    from .engine import Engine

    log = (lambda message: None) if args.quiet else None
    progress = False if args.no_progress else None
    multi = _multi_config(args)
    if multi is not None:
        from . import multi as multimerge

        path, docs, out = multi
        steps = multimerge.plan(path, docs, out, Path(args.intermediate_dir) if args.intermediate_dir else None)
        say = log or (lambda message: print(message, file=sys.stderr, flush=True))
        results = multimerge.run(path, steps, resume=args.resume, log=say, merge_one=lambda config, where: Engine(
            config, where, device=args.device, max_shard_size=args.max_shard_size, force=args.force,
            resume=args.resume, progress=progress, log=log).run())
        from .distributed import current_world

        for result in results if current_world().is_root else []:
            print(result.summary())
        return 0
    if args.intermediate_dir:
        raise MergeInputError("--intermediate-dir is for a multi-document CONFIG (several merges); this one merge "
                              "writes only OUT_DIR.")
    config, out = _config_from_args(args)
    engine = Engine(config, out, device=args.device, max_shard_size=args.max_shard_size, force=args.force,
                    resume=args.resume, progress=progress, log=log)
    try:
        result = engine.run()
    except KeyboardInterrupt:
        print(f"lines-fast: interrupted. Finished shards are kept in {out}.lines-fast-partial (not a usable "
              "checkpoint); rerun the same command with --resume to continue.", file=sys.stderr)
        return 130
    if engine.world.is_root:
        print(result.summary())
    return 0


def _cmd_layers(args) -> int:
    from .checkpoint import Checkpoint
    from .layers import format_layer_table, layer_table

    if (args.alpha is None) != (args.beta is None):
        raise MergeInputError("give both --alpha and --beta to see LiNeS scales (or neither for the layer map).")
    with Checkpoint.open(Path(args.model)) as ckpt:
        names = [n for n, info in ckpt.tensors.items() if info.is_float]
    rows = layer_table(names, args.alpha, args.beta, args.outside, args.layer_pattern)
    print(format_layer_table(rows, outside=args.outside))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(recipe=args.recipe, device=args.device, keep=args.keep)


def _cmd_plan(args) -> int:
    from .cost import plan_command

    return plan_command(args)


def _cmd_generate(args) -> int:
    import time

    from .cost import count_text
    from .synth import check_request, checkpoint_bytes, generate, param_count, recipe
    from .engine import human_bytes
    from .writer import parse_size

    shape = recipe(args.recipe, layers=args.layers)
    check_request(args.models, args.config)
    size = checkpoint_bytes(shape, args.dtype) * (args.models + 1)
    print(f"writing {shape.name}: base + {args.models} fine-tune(s), {count_text(param_count(shape))} parameters "
          f"each, {args.dtype}, {human_bytes(size)} in all -> {args.out}")
    t0 = time.perf_counter()
    family = generate(shape, args.out, n_finetunes=args.models, dtype=args.dtype, seed=args.seed,
                      max_shard_size=parse_size(args.max_shard_size) if args.max_shard_size else None,
                      yaml_method=args.config)
    print(f"done in {time.perf_counter() - t0:.1f} s: base {family.base}, fine-tunes "
          + ", ".join(str(p) for p in family.finetunes)
          + (f"; config {args.out}/{args.config}.yaml" if args.config else ""))
    return 0


def _cmd_bench(args) -> int:
    from .benchmark import bench_command

    return bench_command(args)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (and where to read more) instead of the whole
    usage block first; exit status 2 as before."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import methods

    parser = _Parser(
        prog="lines-fast",
        description="Fast, reference-exact model merging of Hugging Face checkpoints (sharded safetensors, "
                    "PyTorch .bin, PEFT LoRA adapters), from mergekit's YAML configs. Methods: "
                    + ", ".join(methods.names()) + "; LiNeS on top of any of them.",
        epilog="Start with `lines-fast demo`. Each command has its own --help.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lines_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_merge_parser(sub)

    p = sub.add_parser("demo", help="merge a built-in example (TIES + LiNeS) and check it against the reference",
                       description="Builds a small Llama-shaped base and three fine-tunes in a temporary "
                                   "directory, merges them with TIES + LiNeS on the best backend here, and "
                                   "checks the result against the pure-PyTorch reference.")
    p.add_argument("--recipe", default="tiny", help="shape recipe: tiny (default), llama-336m, llama-1b")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "interpret"],
                   help="auto (default): cuda if a GPU is visible, else cpu; interpret: the Triton kernels on the CPU")
    p.add_argument("--keep", metavar="DIR", help="keep the example checkpoints and the merge in DIR")

    p = sub.add_parser("layers", help="show how LiNeS sees a checkpoint: tensor -> stack, block, L, scale",
                       description="Reads only the headers of MODEL (a directory or .safetensors file) and "
                                   "prints each float tensor's residual stack, block index, stack depth L and, "
                                   "with --alpha/--beta, its LiNeS scale alpha + beta*l/(L-1).")
    p.add_argument("model", metavar="MODEL", help="a checkpoint directory or .safetensors file")
    p.add_argument("--alpha", type=float, help="LiNeS alpha, to show each tensor's scale (with --beta)")
    p.add_argument("--beta", type=float, help="LiNeS beta, to show each tensor's scale (with --alpha)")
    p.add_argument("--outside", choices=["alpha", "last"], default="alpha",
                   help="scale of tensors outside every block: alpha (default) or alpha+beta")
    p.add_argument("--layer-pattern", metavar="REGEX",
                   help="regex with one integer group giving the block index (default: the usual HF names)")

    p = sub.add_parser("plan", help="dry run: passes, bytes, memory and predicted time of a merge",
                       description="Prices a merge without running it: from a CONFIG (reads headers only) or "
                                   "from a shape recipe (no data at all), e.g. "
                                   "`lines-fast plan --recipe llama3-70b --method ties --models 3`.")
    p.add_argument("config", nargs="?", metavar="CONFIG.yml")
    g = p.add_argument_group("a merge without a config (with --recipe)")
    g.add_argument("--recipe", help="the checkpoints' shapes: tiny, llama-336m, llama-1b, llama3-70b")
    g.add_argument("--method", metavar="METHOD", help=" | ".join(methods.names()) + " (default ties)")
    g.add_argument("--models", type=int,
                   help="number of fine-tuned models (default: as many as the method takes, up to 3)")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="the checkpoints' dtype (default bfloat16)")
    g.add_argument("--trim-scope", choices=["tensor", "global"],
                   help="ties: thresholds per tensor (default) or over the whole model (one more pass)")
    g.add_argument("--lines-alpha", metavar="A|auto",
                   help="price LiNeS too: a given alpha, or auto (its L1 norms take one more pass); beta "
                        "changes no cost, so plan takes none (merge needs --lines-beta)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="the backend to price (default: cuda if a GPU is visible, else cpu)")
    p.add_argument("--read-gbps", type=float, default=None, help="storage read bandwidth, GB/s")
    p.add_argument("--pcie-gbps", type=float, default=None, help="host-to-device bandwidth, GB/s")
    p.add_argument("--hbm-gbps", type=float, default=None, help="GPU memory bandwidth, GB/s")
    p.add_argument("--cpu-gbps", type=float, default=None, help="CPU backend throughput per input GB, GB/s")
    p.add_argument("--world-size", "--workers", dest="world_size", type=int, default=1, metavar="N",
                   help="price a run over N ranks (torchrun, or merge --workers N): each rank's shards, bytes "
                        "and time")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="the merge's --max-shard-size (whole shards are what ranks share; default 5GB)")

    p = sub.add_parser("generate", help="write a synthetic base + fine-tunes from a shape recipe (for tests and benchmarks)",
                       description="Writes OUT/base and OUT/ft1..ftN in Hugging Face layout: realistic fine-tunes "
                                   "(depth-dependent deltas, ~30% exact zeros, quantized by the dtype). Recipes: "
                                   "tiny, llama-336m, llama-1b, llama3-70b (exact Llama-3-70B names and shapes; "
                                   "--layers K writes its first K layers).")
    p.add_argument("recipe", help="tiny, llama-336m, llama-1b, llama3-70b")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--layers", type=int, help="keep only the first K layers (exact names and widths)")
    p.add_argument("--models", type=int, default=3, help="number of fine-tuned models (default 3)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", metavar="SIZE", help="shard each model (e.g. 5GB); default one file")
    p.add_argument("--config", metavar="METHOD", help="also write OUT/METHOD.yaml, a mergekit-format config")

    p = sub.add_parser("bench", help="benchmark end-to-end merges (vs the reference and mergekit)",
                       description="Generates a workload, runs merges end to end as separate processes and "
                                   "prints a table of seconds, GB/s and peak memory; writes JSON (and a PNG "
                                   "chart with matplotlib) under bench/results/.")
    p.add_argument("--workload", default="llama-336m",
                   help="a shape recipe to generate and merge: tiny, llama-336m (default, 2.7 GB), llama-1b")
    p.add_argument("--methods", default="ties,task_arithmetic", help="comma list of methods (default ties,task_arithmetic)")
    p.add_argument("--devices", default="cpu", help="comma list of backends: cpu (default), cuda")
    p.add_argument("--compare", default="", help="comma list: reference, mergekit")
    p.add_argument("--mergekit", metavar="PATH", help="mergekit-yaml to compare with (default: $LINES_FAST_MERGEKIT, "
                                                      "then PATH); install it in its own venv, never as our dependency")
    p.add_argument("--repeats", type=int, default=1, help="runs of each merge, tools alternating (default 1)")
    p.add_argument("--workdir", default=None, help="where the generated checkpoints go (default: a temp dir)")
    p.add_argument("--out", default="bench/results", help="directory for the JSON and PNG")
    return parser


def _steady_allocator() -> None:
    """glibc malloc: serve blocks below 64 MB from the heap and keep up to 128 MB of freed heap.
    Its default hands blocks above a moving threshold (128 KB at first) to mmap and back on free,
    so a merge's per-chunk float32 / float64 temporaries could each fault in fresh zeroed pages:
    a model_stock merge of llama-336m took 15-18 s with 3.5-4M page faults, or 8-10 s with 0.14M,
    from one run to the next; with this setting always the latter (peak RSS +10 MB)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return   # not glibc: nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 64 << 20)
    mallopt(m_trim_threshold, 128 << 20)


def _workers(args, argv: list[str]):
    """merge --workers N: this process becomes rank 0 of N local ones (lines_fast/workers.py)."""
    import contextlib

    from . import workers

    count = getattr(args, "workers", 1)
    if args.command != "merge" or count == 1:
        return contextlib.nullcontext()
    if args.device == "auto":
        args.device = "cpu"   # workers are CPU processes (one GPU per rank is torchrun's job)
    workers.check(count, args.device)
    return workers.Workers(count, argv) if workers.is_launcher(count) else contextlib.nullcontext()


class _Unbroken:
    """stdout / stderr that go quiet, instead of failing, once their reader is gone
    (`lines-fast merge ... 2>&1 | head -1`): the command goes on and finishes its work."""

    def __init__(self, stream):
        self._stream = stream

    def _gone(self) -> None:
        # What is still buffered goes nowhere, so the interpreter's flush at exit cannot fail.
        import os

        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        self._stream = open(os.devnull, "w")

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Unbroken(sys.stdout), _Unbroken(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = streams


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    if getattr(args, "device", None) == "interpret":
        # Triton's interpreter must be chosen before triton is first imported in this process.
        import os
        os.environ["TRITON_INTERPRET"] = "1"
    if args.command in ("merge", "demo"):
        _steady_allocator()
    handlers = {"merge": _cmd_merge, "demo": _cmd_demo, "layers": _cmd_layers, "plan": _cmd_plan,
                "generate": _cmd_generate, "bench": _cmd_bench}
    try:
        with _workers(args, sys.argv[1:] if argv is None else argv):
            return handlers[args.command](args)
    except MergeInputError as err:
        from .distributed import rank_label

        if not getattr(err, "shown_by_rank0", False):   # a distributed run: said once, by rank 0
            print(f"lines-fast {args.command}{rank_label()}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        from .distributed import leave_world

        leave_world()


def run() -> None:
    """The `lines-fast` command: main(), then a quick exit. After torch is imported, Python's own
    teardown (finalizing every module and object) takes 0.4-0.9 s on a small VM, work that only
    frees memory the OS takes back anyway: by then every output file is written, synced, closed
    and renamed. What a normal exit runs first still runs: the other threads joined, the atexit
    functions (temporary directories, numba's loader, multiprocessing's children), the streams
    flushed. An exception leaves the normal way, with its traceback."""
    import atexit
    import os
    import threading

    try:
        code = main()
    except KeyboardInterrupt:   # outside a merge's own handler (start-up, generate, a multi-document config)
        print("lines-fast: interrupted.", file=sys.stderr)
        code = 130
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe: nothing more to say to it
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
