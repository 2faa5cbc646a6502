"""The ``dbp-lightning`` console script.

Subcommands:
    fit, validate    LightningCLI: CLIPModule on DBPDataModule (configs/fit/*.yaml)
    embed            embed WebDataset shards into an embedding store (resumable)
    import           DataComp / LAION / NeMo embeddings that cannot be mapped -> a store (resumable)
    eval             zero-shot evaluation of a checkpoint on ImageNet / DataComp tasks
    prune            run the pruning stages on an embedding store (YAML config + flags)
    compare          one model per subset (full, random, SSP, DBP, ...) at an equal budget
    demo             the offline demo: data, embed, prune, train full vs DBP, evaluate, report
    data synthetic   write a synthetic clustered pool with planted duplicates as a store
    data icons       a redundant real pool from open icon sets (npm's @iconify/json)
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import jsonargparse
from jsonargparse import ActionConfigFile, ArgumentParser

from . import __version__
from .config import EncoderConfig, PruneConfig, default_workers
from .lock import DirectoryBusy, directory_lock

# every option's help is the docstring written under its dataclass field (config.py) or in the
# Args: of an __init__ (DBPDataModule, CLIPModule): one place for the code and for --help
jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)

#: the subcommands LightningCLI parses (its own --help); listed in ``dbp-lightning --help``
LIGHTNING_COMMANDS = {
    "fit": "train CLIPModule on DBPDataModule (prunes at setup; configs/fit/*.yaml)",
    "validate": "validate a fit run's checkpoint (--ckpt_path .../last.ckpt)",
}


def _config_parser(cls, description: str, config_help: str = "YAML config") -> ArgumentParser:
    """A subcommand whose options are the dataclass ``cls``'s fields, from YAML and flags."""
    p = ArgumentParser(description=description)
    p.add_argument("--config", action=ActionConfigFile, help=config_help)
    p.add_class_arguments(cls, nested_key=None, fail_untyped=True)
    return p


def _prune_parser() -> ArgumentParser:
    return _config_parser(PruneConfig, "Prune a pool: semdedup -> clip_score -> dbp|ssp|random. Writes "
                          "selection.parquet, clusters.parquet, subset.npy, plots, report.json, "
                          "report.html (when the pool's shards are at hand) and manifest.json into "
                          "--output.", "YAML config (configs/prune/*.yaml)")


def _embed_parser() -> ArgumentParser:
    p = ArgumentParser(description="Embed WebDataset shards (KEY.jpg|png|webp, KEY.txt, KEY.json) "
                       "into an embedding store with Trainer.predict; a rerun resumes. Exit status: "
                       "0 done; 3 done, but unreadable shards were left out (--skip_bad_shards "
                       "true; they are named on screen and in the store's manifest.json); 2 bad "
                       "input (an unreadable shard without --skip_bad_shards, a sample id in two "
                       "shards, a bad option); 1 an I/O error such as a full disk; 130 Ctrl-C.")
    p.add_argument("--config", action=ActionConfigFile, help="YAML config")
    p.add_argument("--shards", type=str, required=True, help="brace pattern, glob or directory")
    p.add_argument("--out", type=str, required=True, help="store directory")
    p.add_class_arguments(EncoderConfig, "encoder")
    p.add_argument("--batch_size", type=int, default=256, help="samples per forward pass and device")
    p.add_argument("--num_workers", type=Optional[int], default=None,
                   help="data-loading workers (None: 4, or the cores there are if fewer)")
    p.add_argument("--dtype", type=str, default="float16", help="float16 or float32")
    p.add_argument("--devices", type=str, default="1", help="Lightning devices (1, 8, auto)")
    p.add_argument("--num_nodes", type=int, default=1, help="Lightning nodes (SLURM or torchrun)")
    p.add_argument("--skip_bad_shards", type=bool, default=False,
                   help="embed the shards that can be read and leave out the missing, empty or "
                   "non-tar ones (listed in manifest.json's skipped_shards; exit 3) instead of "
                   "refusing the pool; a rerun checks again and embeds shards fixed since")
    return p


