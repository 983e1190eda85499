"""Run configuration for the command line: a YAML or JSON file, then ``--set key=value`` overrides, checked
against the dataclass that the run is built from. Every mistake is a :class:`ConfigError` that says what to fix.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration file, key or value; the CLI prints it on one line and exits with code 2."""


def load_file(path: str | Path | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values, got "
                          f"{type(data).__name__}")
    return data


def apply_overrides(config: dict, overrides: list[str] | None) -> dict:
    """``key=value`` pairs (dotted keys reach into nested mappings); values are parsed as YAML scalars."""
    out = dict(config)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return out


def _expected_type(f: dataclasses.Field) -> str:
    return str(f.type).replace("typing.", "")


def build(cls, values: dict, *, what: str):
    """``cls(**values)`` with unknown keys and wrongly typed values reported by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {what} key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}")
    for name, value in values.items():
        default = fields[name].default
        if default is not dataclasses.MISSING and default is not None and value is not None:
            ok = isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int)
                                                       and not isinstance(value, bool))
            if isinstance(default, bool) != isinstance(value, bool):
                ok = False
            if not ok:
                raise ConfigError(f"{what} key {name!r} must be of type {_expected_type(fields[name])}, got "
                                  f"{value!r} ({type(value).__name__})")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
