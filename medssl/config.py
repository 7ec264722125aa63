"""Typed config trees: dataclass defaults, overridden by YAML, overridden by ``key=value``.

Each stage defines its own tree of dataclasses (``pretrain/config.py``, ``finetune/config.py``)
and validates values in ``__post_init__``. This module only knows how to build such a tree
from YAML and overrides, check every key and type on the way, and save the resolved result
with the git SHA so a run dir always says exactly what ran.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from medssl.errors import ConfigError

T = TypeVar("T")

#: A YAML file may name another as its base; paths are relative to the including file.
BASE_KEY = "base"


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from its defaults, then the YAML at ``path``, then ``key=value`` overrides.

    Raises ConfigError naming the file and key when anything is unknown or mistyped, before
    any work starts.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml_tree(Path(path))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=100)")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    where = str(path) if path is not None else "defaults"
    return build(cls, tree, where=where)


def read_yaml_tree(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, following ``base:`` includes (the including file wins)."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    merged = read_yaml_tree((path.parent / base).resolve())
    _deep_merge(merged, data)
    return merged


def build(cls: type[T], tree: dict[str, Any], where: str = "config", prefix: str = "") -> T:
    """Construct dataclass ``cls`` from a nested mapping, checking keys and types."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: {prefix or 'config'} must be a mapping, got {tree!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(tree) - set(fields))
    if unknown:
        name = prefix + unknown[0]
        raise ConfigError(
            f"{where}: unknown key {name!r}; valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in tree.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}", where)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {prefix or 'config'}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config tree (tuples become lists), fit for YAML and JSON."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(cfg)


def save_config(cfg: Any, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config, plus ``git_sha`` and any ``extra`` keys, as YAML."""
    data = to_dict(cfg)
    data["git_sha"] = git_sha()
    data.update(extra or {})
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def git_sha() -> str:
    """SHA of the medssl checkout this code runs from, ``+dirty`` if modified, else 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


#: A number in exponent form without a dot (``1e-6``, ``5E3``), which YAML 1.1 leaves a string.
_YAML11_EXPONENT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _check_finite(value: Any, name: str, where: str) -> None:
    """Reject a NaN or infinity anywhere inside a free-form value (e.g. ``model.kwargs``)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{name}.{key}", where)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{name}[{i}]", where)


def _coerce(hint: Any, value: Any, name: str, where: str) -> Any:
    """Check ``value`` against the annotation ``hint``; convert where YAML is looser (int->float)."""
    origin = get_origin(hint)
    args = get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, where, prefix=name + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: {name}: bad value {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and value not in args:
            # YAML 1.1 reads a bare no/off/yes/on as a bool; map it back onto the choice it spells.
            spellings = ("no", "off", "false") if value is False else ("yes", "on", "true")
            value = next((a for a in spellings if a in args), value)
        if value not in args:
            choices = " | ".join(str(a) for a in args)
            raise ConfigError(f"{where}: {name} must be one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value] if value is not None else []
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: {name} needs {len(args)} values, got {value!r}")
            return tuple(_coerce(a, v, f"{name}[{i}]", where) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{name}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name} must be a mapping, got {value!r}")
        _check_finite(value, name, where)
        return dict(value)
    if hint is Any:
        _check_finite(value, name, where)
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {name} must be true or false, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            number = float(value)  # YAML 1.1 reads 1e-6 (no dot) as a string
        else:
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
        if not math.isfinite(number):   # YAML's .inf / .nan: no setting means that
            raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}")
        return number
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: {name} must be a whole number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: {name} must be a string, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where}: {name} must be {hint.__name__}, got {value!r}")
    return value