#: ``dbp-lightning embed``'s exit status when the store is complete but shards were left out
EXIT_SHARDS_SKIPPED = 3


def _import_parser() -> ArgumentParser:
    p = ArgumentParser(description="Import a pool that prune cannot memory-map where it lies "
                       "(compressed DataComp .npz, NeMo Curator parquet, two arrays joined) into an "
                       "embedding store, part by part; a rerun resumes. Then: prune --input STORE.")
    p.add_argument("--input", type=str, required=True, help="DataComp, clip-retrieval/LAION or NeMo directory")
    p.add_argument("--out", type=str, required=True, help="store directory to write")
    p.add_argument("--input_format", type=str, default="auto", help="auto, datacomp, clip_retrieval or nemo")
    p.add_argument("--array", type=Optional[str], default=None,
                   help="DataComp l14_img (default), l14_txt, b32_img, b32_txt; clip-retrieval img "
                   "(default), txt; NeMo the list column (default embedding); a+b joins two")
    p.add_argument("--id_column", type=Optional[str], default=None,
                   help="column identifying a sample (default: uid, else the layout's key, else the row)")
    p.add_argument("--dtype", type=str, default="float16", help="float16 or float32")
    return p


def _eval_parser() -> ArgumentParser:
    p = ArgumentParser(description="Zero-shot evaluation (clip_benchmark) of a CLIPModule checkpoint "
                       "or an open_clip model; prints the table and writes JSON, markdown and CSV.")
    p.add_argument("--ckpt", type=Optional[str], default=None, help="a CLIPModule (Lightning) checkpoint")
    p.add_argument("--model", type=str, default="ViT-B-32", help="open_clip model, without --ckpt")
    p.add_argument("--weights", type=Optional[str], default=None, help="open_clip weights, without --ckpt")
    p.add_argument("--tasks", type=str, default="imagenet", help="imagenet, datacomp38, or DataComp keys")
    p.add_argument("--data_root", type=Optional[str], default=None, help="clip_benchmark WebDataset tasks")
    p.add_argument("--imagenet_folder", type=Optional[str], default=None, help="ImageNet val ImageFolder")
    p.add_argument("--out", type=str, default="runs/eval", help="results directory")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    p.add_argument("--num_workers", type=int, default=0, help="data-loading workers per task")
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
    p.add_argument("--seed", type=int, default=0, help="seed of the concepts, their members and the copies")
    return p


def _demo_data_parser() -> ArgumentParser:
    from .data.demo import DemoSpec

    p = ArgumentParser(description="Write the offline demo pool (openmoji, openclipart) as WebDataset "
                       "shards and held-out evaluation sets (Fashion-MNIST, clip-art categories, "
                       "caption retrieval) in clip_benchmark's layout.")
    p.add_argument("--out", type=str, default="runs/demo_data",
                   help="directory to write (a build of another spec there is replaced whole)")
    p.add_argument("--workers", type=int, default=2, help="render processes")
    p.add_class_arguments(DemoSpec, nested_key=None)
    return p


def _icons_data_parser() -> ArgumentParser:
    from .data.icons import IconSpec

    p = ArgumentParser(description="Write a redundant real pool from the open icon sets of npm's "
                       "@iconify/json (fetched with npm, checked against its pinned integrity) as "
                       "WebDataset shards, whole sets held out for evaluation (retrieval, concepts), "
                       "plus the demo's held-out tasks.")
    p.add_argument("--out", type=str, default="runs/icons/data",
                   help="directory to write (a build of another spec there is replaced whole)")
    p.add_argument("--package", type=Optional[str], default=None,
                   help="the @iconify/json tarball at hand (default: fetched into ~/.cache/dbp_lightning)")
    p.add_argument("--workers", type=int, default=2, help="render processes")
    p.add_class_arguments(IconSpec, nested_key=None)
    return p


