"""Configuration: the packaged JSON schema (config.schema.yaml) holds every default; this module
fills them in and validates, for CLI runs outside Snakemake (which validates the same schema)."""
from __future__ import annotations

import copy
import dataclasses
import difflib
from pathlib import Path

import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


def schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _fill(node: dict, data: dict) -> dict:
    for key, sub in node.get("properties", {}).items():
        if key not in data and "default" in sub:
            data[key] = copy.deepcopy(sub["default"])
        if sub.get("type") == "object" and isinstance(data.get(key), dict):
            _fill(sub, data[key])
    return data


def unknown_keys(cfg: dict, node: dict | None = None, prefix: str = "") -> list[str]:
    """One message per key of `cfg` that the schema does not define, naming the closest valid key
    (difflib) where one is close, e.g. "cluster.refine_restart (did you mean cluster.refine_restarts?)"."""
    node = schema() if node is None else node
    props = node.get("properties", {})
    problems = []
    for key, value in (cfg or {}).items():
        if key not in props:
            close = difflib.get_close_matches(str(key), list(props), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (valid keys here: {', '.join(props)})"
            problems.append(f"{prefix}{key}{hint}")
        elif props[key].get("type") == "object" and isinstance(value, dict):
            problems += unknown_keys(value, props[key], f"{prefix}{key}.")
    return problems


def reject_unknown_keys(cfg: dict) -> None:
    """Raise ValueError naming every key of `cfg` the schema does not define (a typo would
    otherwise leave the intended key at its default without a word)."""
    problems = unknown_keys(cfg)
    if problems:
        raise ValueError("unknown configuration key" + ("s" if len(problems) > 1 else "") + ": " + "; ".join(problems))


def with_defaults(cfg: dict | None) -> dict:
    """A validated copy of `cfg` with every schema default filled in; unknown keys are refused."""
    import jsonschema

    reject_unknown_keys(cfg or {})
    data = _fill(schema(), copy.deepcopy(cfg or {}))
    try:
        jsonschema.validate(data, schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ValueError(f"invalid configuration at {where}: {e.message}") from None
    return data


def load_config(path=None) -> dict:
    """Read a YAML config (safe_load) and fill defaults; None gives the defaults alone."""
    cfg = {}
    if path:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    return with_defaults(cfg)


def dataclass_from_dict(cls, d: dict | None):
    """An instance of the dataclass `cls` from the keys of `d` it has fields for (others ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (d or {}).items() if k in names})
