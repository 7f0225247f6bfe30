"""Typed configuration: defaults < TOML file < environment.

A configuration is a frozen dataclass whose fields are *sections*, each itself a
frozen dataclass of scalar settings. Values come from, in increasing priority,
the dataclass defaults, a TOML file (``[section]`` tables) and environment
variables named ``EDGECASCADE_<SECTION>__<KEY>`` (upper case, double underscore
between section and key). Unknown sections or keys and values of the wrong type
stop start-up with a :class:`~services.errors.ConfigError` that names the
offending setting and where it came from; nothing is silently replaced by a
default. Sections may validate themselves in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from services.errors import ConfigError

ENV_PREFIX = "EDGECASCADE_"

C = TypeVar("C")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def load_config(
    cls: type[C],
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> C:
    """Builds a configuration of type ``cls`` from defaults, a TOML file and the environment.

    Args:
        cls: A frozen dataclass whose fields are section dataclasses.
        path: Optional TOML file.
        env: Environment to read ``EDGECASCADE_*`` variables from (default ``os.environ``).
        overrides: Values that beat the file but not the environment, e.g. a
            tier's own defaults that differ from the shared ones.

    Returns:
        The frozen configuration.

    Raises:
        ConfigError: The file cannot be read or parsed, a section or key is
            unknown, or a value has the wrong type or fails validation.
    """
    env = os.environ if env is None else env
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if overrides:
        layers.append(("defaults", overrides))
    if path is not None:
        layers.append((str(path), _read_toml(path)))
    layers.append(("environment", _env_layer(cls, env)))

    sections = _section_types(cls)
    merged: dict[str, dict[str, tuple[str, Any]]] = {name: {} for name in sections}
    for origin, layer in layers:
        for section, values in layer.items():
            if section not in sections:
                raise ConfigError(
                    f"{origin}: unknown section [{section}]; known sections: {', '.join(sorted(sections))}"
                )
            if not isinstance(values, Mapping):
                raise ConfigError(f"{origin}: [{section}] must be a table")
            for key, value in values.items():
                merged[section][key] = (origin, value)

    built: dict[str, Any] = {}
    for section, section_cls in sections.items():
        built[section] = _build_section(section, section_cls, merged[section])
    try:
        return cls(**built)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a cross-section check in __post_init__
        raise ConfigError(str(exc)) from exc


def env_name(section: str, key: str) -> str:
    """Returns the environment variable that sets ``[section] key``."""
    return f"{ENV_PREFIX}{section.upper()}__{key.upper()}"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc


def _section_types(cls: type[Any]) -> dict[str, type[Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _env_layer(cls: type[Any], env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    sections = _section_types(cls)
    layer: dict[str, dict[str, str]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX) :]:
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        section, key = section.lower(), key.lower()
        if section not in sections:
            # Other tools may share the prefix; only a known section is ours to police.
            continue
        layer.setdefault(section, {})[key] = raw
    return layer


def _build_section(section: str, section_cls: type[Any], values: Mapping[str, tuple[str, Any]]) -> Any:
    hints = typing.get_type_hints(section_cls)
    known = {f.name for f in dataclasses.fields(section_cls)}
    kwargs: dict[str, Any] = {}
    for key, (origin, value) in values.items():
        if key not in known:
            raise ConfigError(f"{origin}: unknown setting [{section}] {key}; known: {', '.join(sorted(known))}")
        kwargs[key] = _coerce(value, hints[key], f"{origin}: [{section}] {key} ({env_name(section, key)})")
    try:
        return section_cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{section}]: {exc}") from exc


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(value, args[0], where)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item, where) for v in items)
    scalar = _SCALARS.get(hint)
    if scalar is None:
        raise ConfigError(f"{where}: unsupported setting type {hint!r}")
    expected, coerce = scalar
    try:
        return coerce(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {expected}, got {value!r}") from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ValueError(value)


def _to_int(value: Any) -> int:
    # bool is an int to Python, never to a config file; a float would be truncated silently.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(value)
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(value)
    return float(value)


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _to_path(value: Any) -> Path:
    return Path(_to_str(value))


# Setting type → (what the message says was expected, the coercion from TOML or environment text).
_SCALARS: dict[Any, tuple[str, Callable[[Any], Any]]] = {
    bool: ("true or false", _to_bool),
    int: ("an integer", _to_int),
    float: ("a number", _to_float),
    str: ("a string", _to_str),
    Path: ("a path", _to_path),
}
