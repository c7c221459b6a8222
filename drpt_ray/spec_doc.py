"""`drpt-ray config show`: the JobSpec as a commented YAML document, every key with its default and
its description, read from the one schema (drpt_ray/config.py), so it cannot drift from it."""

from __future__ import annotations

import json

from pydantic import BaseModel

from drpt_ray.config import JobSpec, nested_spec

COMMENT_COLUMN = 44


# What a mode needs besides the defaults to be a valid spec (JobSpec's rule: rlhf scores with a reward model).
MODE_MINIMUM = {"sft": {}, "rlvr": {}, "rlhf": {"reward": {"kind": "model"}}}


def spec_yaml(mode: str = "rlvr") -> str:
    """A JobSpec of `mode` with every default, one key per line, each commented with its description."""
    return "\n".join(_lines(JobSpec.model_validate({"mode": mode, **MODE_MINIMUM[mode]}), 0)) + "\n"


def _lines(spec: BaseModel, depth: int) -> list[str]:
    out = []
    for name, field in type(spec).model_fields.items():
        value, about = getattr(spec, name), " ".join((field.description or "").split())
        pad = "  " * depth
        if isinstance(value, BaseModel):
            out.append(_commented(f"{pad}{name}:", about))
            out += _lines(value, depth + 1)
            continue
        nested = nested_spec(field.annotation)
        if value is None and nested is not None:  # an optional section, off by default: say what it holds
            about = f"{about} (a mapping of: {', '.join(nested.model_fields)})"
        out.append(_commented(f"{pad}{name}: {_yaml_value(value)}", about))
    return out


def _yaml_value(value) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    elif isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)  # JSON is YAML: null, true, numbers, quoted strings, flow lists and mappings


def _commented(line: str, about: str) -> str:
    return f"{line:<{COMMENT_COLUMN}} # {about}" if about else line
