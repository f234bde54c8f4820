"""The ``kdray`` command line: train, tune, report, ui, bench, validate, and list methods, models and datasets."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

import kdray
from kdray import tag_names as tag
from kdray.data import DATASETS, DataError
from kdray.engine import TrainingDiverged
from kdray.resolve import load_config
from kdray.schema import ConfigError, ExperimentConfig, default_storage_path, default_store_path, default_tracking_uri

EXIT_FAILED = 1  # a run that started and could not finish (its MLflow run says why)
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a command ended by Ctrl-C
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="experiment YAML file (see experiments/)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. method.temperature=4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdray", description="Knowledge distillation for image classifiers.")
    parser.add_argument("--version", action="version", version=f"kdray {kdray.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the teacher (unless stored) and the student of an experiment")
    _config_args(train)
    tune = commands.add_parser("tune", help="search hyperparameters (Ray Tune + Optuna), every trial in MLflow")
    tune.add_argument("file", nargs="?", help="experiment YAML file with a search section")
    tune.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. search.num_samples=20")
    tune.add_argument("--resume", metavar="NAME", help="continue the search NAME whose driver stopped")
    tune.add_argument(
        "--storage",
        default=default_storage_path(),
        help="with --resume: the search's scaling.storage_path (default: $KDRAY_STORAGE_PATH, else .kdray/ray)",
    )
    report = commands.add_parser("report", help="print a search's summary from MLflow and redraw its plots")
    report.add_argument("name", help="search name (printed by kdray tune)")
    report.add_argument(
        "--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)"
    )
    report.add_argument("--out", default=None, help="folder to write summary.md and the plots into")
    ui = commands.add_parser("ui", help="serve MLflow's UI over the project's runs (127.0.0.1 unless --host)")
    ui.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    ui.add_argument("--host", default="127.0.0.1", help="interface to listen on (warns unless loopback)")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    bench = commands.add_parser("bench", help="measure kdray's speed: step, cache, search, trials, data (JSON lines)")
    bench.add_argument("--only", default="step,cache,search,trials,data", help="comma-separated measurements to run")
    bench.add_argument("--teacher", default="resnet56", help="teacher architecture (default resnet56)")
    bench.add_argument("--student", default="resnet8", help="student architecture (default resnet8)")
    bench.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where step and cache run")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    bench.add_argument("--steps", type=int, default=8, help="steps per timed epoch in step and cache (default 8)")
    bench.add_argument("--rounds", type=int, default=10, help="alternations of kdray and the plain loop (default 10)")
    bench.add_argument("--search-trials", type=int, default=8, help="trials of the search measurement (default 8)")
    bench.add_argument(
        "-o", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config of the searches"
    )
    bench.add_argument(
        "--data-root", default=None, help="an image folder: data also times an epoch on it, in memory and streamed"
    )
    bench.add_argument("--mlflow", action="store_true", help="also log the results to MLflow (experiment kdray-bench)")
    evaluate = commands.add_parser("evaluate", help="accuracy of a stored, logged or registered model on a split")
    evaluate.add_argument("model", help="models:/NAME/VERSION, models:/MODEL_ID, runs:/RUN/model, or a store key")
    evaluate.add_argument("file", nargs="?", help="experiment YAML whose data (and tracking, store) to use")
    evaluate.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. data.name=cifar10")
    evaluate.add_argument("--data", metavar="FILE", help="the same as giving FILE (an experiment YAML)")
    evaluate.add_argument("--split", choices=["train", "val", "test"], default="test", help="default: test")
    export = commands.add_parser("export", help="write a logged or registered model as TorchScript or ONNX")
    export.add_argument("model", help="models:/NAME/VERSION, models:/MODEL_ID, runs:/RUN/model, or a store key")
    export.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript", dest="fmt")
    export.add_argument("--out", required=True, help="file to write")
    export.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)"
    )
    export.add_argument("--store", default=None, help="model store, for a store key (default: .kdray/store)")
    store = commands.add_parser(
        "store", help="the model store: check every entry's weights (verify); would a config's stages be reused (why)"
    )
    store.add_argument(
        "action", choices=["verify", "why"], help="verify: check every entry; why FILE: reuse or train, and why"
    )
    store.add_argument("file", nargs="?", help="why: the experiment YAML whose stages to look up")
    store.add_argument("overrides", nargs="*", metavar="section.field=value", help="why: e.g. train.lr=0.1")
    store.add_argument("--store", default=None, help="the model store (default: $KDRAY_STORE_PATH, else .kdray/store)")
    store.add_argument("--repair", action="store_true", help="move damaged entries into .quarantine/ (never deletes)")
    validate = commands.add_parser("validate", help="print the fully resolved config, or the first error")
    _config_args(validate)
    commands.add_parser("methods", help="list distillation methods with their hyperparameters")
    commands.add_parser("models", help="list architectures")
    commands.add_parser("datasets", help="list datasets")
    return parser


def _list_methods() -> str:
    from kdray.methods import METHODS

    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    lines = []
    for name, method in METHODS.items():
        lines.append(f"{name}: {method.summary}")
        for field, info in method.Params.model_fields.items():
            if field == "name":
                continue
            bounds = [
                f"{sign}{getattr(m, op)}" for m in info.metadata for op, sign in symbols.items() if hasattr(m, op)
            ]
            lines.append(f"  method.{field} = {info.default!r:<6} {' '.join(bounds):<12} {info.description}")
    return "\n".join(lines)


def _list_models() -> str:
    from kdray.models import MODELS, ModelInfo, build_model, parameter_count
    from kdray.models.registry import installed_models

    info = ModelInfo(num_classes=100)
    lines = [
        f"{name:<13} {parameter_count(build_model(name, info)) / 1e6:6.2f}M params (CIFAR-100 head)  {spec.source}"
        for name, spec in MODELS.items()
    ]
    lines += [f"{name:<13} entry point {target}" for name, target in installed_models().items()]
    lines += [
        "torchvision.<name>  any classifier of torchvision.models.list_models(), e.g. torchvision.resnet18",
        "timm.<name>         any timm.list_models() model (pip install 'kdray[timm]')",
        "package.module:callable  your own function or class returning a torch.nn.Module",
    ]
    return "\n".join(lines)


def _list_datasets() -> str:
    return "\n".join(f"{name:<12} {spec.description}" for name, spec in DATASETS.items())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # What the libraries tell their own users is noise to a kdray user: MLflow configures its loggers from
    # this variable when imported, Optuna announces every in-memory study, Ray its token authentication, boto3
    # where it found the bucket's credentials.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for noisy, level in (("alembic", logging.WARNING), ("urllib3", logging.WARNING), ("optuna", logging.WARNING),
                         ("ray._private.authentication", logging.ERROR), ("botocore", logging.WARNING)):  # fmt: skip
        logging.getLogger(noisy).setLevel(level)
    if not sys.stderr.isatty():  # Ray colours the dashboard URL it logs: escape codes in a log file
        logging.getLogger("ray._private.worker").addFilter(_plain_text)
    listings = {"methods": _list_methods, "models": _list_models, "datasets": _list_datasets}
    if args.command in listings:
        return _print(listings[args.command]())
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(
            "kdray: interrupted; the runs it had open are marked KILLED (the same `kdray train` command continues "
            "them, `kdray tune --resume NAME` a search)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except (ConfigError, DataError) as error:
        kind = "config" if isinstance(error, ConfigError) else "data"
        print(f"kdray: {kind} error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except TrainingDiverged as error:
        print(f"kdray: training diverged: {error} (its MLflow run is marked FAILED)", file=sys.stderr)
        return EXIT_FAILED


def _plain_text(record: logging.LogRecord) -> bool:
    """A logging filter that removes ANSI escape codes from a record's message."""
    record.msg, record.args = ANSI_ESCAPE.sub("", record.getMessage()), None
    return True


