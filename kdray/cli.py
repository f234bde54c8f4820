"""The ``kdray`` command line: train, validate, and list methods, models and datasets."""

from __future__ import annotations

import argparse
import logging
import sys

from kdray.config import ConfigError, ExperimentConfig, load_config
from kdray.data import DATASETS, DataError

EXIT_CONFIG = 2


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="experiment YAML file (see experiments/)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. method.temperature=4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdray", description="Knowledge distillation for image classifiers.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the teacher (unless stored) and the student of an experiment")
    _config_args(train)
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

    info = ModelInfo(num_classes=100)
    return "\n".join(
        f"{name:<12} {parameter_count(build_model(name, info)) / 1e6:7.2f}M params (CIFAR-100 head)"
        for name in MODELS.names()
    )


def _list_datasets() -> str:
    return "\n".join(f"{name:<12} {spec.description}" for name, spec in DATASETS.items())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "methods":
        print(_list_methods())
        return 0
    if args.command == "models":
        print(_list_models())
        return 0
    if args.command == "datasets":
        print(_list_datasets())
        return 0
    try:
        cfg: ExperimentConfig = load_config(args.file, args.overrides)
    except ConfigError as error:
        print(f"kdray: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "validate":
        print(cfg.to_yaml(), end="")
        return 0
    return _train(cfg)


def _train(cfg: ExperimentConfig) -> int:
    from kdray.run import describe, run_experiment

    try:
        result = run_experiment(cfg)
    except (ConfigError, DataError) as error:
        kind = "config" if isinstance(error, ConfigError) else "data"
        print(f"kdray: {kind} error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    print(describe(result, cfg))
    return 0
