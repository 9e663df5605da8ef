"""Typed, frozen experiment configs with dotted command-line overrides.

A config is a frozen `dataclasses.dataclass` whose fields are plain values (int, float,
bool, str, None), tuples of them, or nested config dataclasses. Each package keeps named
presets (`tiny`, `small`, `paper`) as a mapping from name to a zero-argument factory.

    cfg = get_preset(PRESETS, "tiny")
    cfg = override(cfg, ["model.depth=4", "optim.learning_rate=3e-4", "seeds=(0,1,2)"])
    (run_dir / "config.json").write_text(to_json(cfg))
    assert from_json(type(cfg), to_json(cfg)) == cfg

Every override is parsed to the declared type of its field; an unknown key or a value
that does not parse raises `ConfigError` naming the key and listing what is valid.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

Cfg = TypeVar("Cfg")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ConfigError(ValueError):
    """A config key or value that does not fit the config's declared fields."""


def _field_types(cls: type) -> dict[str, Any]:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"expected a dataclass type, got {cls!r}")
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_config_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(tp)
    return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Converts `value` (a string from the CLI or a JSON value) to the field type `tp`."""
    if tp is Any:
        return value
    union = _union_args(tp)
    if union is not None:
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null"}):
            if type(None) in union:
                return None
        errors = []
        for option in union:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: cannot parse {value!r} as {_type_name(tp)}")
    if _is_config_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, prefix=f"{key}.")
        raise ConfigError(
            f"{key}: is a nested config ({tp.__name__}); set its fields with "
            f"{key}.<field>=value, valid fields: {sorted(_field_types(tp))}"
        )
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            if text in {"", "()"}:
                items: Sequence[Any] = ()
            else:
                try:
                    parsed = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    parsed = tuple(part.strip() for part in text.strip("()[]").split(","))
                items = parsed if isinstance(parsed, (tuple, list)) else (parsed,)
        elif isinstance(value, (tuple, list)):
            items = value
        else:
            raise ConfigError(f"{key}: expected a tuple ({_type_name(tp)}), got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
        if args and len(args) != len(items):
            raise ConfigError(
                f"{key}: expected {len(args)} items ({_type_name(tp)}), got {value!r}"
            )
        if not args:
            return tuple(items)
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(items, args, strict=True))
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got the bool {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    as_float = None
                if as_float is not None and as_float.is_integer():
                    return int(as_float)
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a float, got the bool {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a str, got {value!r}")
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null"}):
            return None
        raise ConfigError(f"{key}: expected None, got {value!r}")
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            try:
                if _coerce(value, type(choice), key) == choice:
                    return choice
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def require(cfg: Any, field: str, ok: bool, expected: str) -> None:
    """Raises `ValueError("<Class>.<field>=<value>: expected <expected>")` unless `ok`.

    The one validator of every config's `__post_init__`, so each bad value is reported the
    same way: the config, the field, the value given and what was expected.
    """
    if not ok:
        raise ValueError(
            f"{type(cfg).__name__}.{field}={getattr(cfg, field)!r}: expected {expected}"
        )


def valid_keys(cls_or_cfg: Any, prefix: str = "") -> dict[str, str]:
    """Every dotted key of a config (class or instance) mapped to its type's name."""
    cls = cls_or_cfg if isinstance(cls_or_cfg, type) else type(cls_or_cfg)
    keys: dict[str, str] = {}
    for name, tp in _field_types(cls).items():
        if _is_config_type(tp):
            keys.update(valid_keys(tp, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = _type_name(tp)
    return keys


def _unknown_key(cfg: Any, key: str) -> ConfigError:
    listing = "\n".join(f"  {k}: {t}" for k, t in valid_keys(cfg).items())
    return ConfigError(
        f"unknown config key {key!r} for {type(cfg).__name__}; valid keys:\n{listing}"
    )


def _apply(cfg: Any, tree: Mapping[str, Any], prefix: str, root: Any) -> Any:
    """Applies a nested {field: value | subtree} mapping to `cfg` with ONE `replace` per
    dataclass, so a `__post_init__` that relates several fields sees them all changed at
    once (e.g. `stage1_epochs` and `stage2_epochs` that must sum to a total)."""
    types_ = _field_types(type(cfg))
    changes = {}
    for name, value in tree.items():
        key = prefix + name
        if name not in types_:
            raise _unknown_key(root, key)
        if isinstance(value, _Subtree):
            child = getattr(cfg, name)
            if not dataclasses.is_dataclass(child):
                raise _unknown_key(root, key + "." + next(iter(value)))
            changes[name] = _apply(child, value, key + ".", root)
        else:
            changes[name] = _coerce(value, types_[name], key)
    try:
        return dataclasses.replace(cfg, **changes)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or type(root).__name__}: {err}") from err


class _Subtree(dict):
    """Overrides below one nested config field (distinguishes them from dict values)."""


def override(cfg: Cfg, overrides: Sequence[str] | Mapping[str, Any]) -> Cfg:
    """Returns `cfg` with dotted overrides applied, each parsed to its field's type.

    All overrides of one nested config are applied together, so validation that relates
    several fields runs once on the final values.

    Args:
      cfg: a frozen config dataclass instance.
      overrides: `["a.b.c=value", ...]` strings (as from `--set`) or a mapping of dotted
        keys to values.
    Raises:
      ConfigError: on a malformed override, an unknown key (the message lists the valid
        keys and their types), a value that does not parse to the field's type, or values
        the config's own validation rejects.
    """
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        for text in overrides:
            if "=" not in text:
                raise ConfigError(f"override {text!r} is not of the form key=value")
            key, value = text.split("=", 1)
            items.append((key.strip(), value))
    tree = _Subtree()
    for key, value in items:
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override with an empty key part: {key}={value!r}")
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, _Subtree())
            if not isinstance(child, _Subtree):
                raise ConfigError(f"override {key!r} conflicts with {'.'.join(parts[: i + 1])!r}")
            node = child
        if isinstance(node.get(parts[-1]), _Subtree):
            raise ConfigError(f"override {key!r} conflicts with overrides of its fields")
        node[parts[-1]] = value  # a later override of the same key wins
    return _apply(cfg, tree, "", cfg)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready nested dict of a config (tuples become lists)."""
    return json.loads(to_json(cfg))


def to_json(cfg: Any, indent: int | None = 2) -> str:
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise ConfigError(f"expected a config dataclass instance, got {cfg!r}")
    return json.dumps(dataclasses.asdict(cfg), indent=indent, sort_keys=False)


def from_dict(cls: type[Cfg], data: Mapping[str, Any], prefix: str = "") -> Cfg:
    """Builds `cls` from a nested mapping, type-checking every value; missing keys keep
    their defaults, unknown keys raise `ConfigError`."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
            f"valid keys: {sorted(prefix + k for k in types_)}"
        )
    kwargs = {name: _coerce(value, types_[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field with no default was missing
        raise ConfigError(f"cannot build {cls.__name__} from {sorted(data)}: {err}") from err


def from_json(cls: type[Cfg], text: str) -> Cfg:
    return from_dict(cls, json.loads(text))


def get_preset(presets: Mapping[str, Callable[[], Cfg]], name: str) -> Cfg:
    """The config made by the preset `name`; an unknown name lists the presets."""
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {sorted(presets)}")
    return presets[name]()


def add_config_args(parser: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    """Adds `--preset NAME` and repeatable `--set key=value` to an argparse parser."""
    parser.add_argument("--preset", default=default_preset, help="named config preset")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted key, e.g. --set model.depth=4 (repeatable)",
    )


def config_from_args(presets: Mapping[str, Callable[[], Cfg]], args: argparse.Namespace) -> Cfg:
    """The preset named by `args.preset` with `args.overrides` applied."""
    return override(get_preset(presets, args.preset), args.overrides)