def _print(text: str) -> int:
    """Print a listing; a reader that stops early (``kdray methods | head``) ends it quietly, not in a traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail too
    return 0


def _run(args: argparse.Namespace) -> int:
    """The commands that can fail on bad input (``ConfigError`` / ``DataError``, reported by ``main``)."""
    tools = {
        "report": _report,
        "ui": _ui,
        "bench": _bench,
        "export": _export,
        "evaluate": _evaluate,
        "store": _store,
    }
    if args.command in tools:
        return tools[args.command](args)
    if args.command == "tune" and args.resume:
        return _tune(None, None, args.resume, args.storage)
    if args.file is None:
        raise ConfigError("give an experiment file (or --resume NAME)")
    cfg: ExperimentConfig = load_config(args.file, args.overrides)
    if args.command == "validate":
        if cfg.search.space:
            from kdray.search.space import check_space

            check_space(cfg)  # what `kdray tune` would refuse, refused here too
        print(cfg.to_yaml(), end="")
        return 0
    if args.command == "tune":
        return _tune(cfg, Path(args.file).stem, None)
    return _train(cfg)


def _store(args: argparse.Namespace) -> int:
    if args.action == "why":
        return _store_why(args)
    if args.file is not None:
        raise ConfigError(f"kdray store verify takes no experiment file ({args.file}); give --store")
    return _verify_store(args)


def _store_why(args: argparse.Namespace) -> int:
    """``kdray store why FILE``: one line per stage, reused or trained, and for a trained one the fields in which
    it differs from the nearest stored entry."""
    from kdray.reuse import why

    if args.file is None:
        raise ConfigError("kdray store why: give the experiment file whose stages to look up")
    overrides = [*args.overrides, *([f"store.path={args.store}"] if args.store else [])]
    verdicts, unrecorded = why(load_config(args.file, overrides))
    for verdict in verdicts:
        print(verdict.line())
    if unrecorded:
        print(f"({unrecorded} stored entries record no identity, written before kdray recorded them: not compared)")
    return 0


def _verify_store(args: argparse.Namespace) -> int:
    """``kdray store verify``: one line per entry; exit 1 if an entry is damaged and was left in place."""
    from kdray.schema.storage import StoreConfig
    from kdray.store import open_store

    store = open_store(StoreConfig(path=args.store or default_store_path()))
    if "://" not in store.location and not store.root.is_dir():
        raise ConfigError(f"--store {store.root}: no model store there (give --store, or set KDRAY_STORE_PATH)")
    damaged = 0
    keys = store.keys()
    for key in keys:
        problem = store.problem(key)
        if problem is None:
            print(f"ok       {key}")
            continue
        damaged += 1
        aside = store.quarantine(key) if args.repair else None
        print(f"{'moved' if aside else 'damaged':<8} {key}  {problem}" + (f" -> {aside}" if aside else ""))
    verdict = ", moved to .quarantine/" if args.repair else ", left in place (--repair moves them aside)"
    counts = f"{len(keys) - damaged} intact, {damaged} damaged{verdict if damaged else ''}"
    print(f"{len(keys)} entries in {store.location}: {counts}")
    return 1 if damaged and not args.repair else 0


def _train(cfg: ExperimentConfig) -> int:
    from kdray.run import describe, run_experiment

    result = run_experiment(cfg)
    print(describe(result, cfg))
    return 0


def _tune(cfg: ExperimentConfig | None, default_name: str | None, resume: str | None, storage: str = "") -> int:
    from kdray.search.driver import resume_search, run_search
    from kdray.ui import view_hint

    if cfg is not None:
        assert default_name is not None
        outcome = run_search(cfg, default_name)
        uri = cfg.tracking.uri
    else:
        assert resume is not None
        outcome = resume_search(resume, storage)
        uri = outcome.tracking_uri
    print(outcome.report.markdown)
    print(f"Search '{outcome.name}': MLflow run {outcome.parent_run_id} (summary.md and plots/ among its artifacts)")
    print(f"  view it with:   {view_hint(uri)}")
    print(f"  print it again: kdray report {outcome.name} --tracking-uri {uri}")
    print(f"  optuna study:   optuna-dashboard {outcome.optuna_storage}  (study {outcome.name})")
    if outcome.registered and outcome.report.objectives:
        name = outcome.registered.removeprefix("models:/").rsplit("/", 1)[0]
        print(f"  front students: {len(outcome.report.front)} versions of models:/{name}, the most accurate first "
              f"({outcome.registered}; mlflow.pytorch.load_model; kdray evaluate / export)")  # fmt: skip
    elif outcome.registered:
        print(f"  best student:   {outcome.registered}  (mlflow.pytorch.load_model; kdray evaluate / export)")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from kdray.ui import serve

    serve(args.tracking_uri, args.host, args.port)  # returns only to refuse the store, by raising
    return 0


def _report(args: argparse.Namespace) -> int:
    from kdray.search.report import report_by_name

    out = args.out
    report = report_by_name(args.name, args.tracking_uri)
    print(report.markdown)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.md").write_text(report.markdown)
        for plot, png in report.plots.items():
            (folder / f"{plot}.png").write_bytes(png)
        print(f"written to {folder}/: summary.md, " + ", ".join(f"{plot}.png" for plot in report.plots))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from kdray.data import load_dataset
    from kdray.deployed import accuracy, load_classifier

    if args.data and args.file:
        raise ConfigError("evaluate: give the experiment file once (FILE or --data FILE)")
    cfg = load_config(args.data or args.file, args.overrides)
    model = load_classifier(args.model, cfg)
    value, count = accuracy(model, load_dataset(cfg.data), args.split, cfg.data)
    print(f"{args.split}/acc {value:.4f}  ({count} images of {cfg.data.name}, {args.model})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from kdray.deployed import export, load_classifier

    overrides = [f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else []
    overrides += [f"store.path={args.store}"] if args.store else []
    model = load_classifier(args.model, load_config(None, overrides))
    export(model, args.fmt, Path(args.out))
    shape = ", ".join(map(str, model.image_shape or ()))
    print(f"wrote {args.out} ({args.fmt}; float images in [0, 1], shape (N, {shape}))")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Check the options (one line naming the bad one), run the measurements, log them if asked."""
    from kdray.bench.options import BenchOptions
    from kdray.bench.runner import run_bench

    only = _check_bench_options(args)
    options = BenchOptions(
        teacher=args.teacher,
        student=args.student,
        batch_size=args.batch_size,
        device=args.device,
        threads=args.threads,
        steps=args.steps,
        rounds=args.rounds,
        search_trials=args.search_trials,
        overrides=tuple(args.overrides),
        data_root=args.data_root,
    )
    results = run_bench(options, only)
    if args.mlflow:
        from kdray.tracking import Tracker, flatten

        tracker = Tracker(default_tracking_uri(), "kdray-bench")
        run = tracker.start_run("bench-" + "-".join(only), {tag.ROLE: "bench"})
        tracker.log_params(run, flatten({"options": results[0]["options"]}))
        for result in results:
            numbers = {
                f"{result['measurement']}/{key}": float(value)
                for key, value in flatten({k: v for k, v in result.items() if k != "options"}).items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            }
            tracker.log_metrics(run, numbers, step=0)
        tracker.end_run(run)
    return 0


def _check_bench_options(args: argparse.Namespace) -> tuple[str, ...]:
    """The measurements asked for, after refusing any bad option in one line that names it."""
    from kdray.bench.options import MEASUREMENTS
    from kdray.models import MODELS

    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = [name for name in only if name not in MEASUREMENTS]
    if unknown or not only:
        raise ConfigError(f"--only: unknown measurement {unknown or only}; choose from {', '.join(MEASUREMENTS)}")
    for flag in ("teacher", "student"):
        if getattr(args, flag) not in MODELS.names():
            raise ConfigError(f"--{flag}: unknown model '{getattr(args, flag)}'; see `kdray models`")
    for flag in ("batch_size", "steps", "rounds", "search_trials", "threads"):
        value = getattr(args, flag)
        if value is not None and value < (2 if flag == "search_trials" else 1):
            raise ConfigError(f"--{flag.replace('_', '-')}: {value} is too small")
    if args.device == "cuda" and not torch_cuda_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    if args.overrides:
        load_config(None, args.overrides)  # a bad override fails here, before any search starts
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise ConfigError(f"--data-root: {args.data_root} is not a folder; give an image folder (train/<class>/...)")
    return only


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