def _compare_parser() -> ArgumentParser:
    from .compare import CompareConfig

    p = _config_parser(CompareConfig, "Train one model per subset of a pool (full, semdedup, clip_score, "
                       "random, ssp, dbp) and seed at an equal budget, evaluate zero-shot, write "
                       "compare_results.{md,csv,json} and compare.png. Finished runs are reused.",
                       "YAML config (configs/compare/*.yaml)")
    p.add_argument("--only", type=Optional[list[str]], default=None,
                   help="run only these subsets (names as in the table: full, dbp-0.5, ...)")
    p.add_argument("--collect", type=bool, default=False,
                   help="run nothing: build the table from the runs that have finished")
    return p


def _demo_parser() -> ArgumentParser:
    from .demo import DemoConfig

    return _config_parser(DemoConfig, "The offline demo: build the data, embed, prune (SemDeDup -> DBP), "
                          "train a CLIP on the pruned and the full pool for the same samples seen, "
                          "evaluate both zero-shot, write report.html, print the table.")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="dbp-lightning", exit_on_error=False,
                            description="Density-Based Pruning (arXiv 2401.04578) of image-text pools, "
                            "and CLIP training on the result. Each subcommand has its own --help; "
                            "-v anywhere on the line shows third-party logs and per-stage detail.")
    parser.add_argument("--version", action="version", version=f"dbp-lightning {__version__}")
    commands = parser.add_subcommands(dest="command")
    for name, line in LIGHTNING_COMMANDS.items():  # parsed by LightningCLI (see _main)
        commands.add_subcommand(name, ArgumentParser(description=line), help=line)
    commands.add_subcommand("embed", _embed_parser(), help="embed shards into an embedding store")
    commands.add_subcommand("import", _import_parser(), help="import DataComp/LAION/NeMo embeddings into a store")
    commands.add_subcommand("prune", _prune_parser(), help="prune a pool into a run directory")
    commands.add_subcommand("eval", _eval_parser(), help="zero-shot evaluation")
    commands.add_subcommand("compare", _compare_parser(), help="compare subsets at an equal budget")
    commands.add_subcommand("demo", _demo_parser(), help="the offline demo, end to end")
    data = ArgumentParser(description="make datasets")
    commands.add_subcommand("data", data, help="make datasets")
    kinds = data.add_subcommands(dest="kind")
    kinds.add_subcommand("synthetic", _synthetic_parser(), help="synthetic embedding pool")
    kinds.add_subcommand("demo", _demo_data_parser(), help="the offline demo pool and evaluation sets")
    kinds.add_subcommand("icons", _icons_data_parser(), help="a redundant real pool from open icon sets")
    return parser


def _dataclass(cls, ns):
    """An instance of the dataclass ``cls`` from the (instantiated) namespace of its flags."""
    return cls(**{name: ns[name] for name in cls.__dataclass_fields__})


def prune_config(parser: ArgumentParser, cfg) -> PruneConfig:
    """The :class:`PruneConfig` of parsed ``prune`` arguments (YAML and flags merged)."""
    return _dataclass(PruneConfig, parser.instantiate(cfg).prune)


def run_prune(config: PruneConfig) -> int:
    from .data.pools import open_input
    from .distributed import collective_from_environment
    from .pruning.embeddings import as_embeddings
    from .pruning.pipeline import prune
    from .rundir import claim_output, write_run
    from .store import source_shards

    config.validate()
    if not config.input:
        raise ValueError("input: give the pool: an embedding store, a .npy, or a DataComp, "
                         "clip-retrieval/LAION or NeMo Curator directory")
    comm = collective_from_environment()  # several processes under torchrun or srun
    if comm.rank != 0:  # one rank tells the story
        logging.getLogger("dbp_lightning").setLevel(logging.WARNING)
    try:
        # rank 0 writes: it holds the output from before the work, and every rank learns if it can't
        with claim_output(config.output, comm=comm):
            pool = open_input(config)
            emb = as_embeddings(pool.embeddings, name=config.input, comm=comm)
            result = prune(emb, config, metadata=pool.metadata, progress=comm.rank == 0, comm=comm)
            if comm.rank != 0:  # every rank holds the same result; one writes it
                return 0
            out = write_run(result, config.output, config.to_dict(), pool.fingerprint,
                            shards=source_shards(config.input) if pool.layout == "store" else None,
                            pool=pool)
    finally:
        comm.close()
    print(f"{'stage':<12}{'in':>12}{'out':>12}{'seconds':>10}")
    for st in result.report["stages"]:
        print(f"{st['stage']:<12}{st['in']:>12,}{st['out']:>12,}{st['seconds']:>10.2f}")
    processes = f"{comm.world_size} processes, " if comm.world_size > 1 else ""
    where = result.report["backend"]
    print(f"kept {result.report['kept']:,} of {result.report['pool']:,} ({processes}{where['kind']} on "
          f"{where['device']}) -> {out}")
    if (out / "report.html").is_file():
        print(f"report -> {out / 'report.html'}")
    return 0


