"""Typed config trees: dataclass defaults, overridden by YAML, overridden by ``key=value``.

Each stage defines its own tree of plain dataclasses (``pretrain/config.py``,
``finetune/config.py``) and validates values in ``__post_init__``. This module builds such a
tree from YAML and overrides and saves the resolved result with the git SHA, so a run dir
always says exactly what ran.

Validation and coercion are pydantic v2's (``TypeAdapter`` over the stdlib dataclasses: nested
sections, ``Literal`` choices, unions, tuples of fixed length, int -> float, ``__post_init__``
called after the fields are checked). pydantic rather than OmegaConf structured configs
because the trees use ``Literal``, ``X | bool`` and ``tuple[float, float] | None`` fields,
which OmegaConf 2.3 cannot type, and would need rewriting as Enums.

What stays here is what no library knows: the YAML side. Unknown keys are refused with the
keys valid at that level (pydantic's message would not list them); YAML 1.1 reads a bare
``no``/``yes`` as a bool and ``1e-6`` (no dot) as a string, so a choice field takes the choice
a bool spells and a float field the number a string spells; a bool is never a number; a
number given to a string field is that string (``run_name: 2024``); and every float must be
finite (``train.lr=.inf`` is refused).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import re
import subprocess
import tokenize
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import TypeAdapter, ValidationError

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
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        _set_dotted(tree, key.strip(), value)
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
    tree = _yaml_side(cls, tree, prefix.rstrip("."), where)
    try:
        return _adapter(cls).validate_python(tree)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_explain(cls, exc.errors()[0], prefix)}") from None
    except ConfigError as exc:   # raised by a __post_init__: it names its key already
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config tree (tuples become lists), fit for YAML and JSON."""
    return _adapter(type(cfg)).dump_python(cfg, mode="json")


