"""Natural-gradient variational learning of a mean-field posterior, as an optax transformation.

The update of IVON (Shen et al. 2024; the Bayesian learning rule of Khan & Rue 2023) for a
posterior ``q = N(m, diag 1/(λ(h + δ)))``: λ the effective sample size, δ the prior's
precision per datum, h a running estimate of the diagonal Hessian of the per-datum loss.
Written over a :class:`~vcl_jax.vi.mean_field.MeanField` ``(mean, log_var)`` whose
log-variance *is* that state: ``exp(−log_var) = λ(h + δ)``, so the posterior that draws the
weights, is checkpointed and is evaluated is the optimizer's own, and every estimator of the
expected loss (weight draws, local reparameterisation) serves unchanged.

What the update receives is the gradient of the VCL objective per datum,

    L(q) = E_q[ℓ̄(θ)] + KL(q ‖ p) / λ,

with respect to ``(mean, log_var)``. Two identities turn it into IVON's quantities:

* the mean's gradient is E[∇ℓ̄(θ)] + δ⊙(m − m_p): the likelihood gradient at the drawn weights
  plus the prior's pull (δ = P/λ for the prior precision P);
* twice the log-variance's gradient times the precision is the reparameterisation estimate
  of the curvature: 2·e^{−log_var}·∂L/∂log_var = ĥ + δ − (h + δ), with
  ĥ = ∇ℓ̄(θ)⊙ε/σ (Price's theorem: ∂E[ℓ̄]/∂σ² = ½·E[∇²ℓ̄]).

So with s = h + δ = e^{−log_var}/λ and ŝ = ĥ + δ = s + 2·e^{−log_var}·∂L/∂log_var, one step is

    s ← β₂·s + (1 − β₂)·ŝ + ½(1 − β₂)²·(s − ŝ)²/s       (IVON's update; keeps s > 0)
    g ← β₁·g + (1 − β₁)·∂L/∂m                          (momentum, debiased by 1 − β₁ᵗ)
    m ← m − α·clip(g / s, ξ)                          (a Newton step of the averaged curvature)
    log_var ← −log(λ·s)

IVON keeps the momentum of the likelihood's gradient and adds δ⊙m after it; here the momentum
averages the whole gradient, prior pull included (the same fixed point). The continual
learner makes the prior the previous task's posterior (mean m_{d−1}, precision P_{d−1}), so
after task d the precision is λ_d·h_d + P_{d−1}: weights that mattered before are held.

Leaves outside ``mask`` (deterministic: per-task embeddings, norms) have no variance to
learn; they take Adam steps of ``learning_rate · deterministic_scale``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vcl_jax.vi.mean_field import MeanField

PyTree = Any
_ADAM_B2 = 0.999  # Adam's β₂ for the deterministic leaves


class NaturalGradientState(NamedTuple):
    """Attributes: count (steps taken), momentum (of the means' gradient), nu (Adam's second
    moment of the deterministic leaves; a scalar zero for the random ones)."""

    count: jax.Array
    momentum: PyTree
    nu: PyTree


def _random_leaves(mask: PyTree | None, tree: PyTree) -> list[bool]:
    leaves, treedef = jax.tree.flatten(tree)
    if mask is None:
        return [True] * len(leaves)
    return [bool(r) for r in treedef.flatten_up_to(mask)]


def natural_mean_field(learning_rate: float, *, b1: float = 0.9, b2: float = 0.99999,
                       clip: float | None = None, mask: PyTree | None = None,
                       deterministic_scale: float = 0.01, eps: float = 1e-8
                       ) -> optax.GradientTransformationExtraArgs:
    """The natural-gradient update of a mean-field posterior (module doc).

    Args:
      learning_rate: α, the step of the preconditioned mean update (IVON: 0.1–0.5).
      b1: β₁, the momentum of the means' gradient.
      b2: β₂, the averaging of the curvature estimate (1/(1 − β₂) steps).
      clip: ξ, the elementwise bound of the preconditioned step g/s (None: none).
      mask: pytree of bools over the params, True for random leaves (None: all random).
      deterministic_scale: the Adam step of deterministic leaves, relative to ``learning_rate``.
      eps: Adam's ε for the deterministic leaves.

    Returns:
      A transformation over :class:`MeanField` params whose ``update(grads, state, params,
      *, ess, prior_log_var=None)`` takes the effective sample size λ (a scalar) and, when
      given, the prior's log-variances: the curvature estimate is then kept ≥ 0, so the
      posterior is never broader than its prior (a negative estimate, from a non-convex
      direction or noise, would otherwise widen it without bound and the weight noise with
      it). The updates it returns move ``params`` to the new posterior
      (``optax.apply_updates``).
    """
    if not 0.0 <= b1 < 1.0 or not 0.0 <= b2 < 1.0:
        raise ValueError(f"natural gradient: b1 and b2 must be in [0, 1), got {b1}, {b2}")
    if clip is not None and clip <= 0:
        raise ValueError(f"natural gradient: clip must be > 0 or None, got {clip}")

    def init_fn(params: MeanField) -> NaturalGradientState:
        means, treedef = jax.tree.flatten(params.mean)
        random = _random_leaves(mask, params.mean)
        nu = [jnp.zeros((), m.dtype) if r else jnp.zeros_like(m)
              for m, r in zip(means, random, strict=True)]
        return NaturalGradientState(jnp.zeros((), jnp.int32),
                                    jax.tree.map(jnp.zeros_like, params.mean),
                                    jax.tree.unflatten(treedef, nu))

    def update_fn(grads: MeanField, state: NaturalGradientState, params: MeanField | None = None,
                  *, ess: jax.Array, prior_log_var: PyTree | None = None, **extra):
        del extra
        if params is None:
            raise ValueError("the natural-gradient update needs the posterior (params)")
        count = optax.safe_increment(state.count)
        c1 = 1.0 - b1 ** count.astype(jnp.float32)
        treedef = jax.tree.structure(params.mean)
        floors = (params.log_var if prior_log_var is None else prior_log_var)
        flat = [treedef.flatten_up_to(t) for t in
                (params.log_var, grads.mean, grads.log_var, state.momentum, state.nu, floors)]
        d_mean, d_lv, moms, nus = [], [], [], []
        for (lv, gm, glv, mom, nu, lp), r in zip(zip(*flat, strict=True),
                                                _random_leaves(mask, params.mean), strict=True):
            mom = b1 * mom + (1.0 - b1) * gm
            if r:
                prec = jnp.exp(-lv)
                s = prec / ess
                s_hat = s + 2.0 * prec * glv
                s_new = b2 * s + (1.0 - b2) * s_hat + 0.5 * (1.0 - b2) ** 2 * (s - s_hat) ** 2 / s
                if prior_log_var is not None:  # h ≥ 0: never broader than the prior
                    s_new = jnp.maximum(s_new, jnp.exp(-lp) / ess)
                step = (mom / c1) / s_new
                if clip is not None:
                    step = jnp.clip(step, -clip, clip)
                d_mean.append(-learning_rate * step)
                d_lv.append(-jnp.log(ess * s_new) - lv)
            else:  # Adam
                nu = _ADAM_B2 * nu + (1.0 - _ADAM_B2) * gm * gm
                nu_hat = nu / (1.0 - _ADAM_B2 ** count.astype(jnp.float32))
                d_mean.append(-learning_rate * deterministic_scale * (mom / c1)
                              / (jnp.sqrt(nu_hat) + eps))
                d_lv.append(jnp.zeros_like(lv))
            moms.append(mom)
            nus.append(nu)
        unflat = lambda xs: jax.tree.unflatten(treedef, xs)
        updates = MeanField(unflat(d_mean), unflat(d_lv))
        return updates, NaturalGradientState(count, unflat(moms), unflat(nus))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def curvature(q: MeanField, prior: MeanField, ess: float) -> PyTree:
    """The Hessian estimate h held by posterior ``q``: ``e^{−log_var}/λ − P/λ``, with P the
    prior's precision (what the posterior's precision adds to the prior's, per datum)."""
    return jax.tree.map(lambda lv, lp: (jnp.exp(-lv) - jnp.exp(-lp)) / ess,
                        q.log_var, prior.log_var)


def with_curvature(q: MeanField, prior: MeanField, ess: float, h0: float,
                   mask: PyTree | None = None) -> MeanField:
    """``q`` with the precision of its random leaves set to ``P + λ·h0`` (the prior's plus an
    initial curvature h0 per datum): IVON's ``hess_init`` at the start of a task, which keeps
    the first Newton steps bounded where the prior is broad."""
    random = _random_leaves(mask, q.mean)
    treedef = jax.tree.structure(q.mean)
    out = [(-jnp.log(jnp.exp(-lp) + ess * h0)).astype(lv.dtype) if r else lv
           for lv, lp, r in zip(treedef.flatten_up_to(q.log_var),
                                treedef.flatten_up_to(prior.log_var), random, strict=True)]
    return q._replace(log_var=jax.tree.unflatten(treedef, out))
