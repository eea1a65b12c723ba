"""The conditional DDPM U-Net of "Conditional-Diffusion-MNIST" (Pearce 2022), as
used by the VCL-diffusion paper, with one trainable embedding per task.

Shape walk for 28×28 (32×32 works the same, bottleneck 8×8)::

    x [B,28,28,C] → init block (n) → down1 (n, 14×14) → down2 (2n, 7×7)
    → avg-pool to [B,1,1,2n] → up0: 7×7 projection (2n, 7×7)
    → up1(cemb1 · up0 + temb1, down2) (n, 14×14)
    → up2(cemb2 · up1 + temb2, down1) (n, 28×28) → out(concat(up2, x)) → ε̂ [B,28,28,C]

Differences from the PyTorch original, on purpose: GroupNorm instead of
BatchNorm (no batch statistics, so the model is a pure function of its params,
which mean-field VI and data parallelism need). The task conditioning (``context``):

* ``shared``: a learned vector per task (``task_embeddings[d]``, ``null_embedding``
  for the unconditional model) fed to two shared context MLPs;
* ``film``: the VCL-diffusion author's code (flag ``deterministic_embed``): each task
  owns two free vectors that multiply the decoder stages directly (``task_film1[d]``
  of size 2n, ``task_film2[d]`` of size n), and the unconditional model owns one such
  pair (``null_film1``, ``null_film2``), which VCL treats as random, inside the KL,
  while the per-task vectors stay deterministic.

``weight_init`` picks the weight initialisation: ``paper`` (the paper's table,
U(±√(15/fan_in))) or ``pytorch`` (PyTorch's default, U(±1/√fan_in), the author's
code); biases start at zero either way.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from vcl_jax.models.layers import Conv, GroupNorm, PatchTranspose, kernel_init, max_pool2

# Parameter names that are per-task / unconditional embeddings (deterministic in VCL).
EMBEDDING_PARAMS = ("task_embeddings", "null_embedding", "task_film1", "task_film2")
CONTEXTS = ("shared", "film")


def _groups(channels: int) -> int:
    return 8 if channels % 8 == 0 else 1


def _film_init(key, shape):
    """The author's per-task vectors: ``kaiming_uniform_(a=√5)`` of a [1, n] tensor,
    U(±1/√n)."""
    bound = 1.0 / jnp.sqrt(shape[-1])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class ConvBlock(nn.Module):
    """3×3 conv → GroupNorm → GELU."""

    features: int
    impl: str
    weight_init: str = "paper"

    @nn.compact
    def __call__(self, x):
        x = Conv(self.features, 3, impl=self.impl, kernel_init=kernel_init(self.weight_init))(x)
        return nn.gelu(GroupNorm(_groups(self.features))(x))


class ResidualConvBlock(nn.Module):
    """Two conv blocks, with the (x + h) / √2 residual when ``residual``."""

    features: int
    impl: str
    residual: bool = False
    weight_init: str = "paper"

    @nn.compact
    def __call__(self, x):
        x1 = ConvBlock(self.features, self.impl, self.weight_init)(x)
        x2 = ConvBlock(self.features, self.impl, self.weight_init)(x1)
        if not self.residual:
            return x2
        skip = x if x.shape[-1] == self.features else x1
        return (skip + x2) / 1.414


class Down(nn.Module):
    features: int
    impl: str
    weight_init: str = "paper"

    @nn.compact
    def __call__(self, x):
        block = ResidualConvBlock(self.features, self.impl, weight_init=self.weight_init)
        return max_pool2(block(x))


class Up(nn.Module):
    features: int
    impl: str
    weight_init: str = "paper"

    @nn.compact
    def __call__(self, x, skip):
        up = PatchTranspose(self.features, 2,
                            kernel_init=kernel_init(self.weight_init, transpose=True))
        x = up(jnp.concatenate([x, skip], axis=-1))
        x = ResidualConvBlock(self.features, self.impl, weight_init=self.weight_init)(x)
        return ResidualConvBlock(self.features, self.impl, weight_init=self.weight_init)(x)


class EmbedFC(nn.Module):
    """Linear → GELU → Linear."""

    features: int
    weight_init: str = "paper"

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.features, kernel_init=kernel_init(self.weight_init))(x)
        return nn.Dense(self.features, kernel_init=kernel_init(self.weight_init))(nn.gelu(x))


class ContextUNet(nn.Module):
    """ε-prediction U-Net conditioned on time and on a per-task embedding.

    Attributes:
      n_feat: base width (128 in the paper).
      n_tasks: number of per-task embeddings.
      channels: image channels (1 for MNIST, 3 for CIFAR-10).
      embed_dim: size of each task embedding vector.
      impl: convolution implementation (``xla``, ``im2col`` or ``ffi``; `layers.conv_same`).
      context: ``shared`` context MLPs for all tasks, or ``film`` (free per-task vectors
        ``task_film{1,2}``, the null model's ``null_film{1,2}``).
      weight_init: ``paper`` or ``pytorch`` (`layers.kernel_init`).
    """

    n_feat: int = 128
    n_tasks: int = 10
    channels: int = 1
    embed_dim: int = 32
    impl: str = "xla"
    context: str = "shared"
    weight_init: str = "paper"

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, task: jax.Array, keep: jax.Array) -> jax.Array:
        """Predicts the noise.

        Args:
          x: ``[B, H, W, C]`` noised images, H = W divisible by 4.
          t: ``[B]`` time as a fraction t/T in (0, 1].
          task: ``[B]`` int task index (which embedding to use).
          keep: ``[B]`` bool; False selects the unconditional (null) embedding.

        Returns:
          ``[B, H, W, C]`` predicted noise.
        """
        n, init = self.n_feat, self.weight_init
        if self.context == "film":
            cemb1, cemb2 = self._film(task, keep)
        else:
            cemb1, cemb2 = self._embedded_context(task, keep)
        t = t.astype(x.dtype)[:, None]  # [B, 1]
        temb1 = EmbedFC(2 * n, init, name="timeembed1")(t)[:, None, None, :]
        temb2 = EmbedFC(n, init, name="timeembed2")(t)[:, None, None, :]

        conv_init = kernel_init(init)
        x0 = ResidualConvBlock(n, self.impl, residual=True, weight_init=init, name="init_conv")(x)
        down1 = Down(n, self.impl, init, name="down1")(x0)  # [B, H/2, W/2, n]
        down2 = Down(2 * n, self.impl, init, name="down2")(down1)  # [B, H/4, W/4, 2n]
        hidden = nn.gelu(jnp.mean(down2, axis=(1, 2), keepdims=True))  # [B, 1, 1, 2n]
        up0 = PatchTranspose(2 * n, down2.shape[1], kernel_init=kernel_init(init, transpose=True),
                             name="up0")(hidden)
        up0 = nn.relu(GroupNorm(_groups(2 * n))(up0))
        up1 = Up(n, self.impl, init, name="up1")(cemb1 * up0 + temb1, down2)  # [B, H/2, W/2, n]
        up2 = Up(n, self.impl, init, name="up2")(cemb2 * up1 + temb2, down1)  # [B, H, W, n]
        h = Conv(n, 3, impl=self.impl, kernel_init=conv_init, name="out_conv1")(
            jnp.concatenate([up2, x0], -1))
        h = nn.relu(GroupNorm(_groups(n), name="out_norm")(h))
        return Conv(self.channels, 3, impl=self.impl, kernel_init=conv_init, name="out_conv2")(h)

    def _embedded_context(self, task, keep):
        """``shared``: an embedding vector per task through the shared context MLPs;
        returns the two decoder scales ``[B, 1, 1, 2n]``, ``[B, 1, 1, n]``."""
        n = self.n_feat
        task_emb = self.param("task_embeddings", nn.initializers.normal(1.0),
                              (self.n_tasks, self.embed_dim))
        null_emb = self.param("null_embedding", nn.initializers.zeros, (self.embed_dim,))
        if self.context != "shared":
            raise ValueError(f"unknown context {self.context!r}; accepted: {', '.join(CONTEXTS)}")
        c = jnp.where(keep[:, None], task_emb[task], null_emb)  # [B, E]
        cemb1 = EmbedFC(2 * n, self.weight_init, name="contextembed1")(c)
        cemb2 = EmbedFC(n, self.weight_init, name="contextembed2")(c)
        return cemb1[:, None, None, :], cemb2[:, None, None, :]

    def _film(self, task, keep):
        """``film``: free per-task decoder scales, and the null model's pair."""
        n = self.n_feat
        out = []
        for i, size in ((1, 2 * n), (2, n)):
            table = self.param(f"task_film{i}", _film_init, (self.n_tasks, size))
            null = self.param(f"null_film{i}", _film_init, (size,))
            out.append(jnp.where(keep[:, None], table[task], null)[:, None, None, :])
        return tuple(out)


def init_unet(model: ContextUNet, key: jax.Array, shape: tuple[int, int, int]) -> dict:
    """``model``'s params for images of ``shape`` (H, W, C), initialised in one compiled
    call (the same numbers as an eager ``model.init``, which compiles every initializer
    separately). The call runs once per run, so it is compiled with the backend's light
    optimisation (:data:`QUICK_COMPILE`): the same numbers, bit for bit, in a fraction of
    the compile time (BENCHMARKS.md). Under a transformation (``jax.eval_shape``, ``jit``)
    it is traced as usual."""
    init = _init_fn(model, tuple(shape))
    if isinstance(key, jax.core.Tracer):
        return init(key)
    return _compiled_init(init, key.shape, key.dtype)(key)


# XLA options of programs that run once, where compile time outweighs run time: LLVM at
# its first optimisation level (XLA's default is 3).
QUICK_COMPILE = {"xla_backend_optimization_level": 1}


@functools.lru_cache(maxsize=16)
def _init_fn(model: ContextUNet, shape: tuple[int, int, int]):
    n = 2

    def init(key):
        return model.init(key, jnp.zeros((n, *shape)), jnp.ones((n,)),
                          jnp.zeros((n,), jnp.int32), jnp.ones((n,), bool))["params"]

    return jax.jit(init)


@functools.lru_cache(maxsize=16)
def _compiled_init(init, key_shape: tuple, key_dtype) -> jax.stages.Compiled:
    key = jax.ShapeDtypeStruct(key_shape, key_dtype)
    return init.lower(key).compile(compiler_options=QUICK_COMPILE)


def unet_flops(n_feat: int, size: int = 28, channels: int = 1) -> float:
    """Forward FLOPs per image of :class:`ContextUNet` (convolutions and transposes)."""
    n, s = n_feat, size

    def conv(hw, cin, cout, k=3):
        return 2 * hw * hw * k * k * cin * cout

    f = conv(s, channels, n) + conv(s, n, n)  # init block
    f += conv(s, n, n) * 2  # down1
    f += conv(s // 2, n, 2 * n) + conv(s // 2, 2 * n, 2 * n)  # down2
    f += 2 * (s // 4) ** 2 * 2 * n * 2 * n  # up0
    f += 2 * (s // 4) ** 2 * 4 * 4 * n * n + 4 * conv(s // 2, n, n)  # up1
    f += 2 * (s // 2) ** 2 * 4 * 2 * n * n + 4 * conv(s, n, n)  # up2
    f += conv(s, 2 * n, n) + conv(s, n, channels)  # out
    return float(f)


def variational_mask(params: dict, *, norms: bool = False) -> dict:
    """True for the leaves VCL treats as random: every conv, transpose and dense
    weight and bias; False for the per-task/null embeddings and, unless ``norms``,
    the GroupNorm scales and offsets (deterministic, outside the KL, as in the
    paper's code; shared by all tasks, so free norms are a path for forgetting)."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)

    def is_norm(p):
        return p.startswith("GroupNorm") or p == "out_norm"

    def random(path):
        return not any(p in EMBEDDING_PARAMS or (is_norm(p) and not norms) for p in path)

    return traverse_util.unflatten_dict({k: random(k) for k in flat})
