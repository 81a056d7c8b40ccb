"""Values from outside — a ``--config`` YAML file, flags — read and converted to the types of the
config fields, before the configs check their ranges (:mod:`xray_dist.config.bounds`)."""

from __future__ import annotations

import difflib
import typing
from typing import Any, Iterable, Literal

import yaml

from xray_dist.config.bounds import field_hints
from xray_dist.errors import ConfigError
from xray_dist.infra import storage


#: Keys that were flags once: the flag that took their place, and how the old values map onto it.
RENAMED = {"mixed_precision": ("precision", "auto stays auto, on is bfloat16 on CPUs and GPUs with it, off is "
                                            "float32")}


def check_keys(keys: Iterable[str], allowed: Iterable[str], source: str, command: str) -> None:
    """Refuse keys of a config file that are not flags of ``xray-dist command``: one line naming
    them, with the nearest flag names (``epoch``: did you mean ``epochs``?)."""
    allowed = sorted(allowed)
    unknown = sorted(set(keys) - set(allowed))
    if not unknown:
        return
    hints = []
    for k in unknown:
        if k in RENAMED and RENAMED[k][0] in allowed:
            hints.append(f"{k}: renamed {RENAMED[k][0]} ({RENAMED[k][1]})")
            continue
        near = difflib.get_close_matches(k, allowed, n=3, cutoff=0.6)
        hints.append(f"{k}: did you mean {' or '.join(near)}?" if near else f"{k}: no flag is close")
    raise ConfigError(unknown[0], f"{source}: unknown keys {unknown}, not flags of `xray-dist {command}` "
                                  f"({'; '.join(hints)}; see `xray-dist {command} --help`)")


def load_yaml_overrides(path: str | None) -> dict[str, Any]:
    """Read a ``--config`` YAML file of flag values (keys spelled like the flags, ``-`` or ``_``)."""
    if not path:
        return {}
    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except (FileNotFoundError, IsADirectoryError):
        raise ValueError(f"--config file not found: {path}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def coerce_scalar(base: type, value: Any) -> Any:
    """``value`` as ``base`` (int, float, str or bool) where the meaning is clear: a number written
    as a string (``'3'``, ``1e-4``) becomes the number, a whole float an int; ``True`` is no number
    and ``2.5`` no int. ``TypeError`` or ``ValueError`` otherwise. The range is
    :func:`~xray_dist.config.bounds.check_fields`'s business."""
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if base in (int, float) and isinstance(value, str):
        return base(value.strip())
    if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if base is bool and isinstance(value, bool):
        return value
    raise TypeError(f"expected {getattr(base, '__name__', base)}, got {value!r}")


def coerce(cls, values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` converted to the types of ``cls``'s fields, where the meaning is clear.

    YAML reads ``1e-4`` as a string (it wants ``1.0e-4``) and a flag file may quote numbers; such
    strings become the field's number. Anything else of the wrong type — ``epochs: ten``, a list
    for a number, a number for a name — is a :class:`ConfigError` naming the key, the value and the
    type expected (``source`` says where the value came from). Ranges are checked by the class.
    """
    hints = field_hints(cls)
    out = {}
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None:
            out[key] = value
            continue
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if optional else hint
        if typing.get_origin(base) is Literal:  # a choice (xray_dist.config.choices): read as its type, checked by cls
            base = type(typing.get_args(base)[0])
        name = getattr(base, "__name__", str(base))
        if value is None and optional:
            out[key] = None
            continue
        if base not in _SCALARS.values():
            out[key] = value  # tuples and nested configs are checked by their own classes
            continue
        try:
            out[key] = coerce_scalar(base, value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"{source}: {key}: expected {name}{' or null' if optional else ''}, "
                                   f"got {value!r}") from None
    return out