def save_config(cfg: Any, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config, plus ``git_sha`` and any ``extra`` keys, as YAML."""
    from medssl.io import atomic_write_text

    data = to_dict(cfg)
    data["git_sha"] = git_sha()
    data.update(extra or {})
    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))


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


# --- describing a tree (for --help) ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key for help text: dotted ``key``, its ``default`` and a one-line ``meaning``."""

    key: str
    default: Any
    meaning: str


def describe(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of a config tree with its default and meaning, in declaration order.

    The meaning is the field's own comment in the source (``x: int = 1  # what x is``, or the
    comment lines above it), so help text is never written twice.
    """
    comments = _field_comments(cls)
    hints = get_type_hints(cls)
    out: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out += describe(hints[f.name], key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append(KeyDoc(key, _plain(default), comments.get(f.name, "")))
    return out


@functools.cache
def _field_comments(cls: type) -> dict[str, str]:
    """field -> its comment: the one on its own line (``x: int = 1  # ...``), else the comment
    lines right above it."""
    import inspect

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    above: dict[str, str] = {}
    pending: list[str] = []          # comment lines waiting for the field below them
    line_field: dict[int, str] = {}
    for line_no, line in enumerate(source.splitlines(), start=1):
        match = re.match(r"\s{4}(\w+)\s*:", line)
        if match and match.group(1) in names:
            line_field[line_no] = match.group(1)
            if pending:
                above[match.group(1)] = " ".join(pending)
            pending = []
        elif re.match(r"\s{4}#", line):
            pending.append(line.strip().lstrip("#:").strip())
        else:
            pending = []
    trailing: dict[str, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            trailing.setdefault(line_field[tok.start[0]], tok.string.lstrip("#").strip())
    return {**above, **trailing}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


# --- internals ------------------------------------------------------------------------------


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


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


def _members(hint: Any) -> tuple[Any, ...]:
    """The alternatives of a union annotation (``(hint,)`` for anything else)."""
    if get_origin(hint) in (Union, types.UnionType):
        return get_args(hint)
    return (hint,)


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


def _yaml_side(hint: Any, value: Any, name: str, where: str) -> Any:
    """What YAML gets wrong, fixed before pydantic sees the value (see module docstring)."""
    members = _members(hint)
    if value is None:
        return value
    if any(m is Any or get_origin(m) is dict for m in members):
        _check_finite(value, name, where)   # free-form: no typed field will look inside
    for member in members:
        if dataclasses.is_dataclass(member):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name or 'config'} must be a mapping, got {value!r}")
            fields = {f.name: f for f in dataclasses.fields(member) if f.init}
            unknown = sorted(set(value) - set(fields))
            if unknown:
                raise ConfigError(f"{where}: unknown key {_join(name, unknown[0])!r}; valid keys "
                                  f"here: {', '.join(sorted(fields))}")
            hints = get_type_hints(member)
            return {k: _yaml_side(hints[k], v, _join(name, k), where) for k, v in value.items()}
    origins = {get_origin(m) for m in members}
    if origins & {list, tuple} and not isinstance(value, (list, tuple, dict)):
        value = [value]    # a scalar where a list goes: a list of one
    if isinstance(value, (list, tuple)):
        seq = next((m for m in members if get_origin(m) in (list, tuple)), None)
        if seq is None:
            return value
        args = get_args(seq)
        if get_origin(seq) is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: {name} needs {len(args)} values, got {list(value)!r}")
            return [_yaml_side(a, v, f"{name}[{i}]", where) for i, (a, v) in enumerate(zip(args, value))]
        item = args[0] if args else Any
        return [_yaml_side(item, v, f"{name}[{i}]", where) for i, v in enumerate(value)]
    literals = [a for m in members if get_origin(m) is Literal for a in get_args(m)]
    if isinstance(value, bool) and literals and value not in literals:
        # YAML 1.1 reads a bare no/off/yes/on as a bool; map it back onto the choice it spells.
        spellings = ("no", "off", "false") if value is False else ("yes", "on", "true")
        value = next((a for a in spellings if a in literals), value)
    numeric = [m for m in members if m in (int, float)]
    if numeric and isinstance(value, bool) and bool not in members and not literals:
        raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
    if float in members and isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
        value = float(value)   # YAML 1.1 reads 1e-6 (no dot) as a string
    if float in members and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}")
    if str in members and not numeric and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


#: pydantic error types -> the words our messages use.
_WORDS = {
    "int_type": "must be a whole number", "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number", "float_type": "must be a number",
    "float_parsing": "must be a number", "finite_number": "must be a finite number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "string_type": "must be a string", "list_type": "must be a list",
    "tuple_type": "must be a list", "dict_type": "must be a mapping",
    "dataclass_type": "must be a mapping", "missing": "is missing a value",
}


def _explain(cls: type, error: dict, prefix: str) -> str:
    """One line for pydantic's first error: the dotted key, what it must be, what it got."""
    hint: Any = cls
    parts: list[str] = [prefix.rstrip(".")] if prefix else []
    field_hint: Any = None
    for loc in error["loc"]:
        dc = next((m for m in _members(hint) if dataclasses.is_dataclass(m)), None)
        if dc is not None and isinstance(loc, str) and loc in {f.name for f in dataclasses.fields(dc)}:
            hint = field_hint = get_type_hints(dc)[loc]
            parts.append(loc)
        elif isinstance(loc, int):
            parts[-1] = f"{parts[-1]}[{loc}]" if parts else f"[{loc}]"
            seq = next((m for m in _members(hint) if get_origin(m) in (list, tuple)), None)
            hint = (get_args(seq) or (Any,))[0] if seq is not None else Any
        # other loc entries name a union member (e.g. "float", "literal[...]"): not a key
    name = ".".join(parts) or "config"
    kind = error["type"]
    if kind == "literal_error":
        choices = [a for m in _members(field_hint) if get_origin(m) is Literal for a in get_args(m)]
        return f"{name} must be one of {' | '.join(map(str, choices))}, got {error.get('input')!r}"
    words = _WORDS.get(kind, error["msg"].lower())
    return f"{name} {words}, got {error.get('input')!r}"
