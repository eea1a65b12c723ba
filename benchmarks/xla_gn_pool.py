"""A small program whose gradient XLA:CPU gets wrong at LLVM optimisation levels 1-2.

The test suite compiles at ``--xla_backend_optimization_level=1`` (``tests/conftest.py``);
``benchmarks/xla_opt_levels.py`` found the 16-channel U-Net's parameter gradient 3% off there.
This cuts it down to four operations: a 3×3 convolution, our GroupNorm
(:func:`vcl_jax.models.layers.group_norm`, a ``custom_vjp`` with a closed-form backward
pass), GELU and a 2×2 max-pool, and the gradient of ``mean(out²)`` with respect to the
convolution's weights. The same function with GroupNorm written as plain ``jnp`` (the same
math, differentiated by JAX) is the referee. One subprocess per level prints the largest
difference of each gradient from the level-3 referee (relative to its largest entry).

    PYTHONPATH=. python -m benchmarks.xla_gn_pool [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import json

import numpy as np

from benchmarks.xla_opt_levels import arrays_per_level


def _gradients(out: str) -> None:
    import jax
    import jax.numpy as jnp

    from vcl_jax.models import layers
    from vcl_jax.models.layers import group_norm, max_pool2

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def plain_group_norm(x, scale, bias, groups=8, eps=1e-6):
        b, h, w, c = x.shape
        g = x.reshape(b, h, w, groups, c // groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.maximum(0.0, jnp.square(g).mean(axis=(1, 2, 4), keepdims=True)
                          - jnp.square(mean))
        return ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c) * scale + bias

    # Our GroupNorm with its backward pass written over the centred activations, x̂ = (x −
    # μ)·rstd, instead of the library's dx = a·dy + k·x + c (the same math): right at every
    # level ≥ 1 (a candidate fix, not adopted: it changes every U-Net run's last bits).
    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def centred_group_norm(x, scale, bias, groups, eps):
        return layers._group_norm_fwd(x, scale, bias, groups, eps)[0]

    def centred_bwd(groups, eps, res, dy):
        x, scale, mean, rstd = res
        n = layers._group_size(x, groups)
        xhat = (x - layers._bcast(mean, x)) * layers._bcast(rstd, x)
        s_dy, s_dyxhat = layers._channel_sums(dy), layers._channel_sums(dy * xhat)
        m1 = layers._group_mean(scale * s_dy, groups, n)
        m2 = layers._group_mean(scale * s_dyxhat, groups, n)
        dx = layers._bcast(rstd, x) * (scale * dy - layers._bcast(m1, x)
                                       - xhat * layers._bcast(m2, x))
        return dx, s_dyxhat.sum(0), s_dy.sum(0)

    centred_group_norm.defvjp(
        lambda x, s, b, g, e: layers._group_norm_fwd(x, s, b, g, e), centred_bwd)

    x = jax.random.normal(jax.random.key(0), (3, 14, 14, 16))
    w = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 16, 32))
    scale, bias = 1 + 0.1 * jax.random.normal(jax.random.key(2), (32,)), jnp.zeros(32)
    norms = {"custom_vjp": lambda h: group_norm(h, scale, bias, 8, 1e-6),
             "plain": lambda h: plain_group_norm(h, scale, bias),
             "centred_bwd": lambda h: centred_group_norm(h, scale, bias, 8, 1e-6),
             # without the pool the custom form agrees at every level
             "custom_vjp_no_pool": lambda h: group_norm(h, scale, bias, 8, 1e-6)}
    res = {}
    for name, norm in norms.items():
        pool = (lambda y: y) if name.endswith("no_pool") else max_pool2
        loss = lambda w, norm=norm, pool=pool: jnp.mean(pool(jax.nn.gelu(norm(conv(x, w)))) ** 2)
        res[name] = np.asarray(jax.jit(jax.grad(loss))(w)).ravel()
    np.savez(out, **res)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="0,1,2,3")
    ap.add_argument("--out", help="JSON file for the results")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _gradients(args.child)
        return {}
    levels = sorted(set(map(int, args.levels.split(","))) | {3})
    grads = arrays_per_level("benchmarks.xla_gn_pool", levels)
    results = {}
    for level in levels:
        g = grads[level]
        results[level] = {}
        for name in g:
            ref = grads[3]["plain" if name != "custom_vjp_no_pool" else name]
            results[level][name] = float(np.abs(g[name] - ref).max() / np.abs(ref).max())
        print(f"level {level}: " + ", ".join(f"{k} {v:.1e}" for k, v in results[level].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