def run_embed(args) -> int:
    """Embed, print the one-line summary (and a line naming every unreadable shard left out);
    0, or :data:`EXIT_SHARDS_SKIPPED` when shards were left out."""
    from .embed import embed_shards, skip_summary, skipped_shards_line

    devices = int(args.devices) if args.devices.isdigit() else args.devices
    strategy = "ddp" if devices not in (1, "1") or args.num_nodes > 1 else "auto"
    workers = default_workers() if args.num_workers is None else args.num_workers
    store = embed_shards(args.shards, args.out, args.encoder.validate(), args.batch_size,
                         workers, args.dtype,
                         trainer_kwargs={"devices": devices, "num_nodes": args.num_nodes,
                                         "strategy": strategy},
                         skip_bad_shards=args.skip_bad_shards)
    print(f"{skip_summary(store.manifest)} ({store.dim}-d {args.dtype}) -> {args.out}")
    left_out = skipped_shards_line(store.manifest)
    if left_out:
        print(left_out)
        return EXIT_SHARDS_SKIPPED
    return 0


def run_import(args) -> int:
    from .data.importer import import_pool

    store = import_pool(args.input, args.out, args.input_format, args.array, args.id_column,
                        args.dtype)
    counts = store.manifest.get("counts", {})
    left = counts.get("degenerate_embedding", 0)
    print(f"imported {len(store):,} of {counts.get('read', len(store)):,} rows ({store.dim}-d "
          f"{args.dtype}{f'; {left:,} all-zero or non-finite left out' if left else ''}) -> {args.out}")
    return 0


