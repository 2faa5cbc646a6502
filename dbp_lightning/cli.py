"""The ``dbp-lightning`` console script.

Subcommands:
    embed            embed WebDataset shards into an embedding store (resumable)
    prune            run the pruning stages on an embedding store (YAML config + flags)
    data synthetic   write a synthetic clustered pool with planted duplicates as a store
"""

from __future__ import annotations

import logging
import sys

from jsonargparse import ActionConfigFile, ArgumentParser

from .config import PruneConfig
from .encoders import EncoderConfig


def _prune_parser() -> ArgumentParser:
    p = ArgumentParser(description="Prune a pool: semdedup -> clip_score -> dbp|ssp|random. "
                       "Writes selection.parquet, clusters.parquet, subset.npy, plots, "
                       "report.json and manifest.json into --output.")
    p.add_argument("--config", action=ActionConfigFile, help="YAML config (configs/prune/*.yaml)")
    p.add_class_arguments(PruneConfig, nested_key=None, fail_untyped=True)
    return p


def _embed_parser() -> ArgumentParser:
    p = ArgumentParser(description="Embed WebDataset shards (KEY.jpg|png|webp, KEY.txt, KEY.json) "
                       "into an embedding store with Trainer.predict; a rerun resumes.")
    p.add_argument("--config", action=ActionConfigFile, help="YAML config")
    p.add_argument("--shards", type=str, required=True, help="brace pattern, glob or directory")
    p.add_argument("--out", type=str, required=True, help="store directory")
    p.add_class_arguments(EncoderConfig, "encoder")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--dtype", type=str, default="float16", help="float16 or float32")
    p.add_argument("--devices", type=str, default="1", help="Lightning devices (1, 8, auto)")
    p.add_argument("--num_nodes", type=int, default=1)
    return p


def _synthetic_parser() -> ArgumentParser:
    p = ArgumentParser(description="Write a synthetic pool (clusters of skewed size and spread, "
                       "planted near-duplicates) as an embedding store.")
    p.add_argument("--out", type=str, required=True, help="store directory to write")
    p.add_argument("--n", type=int, default=20000, help="samples")
    p.add_argument("--dim", type=int, default=256, help="embedding dimension")
    p.add_argument("--n_concepts", type=int, default=200, help="true concepts")
    p.add_argument("--dup_fraction", type=float, default=0.1, help="rows that copy another row")
    p.add_argument("--dtype", type=str, default="float32", help="float16 or float32")
    p.add_argument("--seed", type=int, default=0)
    return p


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="dbp-lightning", description=__doc__.splitlines()[0],
                            exit_on_error=False)
    commands = parser.add_subcommands(dest="command")
    commands.add_subcommand("embed", _embed_parser(), help="embed shards into an embedding store")
    commands.add_subcommand("prune", _prune_parser(), help="prune a pool into a run directory")
    data = ArgumentParser(description="make datasets")
    commands.add_subcommand("data", data, help="make datasets")
    data.add_subcommands(dest="kind").add_subcommand("synthetic", _synthetic_parser(),
                                                     help="synthetic embedding pool")
    return parser


def prune_config(parser: ArgumentParser, cfg) -> PruneConfig:
    """The :class:`PruneConfig` of parsed ``prune`` arguments (YAML and flags merged)."""
    ns = parser.instantiate(cfg).prune
    return PruneConfig(**{name: ns[name] for name in PruneConfig.__dataclass_fields__})


def run_prune(config: PruneConfig) -> int:
    from .pruning.pipeline import load_input, prune
    from .rundir import write_run

    config.validate()
    emb, metadata, input_id = load_input(config)
    result = prune(emb, config, metadata=metadata, progress=True)
    out = write_run(result, config.output, config.to_dict(), input_id)
    print(f"{'stage':<12}{'in':>12}{'out':>12}{'seconds':>10}")
    for st in result.report["stages"]:
        print(f"{st['stage']:<12}{st['in']:>12,}{st['out']:>12,}{st['seconds']:>10.2f}")
    print(f"kept {result.report['kept']:,} of {result.report['pool']:,} -> {out}")
    return 0


def run_embed(args) -> int:
    from .embed import embed_shards

    devices = int(args.devices) if args.devices.isdigit() else args.devices
    strategy = "ddp" if devices not in (1, "1") or args.num_nodes > 1 else "auto"
    store = embed_shards(args.shards, args.out, args.encoder.validate(), args.batch_size,
                         args.num_workers, args.dtype,
                         trainer_kwargs={"devices": devices, "num_nodes": args.num_nodes,
                                         "strategy": strategy})
    print(f"embedded {len(store):,} samples ({store.dim}-d {args.dtype}); skipped: "
          f"{store.manifest.get('skipped', {})} -> {args.out}")
    return 0


def run_synthetic(args) -> int:
    from .synthetic import PoolSpec, write_pool_store

    spec = PoolSpec(n=args.n, dim=args.dim, n_concepts=args.n_concepts,
                    dup_fraction=args.dup_fraction, seed=args.seed)
    store = write_pool_store(args.out, spec, dtype=args.dtype, progress=True)
    print(f"wrote {len(store):,} x {store.dim} {args.dtype} embeddings -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # says which SIMD build loaded
    parser = build_parser()
    try:
        cfg = parser.parse_args(argv)
    except Exception as exc:  # jsonargparse's ArgumentError: a bad flag, key or config file
        print(f"dbp-lightning: error: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    try:
        if cfg.command == "prune":
            return run_prune(prune_config(parser, cfg))
        if cfg.command == "embed":
            return run_embed(parser.instantiate(cfg).embed)
        if cfg.command == "data" and cfg.data.kind == "synthetic":
            return run_synthetic(cfg.data.synthetic)
    except ValueError as exc:  # bad input: one clear line, no traceback
        print(f"dbp-lightning {cfg.command}: error: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())
