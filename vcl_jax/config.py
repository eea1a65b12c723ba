"""Config helpers: a run's config is a frozen dataclass of sections.

An experiment's config holds its sweep (``methods``, and for VCL-diffusion ``coreset_sizes``)
as plain fields and everything else in sections — frozen dataclasses of their own, one per
concern (``data``, ``model``, ``diffusion``, ``optim``, each method's settings, ``eval``,
``run``); :mod:`vcl_jax.configs.sections` holds the ones the experiments share. Each part of an
experiment is built from its own section (``cfg.model.module(…)``, ``cfg.data.load(…)``).

Overrides come from the command line as ``key=value`` strings, where ``key`` is
``section.field`` or a field's name alone when only one section has it (``seed=1`` is
``run.seed=1``). The value is parsed by the type of the field it replaces (ints, floats,
bools, strings, tuples as comma-separated lists, tuples of tuples as comma-separated
groups of ``/``-separated items such as ``groups=0/1,2/3``, ``none`` for optional fields).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """An unknown preset, key, or impossible setting."""


def _is_section(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def section_names(cfg: Any) -> list[str]:
    """The fields of ``cfg`` that are sections, in their order."""
    return [f.name for f in dataclasses.fields(cfg) if _is_section(getattr(cfg, f.name))]


def _locate(cfg: Any, key: str) -> tuple[str | None, str]:
    """(section, field) of an override's key: ``n_feat`` or ``model.n_feat``; the section
    is None for a plain field of ``cfg`` itself."""
    fields = {s: [f.name for f in dataclasses.fields(getattr(cfg, s))]
              for s in section_names(cfg)}
    plain = [f.name for f in dataclasses.fields(cfg) if f.name not in fields]

    def homes(name: str) -> list[str]:
        return [s for s, names in fields.items() if name in names]

    if "." in key:
        section, name = key.split(".", 1)
        if section not in fields:
            raise ConfigError(f"unknown config section {section!r} in {key!r}; known: "
                              f"{', '.join(fields)}")
        if name not in fields[section]:
            if homes(name):
                home = homes(name)[0]
                raise ConfigError(f"{key!r}: {name} is in section {home!r}, not "
                                  f"{section!r} (write {home}.{name}, or {name})")
            raise ConfigError(f"unknown config key {name!r} in section {section!r}; known: "
                              f"{', '.join(sorted(fields[section]))}")
        return section, name
    if key in plain:
        return None, key
    found = homes(key)
    if len(found) == 1:
        return found[0], key
    if len(found) > 1:
        raise ConfigError(f"{key!r} is in sections {', '.join(found)}: write "
                          f"{found[0]}.{key} (or another)")
    known = sorted(plain + [f"{s}.{n}" for s, names in fields.items() for n in names])
    raise ConfigError(f"unknown config key {key!r}; known: {', '.join(known)}")


def config_text(cfg: Any) -> str:
    """``cfg`` as text: its plain fields as ``key = value`` lines, then one ``[section]``
    heading per section with its ``key = value`` lines (each line an override)."""
    sections = section_names(cfg)
    lines = [f"{f.name} = {_show(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg)
             if f.name not in sections]
    for section in sections:
        part = getattr(cfg, section)
        lines.append(f"[{section}]")
        lines += [f"  {f.name} = {_show(getattr(part, f.name))}"
                  for f in dataclasses.fields(part)]
    return "\n".join(lines)


def _show(value: Any) -> str:
    """A value as an override would write it (``none``, comma lists, ``/`` groups)."""
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join("/".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def to_dict(cfg: Any) -> dict:
    """A JSON-able dict of a config dataclass, sections as nested dicts (tuples → lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flat_dict(cfg: Any, unused: set[str] = frozenset()) -> dict:
    """:func:`to_dict` of ``cfg`` as ``{"section.field": value}`` (plain fields by their
    name), without the sections in ``unused`` (e.g. a sub-run's identity: the sections its
    method uses)."""
    return flatten({k: v for k, v in to_dict(cfg).items() if k not in unused})


def flatten(raw: dict) -> dict:
    """A config's dict (:func:`to_dict`) as ``{"section.field": value}``."""
    out = {}
    for name, value in raw.items():
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    return out


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def from_dict(cls: type[C], raw: dict) -> C:
    """The inverse of :func:`to_dict`: a config from a saved dict (lists become tuples).

    Raises:
      ConfigError: keys that are no field of ``cls`` or of its sections (another
        experiment's config).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"not a {cls.__name__}: expected a dict, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    values = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        section = hints[name]
        if not dataclasses.is_dataclass(section):
            values[name] = _tuples(value)
        elif not isinstance(value, dict):  # a section saved as something else
            unknown.append(name)
        else:
            sub = {f.name for f in dataclasses.fields(section)}
            unknown += [f"{name}.{k}" for k in sorted(set(value) - sub)]
            values[name] = section(**{k: _tuples(v) for k, v in value.items() if k in sub})
    if unknown:
        raise ConfigError(f"not a {cls.__name__}: unknown keys {', '.join(unknown)}")
    return cls(**values)


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
    """Returns ``cfg`` with ``key=value`` overrides applied (``section.key`` or ``key``).

    Raises:
      ConfigError: a malformed override, an unknown or ambiguous key, or a value of the
        wrong type.
    """
    if not overrides:
        return cfg
    changes: dict[str | None, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        section, name = _locate(cfg, key.strip())
        owner = cfg if section is None else getattr(cfg, section)
        hint = typing.get_type_hints(type(owner))[name]
        changes.setdefault(section, {})[name] = _parse(raw.strip(), getattr(owner, name), hint,
                                                       key.strip())
    top = changes.pop(None, {})
    for section, fields in changes.items():
        top[section] = dataclasses.replace(getattr(cfg, section), **fields)
    return dataclasses.replace(cfg, **top)


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
