"""The one method grammar of every experiment, and the one builder of its ``chain``.

A method's name is its members joined by ``+``, at most one of each kind, in this order:

* the **trainer** — ``mle`` (maximum likelihood), ``vcl`` (mean-field VI), or ``vcl_ng``
  (the same objective trained by natural gradients); ``mle`` is implied, and written only
  when it stands alone;
* a **penalty** on the params — ``ewc_diag``, ``ewc_rank1``, ``ewc_rank1_unit``
  (:func:`~vcl_jax.continual.ewc`; under VCL it acts on the posterior means);
* a **replay** mode — ``replay`` (generated images of the earlier tasks join each task's
  batches) or ``distill`` (the same images, and the model trained by maximum likelihood plus
  a distillation term against the model of the previous task, which therefore takes the
  trainer's place);
* a **coreset** — ``coreset_<kind>`` (``coreset_random``, ``coreset_kcenter``: how its
  examples are selected; the size and mode are the experiment's coreset settings).

Or ``joint``: the reference that is not a continual learner (one model trained on every
task's data at once). Examples: ``mle``, ``vcl``, ``vcl+coreset_kcenter``,
``ewc_rank1+distill``, ``vcl+ewc_rank1``, ``vcl_ng+coreset_random``.

Each experiment says which members it can build (:func:`parse`'s ``allowed``) and gives a
factory for each (:func:`build`); this module composes them, so no experiment spells out a
chain or re-parses a name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from vcl_jax.config import ConfigError
from vcl_jax.continual.base import Method, chain
from vcl_jax.continual.consolidation import ewc
from vcl_jax.continual.fisher import ExampleLoss
from vcl_jax.data.coreset import METHODS as CORESET_KINDS

TRAINERS = ("mle", "vcl", "vcl_ng")
VARIATIONAL = ("vcl", "vcl_ng")
PENALTIES = ("ewc_diag", "ewc_rank1", "ewc_rank1_unit")
REPLAYS = ("replay", "distill")
CORESETS = tuple(f"coreset_{kind}" for kind in CORESET_KINDS)
MEMBERS = (*TRAINERS, *PENALTIES, *REPLAYS, *CORESETS)
JOINT = "joint"
# the member kinds in the order a name writes them
KINDS = (("trainer", TRAINERS), ("penalty", PENALTIES), ("replay", REPLAYS),
         ("coreset", CORESETS))


class MethodError(ConfigError):
    """A method name outside the grammar, or naming a member its experiment cannot build."""


class Spec(NamedTuple):
    """A parsed method name.

    Attributes:
      trainer: ``mle``, ``vcl`` or ``vcl_ng`` (``mle`` for ``joint`` and ``distill``).
      penalty: an EWC member (``ewc_diag``, ...) or None.
      replay: ``replay``, ``distill`` or None.
      coreset: a ``coreset_<kind>`` member or None.
      joint: whether this is the ``joint`` reference (no other member).
    """

    trainer: str = "mle"
    penalty: str | None = None
    replay: str | None = None
    coreset: str | None = None
    joint: bool = False

    @property
    def name(self) -> str:
        """The one spelling of this method (``parse(spec.name) == spec``)."""
        if self.joint:
            return JOINT
        rest = [m for m in (self.penalty, self.replay, self.coreset) if m]
        return "+".join(rest if rest and self.trainer == "mle" else [self.trainer, *rest])

    @property
    def dir(self) -> str:
        """A file-name form of the name (``ewc_rank1+distill`` → ``ewc_rank1-distill``)."""
        return self.name.replace("+", "-")

    @property
    def variational(self) -> bool:
        """Whether the method trains a posterior (``vcl`` or ``vcl_ng``)."""
        return self.trainer in VARIATIONAL

    @property
    def coreset_kind(self) -> str | None:
        """How the coreset is selected (``random``, ``kcenter``), or None."""
        return self.coreset.removeprefix("coreset_") if self.coreset else None

    @property
    def fisher(self) -> str | None:
        """The EWC penalty's Fisher (``diag``, ``rank1``, ``rank1_unit``), or None."""
        return self.penalty.removeprefix("ewc_") if self.penalty else None


def parse(name: str, allowed: Iterable[str] = (*MEMBERS, JOINT)) -> Spec:
    """The :class:`Spec` of ``name``.

    Args:
      name: a method name (module doc).
      allowed: the members (and ``joint``) the calling experiment can build.

    Raises:
      MethodError: naming what the problem is — an unknown member, one the experiment
        cannot build, two of one kind, ``distill`` with a trainer other than MLE, or a
        spelling other than the one :attr:`Spec.name` writes (members out of order, an
        ``mle`` beside other members).
    """
    allowed = tuple(allowed)
    if name == JOINT:
        if JOINT not in allowed:
            raise MethodError(f"method 'joint' is not one of this experiment's "
                              f"({_listing(allowed)})")
        return Spec(joint=True)
    parts = name.split("+")
    unknown = [p for p in parts if p not in MEMBERS]
    if unknown:
        raise MethodError(f"unknown method {name!r}: {', '.join(map(repr, unknown))} is not a "
                          f"member; this experiment's: {_listing(allowed)} (joined by '+')")
    cannot = [p for p in parts if p not in allowed]
    if cannot:
        raise MethodError(f"method {name!r}: this experiment cannot build "
                          f"{', '.join(map(repr, cannot))} (its members: {_listing(allowed)})")
    found = {}
    for kind, members in KINDS:
        mine = [p for p in parts if p in members]
        if len(mine) > 1:
            raise MethodError(f"method {name!r} names two of one kind ({' and '.join(mine)}); "
                              f"a method has at most one {kind}")
        found[kind] = mine[0] if mine else None
    spec = Spec(found["trainer"] or "mle", found["penalty"], found["replay"], found["coreset"])
    if spec.replay == "distill" and spec.trainer != "mle":
        raise MethodError(f"method {name!r}: distill trains the model by maximum likelihood "
                          f"with a teacher, so it takes no trainer ({spec.trainer})")
    if spec.name != name:
        raise MethodError(f"method {name!r}: write it {spec.name!r} (members in the order "
                          "trainer, penalty, replay, coreset; mle only alone)")
    return spec


def _listing(allowed: tuple[str, ...]) -> str:
    return ", ".join(allowed)


# A factory of each member the experiment builds: called with no arguments, it returns the
# member's Method (``distill``'s: the trainer with a teacher; ``replay``'s also serves
# ``distill``, which replays the same generated images).
Factories = Mapping[str, Callable[[], Method]]


def penalty_factories(example_loss: ExampleLoss, *, n_tasks: int, lam: float,
                      chunk: int) -> dict[str, Callable[[], Method]]:
    """The factory of each penalty member: :func:`~vcl_jax.continual.ewc` without a batch
    loss (the penalty alone, chained after the trainer) with that member's Fisher."""
    return {p: functools.partial(ewc, None, example_loss, n_tasks=n_tasks, lam=lam,
                                 fisher=p.removeprefix("ewc_"), chunk=chunk)
            for p in PENALTIES}


def build(spec: Spec, factories: Factories) -> Method:
    """The method of ``spec``: its members' Methods, each from its factory, chained in the
    grammar's order (trainer — or ``distill`` in its place —, penalty, replay, coreset).
    ``joint`` is the ``mle`` trainer (what makes it joint is its data, not its method)."""
    base = factories["distill" if spec.replay == "distill" else spec.trainer]()
    rest = [factories[m]() for m in (spec.penalty, spec.replay and "replay", spec.coreset) if m]
    return chain(base, *rest) if rest else base
