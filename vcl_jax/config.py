"""Config helpers: frozen dataclasses as the one config object of a run.

Overrides come from the command line as ``key=value`` strings and are parsed
by the type of the field they replace (ints, floats, bools, strings, tuples
as comma-separated lists, ``none`` for optional fields).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """An unknown preset, key, or impossible setting."""


def to_dict(cfg: Any) -> dict:
    """A JSON-able dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[C], raw: dict, added: dict | None = None,
              retired: dict | None = None) -> C:
    """The inverse of :func:`to_dict`: a config from a saved dict (lists become tuples).

    ``added`` maps fields introduced after ``raw`` was written to the value such runs
    implicitly had, which a missing field takes instead of today's default. ``retired``
    maps removed fields to the one value today's code implements: they are dropped, and a
    run saved with another value is a ConfigError.
    """
    merged = {**(added or {}), **raw}
    for key, value in (retired or {}).items():
        saved = merged.pop(key, value)
        if saved != value:
            raise ConfigError(f"this run was written with {key}={saved!r}, an option since "
                              f"retired (only {value!r} is implemented now)")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()})


_ELEMENT = object()  # the `current` of a tuple's element: "none" is not an element


def _parse(raw: str, current: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if raw.lower() == "none" and (current is None or type(None) in args):
        return None
    if origin is tuple or isinstance(current, tuple):
        elem = args[0] if args else (type(current[0]) if current else str)
        items = [s for s in raw.split(",") if s.strip()]
        return tuple(_parse(s.strip(), _ELEMENT, elem, key) for s in items)
    if type(None) in args:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
    target = hint if isinstance(hint, type) else type(current)
    try:
        if target is bool:
            if raw.lower() in ("1", "true", "yes"):
                return True
            if raw.lower() in ("0", "false", "no"):
                return False
            raise ValueError(raw)
        return target(raw)
    except ValueError as e:
        raise ConfigError(f"{key}={raw!r}: expected {getattr(target, '__name__', target)}") from e


def override(cfg: C, overrides: list[str] | None) -> C:
    """Returns ``cfg`` with ``key=value`` overrides applied.

    Raises:
      ConfigError: a malformed override, an unknown key, or a value of the wrong type.
    """
    if not overrides:
        return cfg
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in fields:
            raise ConfigError(f"unknown config key {key!r}; known: {', '.join(sorted(fields))}")
        changes[key] = _parse(raw.strip(), getattr(cfg, key), hints[key], key)
    return dataclasses.replace(cfg, **changes)


def check_choice(what: str, value: Any, accepted: tuple) -> None:
    """Raises a ConfigError naming ``value`` and the accepted ones, unless accepted.

    A tuple ``value`` is checked element-wise and must not be empty.
    """
    values = value if isinstance(value, tuple) else (value,)
    bad = [v for v in values if v not in accepted]
    if bad or not values:
        shown = ", ".join(map(repr, bad)) if bad else "(none given)"
        raise ConfigError(f"unknown {what} {shown}; accepted: {', '.join(accepted)}")


def checks(conditions: list[tuple[bool, str]]) -> None:
    """Raises a ConfigError with the message of the first condition that does not hold."""
    for ok, msg in conditions:
        if not ok:
            raise ConfigError(msg)


def preset(presets: dict[str, C], name: str) -> C:
    """The named preset, or a ConfigError listing the accepted names."""
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; accepted: {', '.join(presets)}")
    return presets[name]


def diffusion_checks(cfg: Any) -> list[tuple[bool, str]]:
    """The checks both diffusion experiments' configs share: the U-Net's widths, the noise
    schedule, the guidance and the sampler's steps (fields of the same names)."""
    finite = lambda v: v == v and abs(v) != float("inf")  # noqa: E731 - NaN ≠ NaN
    return [
        (cfg.n_feat >= 1, f"n_feat must be ≥ 1, got {cfg.n_feat}"),
        (cfg.embed_dim >= 1, f"embed_dim must be ≥ 1, got {cfg.embed_dim}"),
        (cfg.T >= 1, f"T must be ≥ 1, got {cfg.T}"),
        (0 < cfg.beta_1 <= cfg.beta_T < 1,
         f"need 0 < beta_1 ≤ beta_T < 1, got beta_1={cfg.beta_1}, beta_T={cfg.beta_T}"),
        (getattr(cfg, "sampler", "ddim") != "ddim" or 1 <= cfg.ddim_steps <= cfg.T,
         f"ddim_steps must be in 1..T={cfg.T}, got {cfg.ddim_steps}"),
        (all(finite(getattr(cfg, g)) for g in ("guidance", "eval_guidance", "replay_guidance")
             if hasattr(cfg, g)), "guidance weights must be finite numbers"),
        (cfg.seed >= 0, f"seed must be ≥ 0, got {cfg.seed}"),
    ]
