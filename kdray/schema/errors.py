"""A pydantic validation error as the one line kdray prints: ``field: what is wrong (+N more)``."""

from __future__ import annotations

from typing import get_args, get_origin

from pydantic import BaseModel, ValidationError


def one_line(error: ValidationError, model: type[BaseModel], prefix: tuple[str, ...] = ()) -> str:
    """The first problem of validating ``model`` (found at ``prefix`` of the file: ``("method",)`` for a method's
    parameters), fit for one terminal line; an unknown key lists the keys its section takes."""
    issues = error.errors()
    first = issues[0]
    loc = [str(part) for part in first["loc"]]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown key; allowed: {', '.join(allowed_keys(model, loc[:-1]))}"
    elif first["type"] not in ("value_error", "missing") and "input" in first:
        message += f" (got {first['input']!r})"
    more = f" (+{len(issues) - 1} more)" if len(issues) > 1 else ""
    if not prefix and not loc:  # whole-config checks already start their message with the field they concern
        return f"{message}{more}"
    return f"{'.'.join([*prefix, *loc])}: {message}{more}"


def allowed_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """The keys the section at ``path`` of ``model`` takes; a key of a dict section (an entry of
    ``search.space``, whose keys are dotted field names) steps into the dict's value type."""
    for part in path:
        if part not in model.model_fields:  # a key of a dict section: model stays
            continue
        annotation = model.model_fields[part].annotation
        if get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return list(model.model_fields)
