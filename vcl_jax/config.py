"""Config helpers: frozen dataclasses as the one config object of a run.

Overrides come from the command line as ``key=value`` strings and are parsed
by the type of the field they replace (ints, floats, bools, strings, tuples
as comma-separated lists, tuples of tuples as comma-separated groups of
``/``-separated items such as ``groups=0/1,2/3``, ``none`` for optional fields).

A config class groups its fields into sections (``SECTIONS``, a class variable
mapping a section of :data:`SECTION_ORDER` to its fields), so a key may also be
written with its section, ``model.n_feat=32``; :func:`config_text` prints a config
by section.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """An unknown preset, key, or impossible setting."""


# The sections of every experiment's config, in the order they are shown: where the data
# and tasks come from, the network, the noise process, the optimiser, which methods run,
# each method's own settings, the evaluation, and the run itself.
SECTION_ORDER = ("data", "model", "diffusion", "optim", "methods", "vcl", "vcl_ng", "ewc",
                 "coreset", "replay", "eval", "run")


def field_sections(cls: type) -> dict[str, str]:
    """Each field of the config class ``cls`` → its section (from ``cls.SECTIONS``).

    Raises:
      TypeError: ``cls`` has no ``SECTIONS``, or they do not name each field exactly once
        (a mistake in the config class, not in its user's settings).
    """
    table = getattr(cls, "SECTIONS", None)
    if table is None:
        raise TypeError(f"{cls.__name__} declares no SECTIONS")
    where: dict[str, str] = {}
    for section, names in table.items():
        if section not in SECTION_ORDER:
            raise TypeError(f"{cls.__name__}.SECTIONS: unknown section {section!r}")
        for name in names:
            if name in where:
                raise TypeError(f"{cls.__name__}.SECTIONS names {name!r} twice")
            where[name] = section
    fields = [f.name for f in dataclasses.fields(cls)]
    if set(where) != set(fields):
        raise TypeError(f"{cls.__name__}.SECTIONS: fields without a section "
                        f"{sorted(set(fields) - set(where))}, names that are no field "
                        f"{sorted(set(where) - set(fields))}")
    return where


def config_text(cfg: Any) -> str:
    """``cfg`` as text, one ``[section]`` heading per section and ``key = value`` lines."""
    where = field_sections(type(cfg))
    lines = []
    for section in SECTION_ORDER:
        names = [f.name for f in dataclasses.fields(cfg) if where[f.name] == section]
        if names:
            lines.append(f"[{section}]")
            lines += [f"  {name} = {_show(getattr(cfg, name))}" for name in names]
    return "\n".join(lines)


def _show(value: Any) -> str:
    """A value as an override would write it (``none``, comma lists, ``/`` groups)."""
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join("/".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def _field_name(cls: type, key: str) -> str:
    """The field an override's key names: ``n_feat`` or ``model.n_feat``."""
    if "." not in key:
        return key
    section, name = key.split(".", 1)
    if not hasattr(cls, "SECTIONS"):
        raise ConfigError(f"{key!r}: {cls.__name__} has no sections; write the key alone")
    where = field_sections(cls)
    if section not in SECTION_ORDER:
        raise ConfigError(f"unknown config section {section!r} in {key!r}; known: "
                          f"{', '.join(s for s in SECTION_ORDER if s in where.values())}")
    if name in where and where[name] != section:
        raise ConfigError(f"{key!r}: {name} is in section {where[name]!r}, not {section!r} "
                          f"(write {where[name]}.{name}, or {name})")
    return name


def to_dict(cfg: Any) -> dict:
    """A JSON-able dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def sections_dict(cfg: Any, unused: set[str]) -> dict:
    """:func:`to_dict` of ``cfg`` without the fields of the sections in ``unused`` (e.g. a
    sub-run's identity: the sections its method uses)."""
    where = field_sections(type(cfg))
    return {k: v for k, v in to_dict(cfg).items() if where[k] not in unused}


def from_dict(cls: type[C], raw: dict) -> C:
    """The inverse of :func:`to_dict`: a config from a saved dict (lists become tuples).

    Raises:
      ConfigError: keys that are no field of ``cls`` (another experiment's config).
    """
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"not a {cls.__name__}: unknown keys {', '.join(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


_ELEMENT = object()  # the `current` of a tuple's element: "none" is not an element


def _parse(raw: str, current: Any, hint: Any, key: str, seps: str = ",/") -> Any:
    """``raw`` as a value of type ``hint``; a tuple's items are split on ``seps[0]``, the
    items of a tuple inside it on ``seps[1]``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if raw.lower() == "none" and (current is None or type(None) in args):
        return None
    if origin is tuple or isinstance(current, tuple):
        if not seps:
            raise ConfigError(f"{key}={raw!r}: tuples nest at most two deep")
        elem = args[0] if args else (type(current[0]) if current else str)
        items = [s for s in raw.split(seps[0]) if s.strip()]
        return tuple(_parse(s.strip(), _ELEMENT, elem, key, seps[1:]) for s in items)
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
    """Returns ``cfg`` with ``key=value`` overrides applied (``key`` or ``section.key``).

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
        key = _field_name(type(cfg), key.strip())
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


def class_checks(what: str, classes: tuple[int, ...], n_classes: int | None
                 ) -> list[tuple[bool, str]]:
    """The checks of a task list's classes: each a label of the dataset (0..n_classes−1,
    when the dataset is known) and none named twice."""
    return [
        (n_classes is None or all(0 <= c < n_classes for c in classes),
         f"{what}: every class must be in 0..{(n_classes or 1) - 1}, got {classes}"),
        (len(set(classes)) == len(classes), f"{what} names a class twice: {classes}"),
    ]


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


def natural_gradient_checks(cfg: Any, used: bool, kl_field: str = "kl_scale"
                            ) -> list[tuple[bool, str]]:
    """The checks of the natural-gradient VCL fields (``ng_*``) every experiment shares;
    ``used``: whether a run of the config trains by them (then its KL weight, the field
    ``kl_field``, must be > 0)."""
    return [
        (getattr(cfg, kl_field) > 0 or not used,
         f"natural-gradient VCL needs {kl_field} > 0 (its effective sample size is "
         f"N/{kl_field})"),
        (cfg.ng_learning_rate > 0, f"ng_learning_rate must be > 0, got {cfg.ng_learning_rate}"),
        (cfg.ng_hess_init > 0, f"ng_hess_init must be > 0, got {cfg.ng_hess_init}"),
        (0 <= cfg.ng_b1 < 1 and 0 <= cfg.ng_b2 < 1,
         f"ng_b1 and ng_b2 must be in [0, 1), got {cfg.ng_b1}, {cfg.ng_b2}"),
        (cfg.ng_clip is None or cfg.ng_clip > 0, f"ng_clip must be > 0 or none, got {cfg.ng_clip}"),
    ]
