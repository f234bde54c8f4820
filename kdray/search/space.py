"""The search space as an Optuna define-by-run function, with conditional parameters.

A parameter is sampled only in trials where it means something: ``method.margin`` only when the
trial's method has a ``margin`` field (triplet), ``method.alpha`` only for the methods listed in its
``methods`` entry (kd's alpha is a loss weight, stkd's a Beta concentration), ``assistants.*`` only
for chain methods. When ``method.name`` itself is searched, a method's parameters get Optuna names
prefixed by the method (``stkd:method.alpha``), so the sampler never mixes two meanings of one name.

``sample`` must stay a module-level function of an importable module: Tune pickles the space with
the searcher, and ``Tuner.restore`` unpickles it in a new process.
"""

from __future__ import annotations

from typing import Any

from kdray.methods import METHODS
from kdray.resolve import set_fields, validate_config
from kdray.schema import ConfigError, ExperimentConfig, SearchParam


def candidate_methods(cfg: ExperimentConfig) -> list[str]:
    """The methods the search may pick: the choices of ``method.name``, or the experiment's method."""
    param = cfg.search.space.get("method.name")
    return [str(v) for v in param.values or []] if param is not None else [cfg.method.name]


def applies(key: str, param: SearchParam, method: str) -> bool:
    """Whether ``key`` exists in a trial whose method is ``method``."""
    if key.startswith("method."):
        owns = key.removeprefix("method.") in METHODS[method].Params.model_fields
        return owns and (param.methods is None or method in param.methods)
    if key.startswith("assistants."):
        return METHODS[method].uses_assistants
    return True


def optuna_name(key: str, method: str, method_searched: bool) -> str:
    return f"{method}:{key}" if method_searched and key.startswith("method.") else key


def sampled_text(sampled: dict[str, Any]) -> str:
    """A trial's sampled values as people read them: ``temperature=4.2 margin=5`` (the method apart)."""
    return " ".join(
        f"{key.rsplit('.', 1)[-1]}={f'{value:.3g}' if isinstance(value, float) else value}"
        for key, value in sampled.items()
        if key != "method.name"
    )


def trial_label(method: str, sampled: dict[str, Any], trial_id: str) -> str:
    """A trial's name in MLflow and in reports: method, sampled values, and the short Tune id the live
    progress table shows (``triplet temperature=1.3 margin=5 (c4a22fcf)``)."""
    words = [method, sampled_text(sampled), f"({trial_id.rsplit('_', 1)[-1]})"]
    return " ".join(word for word in words if word)


def suggest(trial: Any, name: str, param: SearchParam) -> Any:
    if param.kind == "choice":
        return trial.suggest_categorical(name, param.values)
    if param.kind == "int":
        return trial.suggest_int(name, int(param.low), int(param.high), step=int(param.step or 1))  # type: ignore[arg-type]
    return trial.suggest_float(name, param.low, param.high, log=param.kind == "logfloat", step=param.step)


def sample(trial: Any, space: dict[str, Any], method: str) -> dict[str, Any]:
    """Define-by-run space: returns ``{"overrides": {dotted key: value}}`` for one trial.

    ``space`` is ``search.space`` as plain data and ``method`` the experiment's own method.
    """
    params = {key: SearchParam.model_validate(value) for key, value in space.items()}
    overrides: dict[str, Any] = {}
    searched = "method.name" in params
    if searched:
        method = trial.suggest_categorical("method.name", params["method.name"].values)
        overrides["method.name"] = method
    for key, param in params.items():
        if key != "method.name" and applies(key, param, method):
            overrides[key] = suggest(trial, optuna_name(key, method, searched), param)
    return {"overrides": overrides}


def trial_config(base: dict[str, Any], overrides: dict[str, Any]) -> ExperimentConfig:
    """The experiment a trial runs: the base config with its sampled values (a new method starts from
    that method's defaults, as ``method.name=...`` does on the command line)."""
    raw = dict(base)
    if overrides.get("method.name", base["method"]["name"]) != base["method"]["name"]:
        raw["method"] = {}
    return validate_config(set_fields(raw, overrides))


def default_points(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """One Optuna point per candidate method holding its default values, evaluated first: the search
    then reports how much it beats the defaults (the experiment's values for its own method, the
    method's defaults for the others)."""
    space = cfg.search.space
    searched = "method.name" in space
    points = []
    for method in candidate_methods(cfg):
        defaults = cfg.method if method == cfg.method.name else METHODS[method].Params()
        base = cfg.dump()
        point: dict[str, Any] = {"method.name": method} if searched else {}
        for key, param in space.items():
            if key == "method.name" or not applies(key, param, method):
                continue
            if key.startswith("method."):
                value = getattr(defaults, key.removeprefix("method."))
            else:
                value = base
                for part in key.split("."):
                    value = value[part]
            if not within(param, value):
                break  # the default lies outside the searched range: not a point Optuna can evaluate
            point[optuna_name(key, method, searched)] = value
        else:
            points.append(point)
    return points[: cfg.search.num_samples]


def within(param: SearchParam, value: Any) -> bool:
    """Whether ``value`` is one the searched parameter can take."""
    if param.kind == "choice":
        return value in (param.values or [])
    if value is None or param.low is None or param.high is None or not param.low <= value <= param.high:
        return False
    steps = (value - param.low) / param.step if param.step else 0.0
    return abs(steps - round(steps)) < 1e-9  # on the grid


def check_space(cfg: ExperimentConfig) -> None:
    """Every end of every range must give a valid experiment for every method it applies to; the
    first that does not is a one-line ``ConfigError`` before anything starts. The scheduler must fit the budget."""
    scheduler = cfg.search.scheduler
    max_t = scheduler.max_t or cfg.train.epochs
    if scheduler.name == "asha" and scheduler.grace_period > max_t:
        raise ConfigError(
            f"search.scheduler.grace_period: {scheduler.grace_period} epochs exceed the {max_t} a trial runs "
            "(train.epochs or search.scheduler.max_t); lower it"
        )
    check_objectives(cfg)
    base = cfg.dump()
    for overrides in corners(cfg):
        try:
            trial_config(base, overrides)
        except ConfigError as error:
            method, (key, value) = overrides["method.name"], list(overrides.items())[-1]
            raise ConfigError(f"search.space.{key}: {value!r} is invalid for method {method} ({error})") from None


def check_objectives(cfg: ExperimentConfig) -> None:
    """One line, before anything starts, for constraints without objectives or a scheduler that cannot serve
    several objectives (``kdray.search.objectives``)."""
    search = cfg.search
    if search.constraints and not search.objectives:
        raise ConfigError("search.constraints: bound the front of several objectives; give search.objectives too")
    if search.objectives and search.scheduler.name == "asha":
        raise ConfigError(
            "search.scheduler: ASHA stops trials on one metric, which would stop students that could be on the front "
            "of several objectives; set search.scheduler.name=none"
        )


def corners(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """The trials at the edges of the space, as overrides: every candidate method at its defaults, then with
    each of its parameters at each end of its range (or each choice), the others at the experiment's values.

    A value that enters a config's validity or a model's identity shows at one of these: ``check_space``
    validates them, and shared guides (``kdray.search.shared``) are the ones all of them plan alike."""
    found: list[dict[str, Any]] = []
    for method in candidate_methods(cfg):
        found.append({"method.name": method})
        for key, param in cfg.search.space.items():
            if key == "method.name" or not applies(key, param, method):
                continue
            ends = param.values if param.kind == "choice" else [param.low, param.high]
            found += [{"method.name": method, key: int(v) if param.kind == "int" else v} for v in ends or []]
    return found
