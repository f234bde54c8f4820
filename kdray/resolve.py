"""From an experiment file to a runnable config: overrides applied, the method's own parameters looked up,
every registered name checked (datasets, models, methods, assistants), the data's root resolved.

This layer sits above the registries and below everything that runs: the schema (``kdray.schema``) only
says what a user may write; here it meets what is installed. It happens on the driver before any model,
Ray or MLflow work starts, so a typo costs a second, not a queued GPU job, and every problem is one
``ConfigError`` line naming the field and the fix. Nothing ever writes back into a config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdray.data import DATASETS
from kdray.ladders import assistant_candidates, pick_assistants
from kdray.methods import METHODS, params_model
from kdray.models import require_model
from kdray.models.families import sized_name
from kdray.schema import DEFAULT_METHOD, ConfigError, DataConfig, ExperimentConfig, MethodParams, SearchParam, has_field
from kdray.schema.errors import one_line


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read ``path`` (None = all defaults), apply overrides and validate; ``ConfigError`` on any problem."""
    raw: Any = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"{path}: no such experiment file")
        try:
            raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
                "save the file as UTF-8"
            ) from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: an experiment file is a mapping of sections (data, teacher, ...)")
    overrides = overrides or []
    switched = [item.partition("=")[2].strip() for item in overrides if item.partition("=")[0].strip() == "method.name"]
    if switched and isinstance(raw.get("method"), dict) and raw["method"].get("name", DEFAULT_METHOD) != switched[-1]:
        # Switching method on the command line starts from the new method's defaults: the file's
        # hyperparameters belong to the old method (method.* overrides still apply).
        raw = {**raw, "method": {}}
    return validate_config(apply_overrides(raw, overrides))


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """The runnable config of a file's mapping (or of ``ExperimentConfig.dump()``); ``ConfigError`` otherwise."""
    resolved = {**raw, "method": _method_params(raw.get("method", {}))}
    if "data" not in raw or isinstance(raw["data"], dict):
        resolved["data"] = _with_dataset_defaults(raw.get("data") or {})
    try:
        cfg = ExperimentConfig.model_validate(resolved)
    except ValidationError as error:
        raise ConfigError(one_line(error, ExperimentConfig)) from None
    try:
        return _check_registered(cfg)
    except ConfigError:
        raise
    except ValueError as error:  # the ladders' and models' own messages name their field
        raise ConfigError(str(error)) from None


def _method_params(value: Any) -> MethodParams:
    """``{"name": ..., fields}`` (name defaults to kd) as that method's own parameter model."""
    if not isinstance(value, dict):
        raise ConfigError("method: a mapping such as {name: kd, temperature: 4}")
    name = value.get("name", DEFAULT_METHOD)
    try:
        model = params_model(name)
    except ValueError as error:
        raise ConfigError(f"method.name: {error}") from None
    try:
        return model.model_validate({**value, "name": name})
    except ValidationError as error:
        raise ConfigError(one_line(error, model, ("method",))) from None


def _with_dataset_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """The data section with the dataset's augmentation defaults (no flip for digits) where the file leaves them."""
    name = data.get("name", "digits")
    if not isinstance(name, str):
        return data  # the schema names the problem
    try:
        spec = DATASETS[name]
    except ValueError as error:
        raise ConfigError(f"data.name: {error}") from None
    augment = data.get("augment") or {}
    if not isinstance(augment, dict):
        return data
    resized = augment.get("kind") == "random_resized_crop"
    defaults = {"padding": 0 if resized else spec.padding, "flip": spec.flip}
    return {**data, "augment": {**defaults, **augment}}


def _check_registered(cfg: ExperimentConfig) -> ExperimentConfig:
    """The checks that ask a registry, in the order of the sections; the config with its data root resolved."""
    cfg = cfg.model_copy(update={"data": _resolved_data(cfg.data), **_sized_models(cfg)})
    for field, name in [
        ("teacher.name", cfg.teacher.name),
        ("student.name", cfg.student.name),
        *((f"assistants.models.{i}", name) for i, name in enumerate(cfg.assistants.models)),
    ]:
        try:
            require_model(name)
        except ValueError as error:
            raise ConfigError(f"{field}: {error}") from None
    _check_assistants(cfg)
    if cfg.scaling.parallelism == "branches":
        _check_branch_parallel(cfg)
    _check_search_methods(cfg)
    _check_search_fields(cfg)
    return cfg


def _sized_models(cfg: ExperimentConfig) -> dict[str, Any]:
    """The teacher and student whose ``depth``/``width`` are set, with those folded into their name."""
    sized: dict[str, Any] = {}
    for role in ("teacher", "student"):
        section = getattr(cfg, role)
        if section.depth is None and section.width is None:
            continue
        try:
            name = sized_name(section.name, section.depth, section.width)
        except ValueError as error:
            knob = "depth" if section.depth is not None else "width"
            raise ConfigError(f"{role}.{knob}: {error}") from None
        sized[role] = section.model_copy(update={"name": name, "depth": None, "width": None})
    return sized


