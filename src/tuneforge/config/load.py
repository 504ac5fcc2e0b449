"""YAML file + `base:` includes + dotted command-line overrides -> a validated `RunConfig`.

Errors are raised as `ConfigError`, whose message names the file and line, the key path, the bad
value and the fix (with "did you mean ..." for misspelt keys).
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneforge.config.schema import RunConfig
from tuneforge.errors import InputError


class ConfigError(InputError, ValueError):
    """A config that cannot be used; the message is meant for the person who wrote it."""


# ---------------------------------------------------------------------------- reading YAML
def _line_map(text: str, source: Path) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line number; a key given twice in one
    mapping is an error (YAML loaders silently keep the last value, so the first would be ignored)."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                name, line = str(key.value), key.start_mark.line + 1
                if name in seen and name != "<<":
                    dotted = ".".join((*path, name))
                    raise ConfigError(
                        f"{source}:{line}: key '{dotted}' is given twice (first on line "
                        f"{seen[name]}); YAML would silently keep only the last one. "
                        "Delete one of them."
                    )
                seen[name] = line
                sub = (*path, name)
                lines[sub] = line
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, str(i))] = item.start_mark.line + 1
                walk(item, (*path, str(i)))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        lines = _line_map(text, path)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, train: ...)")
    return data, lines


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict]:
    """Read a YAML config, resolving `base: other.yaml` (relative to the file) recursively."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: `base:` include cycle: {' -> '.join(map(str, (*_seen, path)))}")
    data, lines = _read_yaml(path)
    origin = {k: (path, n) for k, n in lines.items()}
    base = data.pop("base", None)
    if base is None:
        return data, origin
    bases = base if isinstance(base, list) else [base]
    merged: dict[str, Any] = {}
    merged_origin: dict = {}
    for b in bases:
        bd, bo = read_config_dict((path.parent / str(b)), (*_seen, path))
        merged = _deep_merge(merged, bd)
        merged_origin.update(bo)
    merged_origin.update(origin)
    return _deep_merge(merged, data), merged_origin


# ---------------------------------------------------------------------------- overrides
def apply_overrides(data: dict[str, Any], overrides: list[str], origin: dict) -> dict[str, Any]:
    """Apply `a.b.c=value` strings; values are parsed as YAML (1e-4 -> float, [a,b] -> list)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        for i, p in enumerate(parts[:-1]):
            if isinstance(node, list) and p.isdigit() and int(p) < len(node):
                node = node[int(p)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is not a section")
            node = node.setdefault(p, {})
        if isinstance(node, list) and parts[-1].isdigit() and int(parts[-1]) < len(node):
            node[int(parts[-1])] = value
        elif isinstance(node, dict):
            node[parts[-1]] = value
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:-1])} is not a section")
        origin[tuple(parts)] = ("command line", item)
    return data


# ---------------------------------------------------------------------------- errors
def _model_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (for did-you-mean suggestions)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        sub = _first_model(field.annotation)
        if sub is None:
            return None
        model = sub
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _where(loc: tuple, origin: dict, source: str) -> str:
    key = tuple(str(p) for p in loc)
    while key and key not in origin:
        key = key[:-1]
    if not key:
        return source
    place, n = origin[key]
    return f"command line override {n!r}" if place == "command line" else f"{place}:{n}"


def format_validation_error(err: ValidationError, origin: dict, source: str) -> str:
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # drop union-branch markers pydantic inserts (e.g. 'str', 'list[str]')
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in {"str", "int", "float"})))
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        where = _where(loc, origin, source)
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc[:-1], RunConfig)
            valid = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
            hint = f"did you mean '{'.'.join(map(str, (*loc[:-1], close[0])))}'? " if close else ""
            out.append(f"{where}: unknown key '{dotted}'. {hint}Valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            out.append(f"{where}: missing required key '{dotted}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            out.append(f"{where}: {dotted}: {msg}{shown}")
    return "invalid config:\n  " + "\n  ".join(out)


# ---------------------------------------------------------------------------- entry point
def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, merge, override and validate a config file. Raises ConfigError with a readable message."""
    data, origin = read_config_dict(path)
    data = apply_overrides(data, list(overrides or []), origin)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin, str(path))) from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (every default filled in)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def write_resolved_config(cfg: RunConfig, run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    out.write_text(dump_config(cfg), encoding="utf-8")
    return out