def run_eval(args) -> int:
    import csv

    import torch

    from .clip_module import CLIPModule
    from .evaluation import evaluate_tasks, format_table, select_tasks
    from .evaluation.tasks import BY_KEY

    tasks = select_tasks(args.tasks)  # refuse unknown tasks before loading anything
    if args.ckpt:
        if not os.path.isfile(args.ckpt):
            raise ValueError(f"--ckpt: no file {args.ckpt}")
        # the trained weights are in the checkpoint: never reload the initial ones
        module = CLIPModule.load_from_checkpoint(args.ckpt, map_location="cpu", pretrained=None)
    else:
        module = CLIPModule(args.model, pretrained=args.weights)
    if torch.cuda.is_available():
        module = module.cuda()
    rows, summary = evaluate_tasks(module.model, module.preprocess_val, module.tokenizer, tasks,
                                   args.data_root, out_dir=args.out, batch_size=args.batch_size,
                                   num_workers=args.num_workers, imagenet_folder=args.imagenet_folder)
    table = format_table(rows, summary)
    print(table)
    from .atomic import atomic_path

    with atomic_path(os.path.join(args.out, "eval_table.md")) as tmp:
        tmp.write_text(table + "\n")
    with atomic_path(os.path.join(args.out, "eval_table.csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "key", "main_metric", "value", "status", "note"])
        for r in rows:
            writer.writerow([r["dataset"], r["key"], BY_KEY[r["key"]].main_metric,
                             r["metrics"].get("main_metric", ""), r["status"], r.get("reason", "")])
    print(f"{summary['available']} tasks evaluated -> {args.out}")
    return 0


def run_compare_command(args) -> int:
    from .compare import CompareConfig, collect, run_compare, write_outputs

    config = _dataclass(CompareConfig, args).validate()
    with directory_lock(config.out):  # one compare per results directory
        if not args.collect:
            run_compare(config, only=args.only)
        results, summary = collect(config)
        table = write_outputs(config, results, summary)
    print(table.read_text(), end="")
    expected = len(config.subsets) * len(config.seeds)
    print(f"{len(results)}/{expected} runs finished -> {table}")
    return 0


def run_demo_data(args) -> int:
    from .data.demo import DemoSpec, build_demo

    report = build_demo(args.out, _dataclass(DemoSpec, args), workers=args.workers, progress=True)
    _print_demo_data(report, args.out)
    return 0


def run_icons_data(args) -> int:
    from .data.icons import IconSpec, build_icons

    report = build_icons(args.out, _dataclass(IconSpec, args), package=args.package,
                         workers=args.workers, progress=True)
    c, concepts = report["counts"], report["concepts"]
    print(f"{report['package']}: {c['sets']} sets, {c['icons']:,} icons ({c.get('hidden', 0):,} hidden, "
          f"{c.get('mask_not_drawn', 0):,} drawn through masks cairosvg ignores and "
          f"{c.get('aliases_transformed', 0):,} transformed aliases left out); {c['drawn']:,} drawn, "
          f"{c['rendered']:,} rendered, {c['blank_or_unrenderable']:,} blank or unrenderable dropped")
    print(f"train {report['train_samples']:,} samples in {report['train_shards']} shards; held out "
          f"{report['eval_samples']:,} icons in {len(report['held_out_sets'])} sets; "
          f"{concepts['stems_in_min_sets']:,} concepts, {concepts['held_out_shown']:,} shown in held-out sets")
    print(f"-> {args.out} (data fingerprint {report['fingerprint']})")
    return 0


def _print_demo_data(report: dict, out: str) -> None:
    for source, counts in report["sources"].items():
        print(f"{source:<14}{', '.join(f'{k} {v:,}' for k, v in counts.items())}")
    for source, how in report["left_out"].items():
        print(f"{source:<14}left out: not installed ({how})")
    print(f"{report['train_samples']:,} training samples in {report['train_shards']} shards -> {out} "
          f"(data fingerprint {report.get('fingerprint', 'unknown: built before fingerprints')})")


def run_synthetic(args) -> int:
    from .synthetic import PoolSpec, write_pool_store

    spec = PoolSpec(n=args.n, dim=args.dim, n_concepts=args.n_concepts,
                    dup_fraction=args.dup_fraction, seed=args.seed)
    store = write_pool_store(args.out, spec, dtype=args.dtype, progress=True)
    print(f"wrote {len(store):,} x {store.dim} {args.dtype} embeddings -> {args.out}")
    return 0


def lightning_cli(argv: list[str]) -> int:
    """``fit`` / ``validate``: LightningCLI over CLIPModule and DBPDataModule."""
    from lightning.pytorch.cli import LightningCLI

    from .clip_module import CLIPModule
    from .datamodule import DBPDataModule

    # args=None when they are the command line's own: LightningCLI warns when given both
    args = None if argv == sys.argv[1:] else argv
    LightningCLI(CLIPModule, DBPDataModule, args=args, save_config_kwargs={"overwrite": True},
                 parser_kwargs={"prog": "dbp-lightning"})
    return 0


def main(argv: list[str] | None = None) -> int:
    console, argv = argv is None, sys.argv[1:] if argv is None else argv
    try:
        return _main(argv, console)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback, the shell's code for SIGINT
        _say(f"dbp-lightning {argv[0] if argv else ''}: interrupted; what had finished is kept "
             "(every artifact is written whole or not at all) and a rerun picks up from it")
        return 130


def _say(line: str) -> None:
    """One line on stderr, on a line of its own even after a progress bar's carriage return."""
    print(("\n" if sys.stderr.isatty() else "") + line, file=sys.stderr)


#: commands that run Lightning (their banners, tips and third-party INFO are silenced unless -v)
_LIGHTNING_USERS = ("fit", "validate", "embed", "eval", "compare", "demo")


class _Plain(logging.Formatter):
    """Info as the bare line; a warning or an error says so."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def configure_logging(command: str | None, verbose: bool) -> None:
    """One line per stage from dbp_lightning; third-party INFO (open_clip logs through the root
    logger), Lightning's banners and tips and known noise warnings only with ``-v``."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_Plain("%(message)s"))
    logging.getLogger("dbp_lightning").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        return
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # says which SIMD build loaded
    # transformers draws a bar per model it loads (read when it is imported, so set it first)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if command in _LIGHTNING_USERS:
        # Lightning sets its loggers' levels when imported: import it first, then quiet them
        import lightning.pytorch  # noqa: F401

        for name in ("lightning.pytorch", "lightning.fabric", "sentence_transformers"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Lightning 2.6 on torch 2.14 warns about torch's own pytree API on every fit; a module
        # without held-out shards has no validation loop, which Lightning warns about
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
        warnings.filterwarnings("ignore", message=".*`tensorboardX` has been removed")  # CSV logs
    if command in ("compare", "demo"):  # their progress bars say what runs; stage logs would break them
        for name in ("dbp_lightning.pruning", "dbp_lightning.cache"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _main(argv: list[str], console: bool = False) -> int:
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    if console:  # LightningCLI reads the command line itself (given args too, it warns)
        sys.argv[1:] = argv
    command = next((a for a in argv if not a.startswith("-")), None)
    configure_logging(command, verbose)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return lightning_cli(argv)
    parser = build_parser()
    try:
        cfg = parser.parse_args(argv)
    except Exception as exc:  # jsonargparse's ArgumentError: a bad flag, key or config file
        print(f"dbp-lightning: error: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    try:
        if cfg.command == "prune":
            return run_prune(prune_config(parser, cfg))
        if cfg.command == "compare":
            return run_compare_command(parser.instantiate(cfg).compare)
        if cfg.command == "demo":
            from .demo import DemoConfig, run_demo

            demo = _dataclass(DemoConfig, parser.instantiate(cfg).demo)
            with directory_lock(demo.out):
                done = run_demo(demo)
            _print_demo_data(done["data"], str(Path(done["config"]["out"]) / "data"))
            print(Path(done["table"]).read_text(), end="")
            print(f"table -> {done['table']}\nreport -> {done['report']}")
            return 0
        if cfg.command == "eval":
            return run_eval(cfg.eval)
        if cfg.command == "import":
            return run_import(cfg["import"])
        if cfg.command == "embed":
            return run_embed(parser.instantiate(cfg).embed)
        if cfg.command == "data" and cfg.data.kind == "synthetic":
            return run_synthetic(cfg.data.synthetic)
        if cfg.command == "data" and cfg.data.kind == "demo":
            return run_demo_data(parser.instantiate(cfg).data.demo)
        if cfg.command == "data" and cfg.data.kind == "icons":
            return run_icons_data(parser.instantiate(cfg).data.icons)
    except DirectoryBusy as exc:  # another live process writes the same output
        _say(f"dbp-lightning {cfg.command}: error: {exc}")
        return 1
    except ValueError as exc:  # bad input: one clear line, no traceback
        _say(f"dbp-lightning {cfg.command}: error: {exc}")
        return 2
    except OSError as exc:  # a full disk, a read-only or vanished directory: one line too
        if exc.errno == errno.ENOSPC:
            what = f"disk full while writing {exc.filename or 'the output'} ({exc.strerror})"
        else:
            what = f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
        _say(f"dbp-lightning {cfg.command}: error: {what}; nothing partial was left under a "
             "final name")
        return 1
    parser.print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())