def _resolved_data(data: DataConfig) -> DataConfig:
    """``data.root`` checked against what its dataset needs and made absolute; the loader against the dataset."""
    spec = DATASETS[data.name]
    root = data.root
    if root is None:
        if spec.needs_root:
            raise ConfigError(f"data.root: dataset '{data.name}' needs data.root (a folder or .tar.gz path)")
    elif "://" in root:
        raise ConfigError(
            f"data.root: '{root}': kdray reads data through the file system; mount the bucket at the same path on "
            "every node (e.g. mountpoint-s3 or gcsfuse) and give that path"
        )
    else:
        path = Path(root).expanduser()
        if not path.exists() and not (data.download and spec.needs_root):
            raise ConfigError(f"data.root: '{root}' does not exist; give the path of the {data.name} data")
        problem = spec.check_root(path, data.download)
        if problem:
            raise ConfigError(f"data.root: {problem}")
        root = str(path.resolve()) if path.exists() else root
    streams = spec.stream is not None
    if data.loader == "stream" and not streams:
        raise ConfigError(
            f"data: data.loader=stream reads image folders (data.name=imagefolder) and '{data.name}' is read whole; "
            "set data.loader=memory or auto"
        )
    if data.augment.kind == "random_resized_crop" and (not streams or data.loader == "memory"):
        raise ConfigError(
            "data: augment.kind=random_resized_crop crops the original images, which only a streamed image folder "
            "reads: use data.name=imagefolder with data.loader=stream or auto"
        )
    if data.augment.eval_crop != 1.0 and not streams:
        raise ConfigError(
            "data: augment.eval_crop crops image folders as they are decoded at data.image_size: set "
            "data.image_size and data.name=imagefolder, or leave eval_crop at 1.0"
        )
    return data.model_copy(update={"root": root})


def _check_assistants(cfg: ExperimentConfig) -> None:
    """Assistants only for methods that use them, and then enough of them on the ladder."""
    if METHODS[cfg.method.name].uses_assistants:
        pick_assistants(cfg.teacher.name, cfg.student.name, cfg.assistants)
        ladder, source = assistant_candidates(cfg.teacher.name, cfg.student.name, cfg.assistants)
        unknown = [name for name in cfg.assistants.weights if name not in ladder]
        if unknown:
            raise ConfigError(
                f"assistants.weights: {', '.join(unknown)} is not among the assistants to pick from "
                f"({source}: {', '.join(ladder) or 'none'})"
            )
    elif cfg.assistants.depth or cfg.assistants.models or cfg.assistants.weights:
        users = [name for name, method in METHODS.items() if method.uses_assistants]
        raise ConfigError(f"assistants: only {', '.join(users)} use assistants; remove the section")


def _check_branch_parallel(cfg: ExperimentConfig) -> None:
    count = METHODS[cfg.method.name].branch_count(cfg.method)
    if count is None:
        ensembles = [name for name, cls in METHODS.items() if cls.branch_count(cls.Params()) is not None]
        raise ConfigError(
            f"scaling.parallelism=branches: method '{cfg.method.name}' has no branches; "
            f"use one of {', '.join(ensembles)} or scaling.parallelism=data"
        )
    if cfg.scaling.num_workers != count:
        raise ConfigError(
            f"scaling.num_workers: parallelism=branches needs one worker per branch; set it to {count} "
            f"(the method's {count} branches)"
        )


def _check_search_methods(cfg: ExperimentConfig) -> None:
    """Every method a search names (its references, a range's ``methods``) is registered."""
    named = [(f"search.references.{i}", name) for i, name in enumerate(cfg.search.references)]
    for key, param in cfg.search.space.items():
        named += [(f"search.space.{key}.methods.{i}", name) for i, name in enumerate(param.methods or [])]
    for field, name in named:
        try:
            METHODS.require(name)
        except ValueError as error:
            raise ConfigError(f"{field}: {error}") from None


def _check_search_fields(cfg: ExperimentConfig) -> None:
    """Every searched key is a config field; a method.* key is a field of at least one searched method."""
    space = cfg.search.space
    methods = [cfg.method.name]
    if "method.name" in space:
        methods = [str(v) for v in space["method.name"].values or []]
        unknown = [m for m in methods if m not in METHODS]
        if space["method.name"].kind != "choice" or unknown:
            raise ConfigError(f"search.space: method.name must be a choice of: {', '.join(METHODS.names())}")
    for key, param in space.items():
        if key == "method.name":
            continue
        if key.startswith("method."):
            field = key.removeprefix("method.")
            owners = [m for m in methods if field in METHODS[m].Params.model_fields]
            if not owners:
                raise ConfigError(f"search.space: '{key}' is not a parameter of {', '.join(methods)}")
            outside = [m for m in param.methods or [] if m not in methods]
            if outside:
                raise ConfigError(f"search.space: {key}.methods names {', '.join(outside)}, which is not searched")
        elif not has_field(cfg, key):
            raise ConfigError(f"search.space: '{key}' is not a config field (use dotted names like method.temperature)")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``section.field=value`` pairs on a raw config dict; values are parsed as YAML scalars."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': write section.field=value, e.g. method.temperature=4")
        values[key.strip()] = yaml.safe_load(text) if text.strip() else None
    return set_fields(raw, values)


def set_fields(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with ``{"section.field": value}`` set (the nested dicts on the way are copied)."""
    result = {key: (dict(value) if isinstance(value, dict) else value) for key, value in raw.items()}
    for key, value in values.items():
        parts = _field_path(key)
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return result


def _field_path(key: str) -> list[str]:
    """The nested keys of a dotted name. Search-space entries are themselves dotted (``method.margin``), so
    under ``search.space`` the entry is everything up to a parameter field: ``search.space.method.margin.low``
    is ``["search", "space", "method.margin", "low"]``, ``search.space.method.margin`` the entry itself."""
    parts = key.split(".")
    if parts[:2] != ["search", "space"] or len(parts) < 4:
        return parts
    if parts[-1] in SearchParam.model_fields:
        return ["search", "space", ".".join(parts[2:-1]), parts[-1]]
    return ["search", "space", ".".join(parts[2:])]
