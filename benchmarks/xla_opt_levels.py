"""Whether XLA:CPU computes the U-Net's parameter gradient the same at each LLVM optimisation
level.

The test suite compiles at ``--xla_backend_optimization_level=1`` to halve its compile time
(``tests/conftest.py``); the experiments run at XLA's default (3). This script computes the
gradient of ``mean(unet(x)²)`` in one subprocess per level, twice: with XLA's convolutions and
with our CPU kernels (``impl="ffi"``), two independent implementations of the same math. It
prints, per level, the largest difference between the two (relative to the largest gradient
entry), and between each and level 3's XLA gradient; the loss (forward pass) beside them.
Finite differences cannot referee here: the U-Net's ReLUs put kinks within any step large
enough to rise above float32's rounding.

    PYTHONPATH=. python -m benchmarks.xla_opt_levels [--n-feat 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np


def _gradients(n_feat: int, out: str) -> None:
    """Loss and flattened gradients for both convolution implementations, saved to ``out``."""
    import jax
    import jax.numpy as jnp

    from vcl_jax.models.unet import ContextUNet

    b = 3
    args = (jax.random.normal(jax.random.key(0), (b, 28, 28, 1)), jnp.full((b,), 0.3),
            jnp.arange(b), jnp.array([1.0, 0.0, 1.0]))
    ref = ContextUNet(n_feat=n_feat, n_tasks=3, embed_dim=4, impl="xla")
    params = jax.jit(ref.init)(jax.random.key(1), *args)
    res = {}
    for impl in ("xla", "ffi"):
        model = ref.clone(impl=impl)
        loss, g = jax.jit(jax.value_and_grad(
            lambda p, m=model: jnp.mean(m.apply(p, *args) ** 2)))(params)
        res[f"{impl}_loss"] = np.asarray(loss)
        res[impl] = np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])
    np.savez(out, **res)


def arrays_per_level(module: str, levels: list[int], child_args: tuple[str, ...] = ()
                     ) -> dict[int, dict[str, np.ndarray]]:
    """Runs ``python -m <module> --child FILE <child_args>`` once per LLVM optimisation level,
    each in a process of its own (XLA reads its flags when it starts) compiling afresh (no
    persistent cache), and returns the arrays each child saved in FILE, by level."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for level in levels:
            path = os.path.join(tmp, f"level{level}.npz")
            env = dict(os.environ, JAX_COMPILATION_CACHE_DIR="",
                       XLA_FLAGS=f"--xla_backend_optimization_level={level}")
            subprocess.run([sys.executable, "-m", module, "--child", path, *child_args],
                           env=env, check=True)
            with np.load(path) as z:
                out[level] = {k: z[k] for k in z.files}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-feat", type=int, default=16)
    ap.add_argument("--levels", default="0,1,2,3")
    ap.add_argument("--out", help="JSON file for the results")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _gradients(args.n_feat, args.child)
        return {}
    levels = sorted(set(map(int, args.levels.split(","))) | {3})
    grads = arrays_per_level("benchmarks.xla_opt_levels", levels, ("--n-feat", str(args.n_feat)))
    ref = grads[3]["xla"]
    scale = float(np.abs(ref).max())
    diff = lambda a, b: float(np.abs(a - b).max() / scale)  # noqa: E731 (NaN stays NaN)
    results = {}
    for level in levels:
        g = grads[level]
        results[level] = {"loss_xla": float(g["xla_loss"]), "loss_ffi": float(g["ffi_loss"]),
                          "xla_vs_ffi": diff(g["xla"], g["ffi"]),
                          "xla_vs_level3": diff(g["xla"], ref),
                          "ffi_vs_level3": diff(g["ffi"], ref)}
        r = results[level]
        print(f"level {level}: loss {r['loss_xla']:.7f} / {r['loss_ffi']:.7f}; gradient "
              f"differences (÷ max |g|): XLA vs ours {r['xla_vs_ffi']:.1e}, XLA vs level 3 "
              f"{r['xla_vs_level3']:.1e}, ours vs level 3 {r['ffi_vs_level3']:.1e}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"n_feat": args.n_feat, "levels": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
