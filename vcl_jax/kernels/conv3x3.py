"""3×3 stride-1 'SAME' convolution on the CPU as XLA FFI custom calls (``conv3x3.cc``).

XLA:CPU's own convolutions reach 8–30 GFLOP/s on our 2-core machines, several times below
the matmul rate (``BENCHMARKS.md``), and every JAX formulation of them (patches + matmul,
shifted matmuls) pays for copies XLA cannot avoid. ``conv3x3.cc`` holds register-tiled direct
convolutions that read the input in place (zero outside the image; no padded copy): a forward
kernel and a weight-gradient kernel. The input gradient is the forward kernel applied to the
output gradient with the kernel flipped and its channel axes swapped. `conv3x3` wraps them in
a ``custom_vjp`` with ``lax.conv``'s math and parameter layout, and the calls carry their own
``vmap`` rules (a shared kernel joins the mapped axis to the batch: one call; a kernel per
slice, as VCL's weight draws: one call per slice). Tested equal to ``lax.conv`` (values and
both gradients, under ``jit`` and ``vmap``: ``tests/test_kernels.py``).

The library is compiled on first use with the system C++ compiler (``$CXX``, default ``g++``;
``-O3 -march=native`` plus ``$VCL_JAX_KERNEL_CFLAGS``; a few seconds) into
``$VCL_JAX_CACHE_DIR/kernels`` (default ``~/.cache/vcl_jax``), named by a hash of the source,
the flags, JAX's version and the CPU's flags, so a changed source or another machine builds
its own copy. The tests pass with the AVX2 variant too
(``VCL_JAX_KERNEL_CFLAGS=-mno-avx512f``). `available` says whether
it built (and why not); `vcl_jax.models.layers` falls back to other forms where it did not, or
where a channel count is not a multiple of the kernel's vector width (`lanes`: 16 floats with
AVX-512, 8 with AVX2).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("conv3x3.cc")
FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-shared", "-fPIC", "-pthread", "-w")
_FORWARD, _WEIGHT_GRAD = "vcl_conv3x3_forward", "vcl_conv3x3_weight_grad"


class KernelUnavailable(RuntimeError):
    """The CPU kernel library could not be built or loaded (the message says why)."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _flags() -> list[str]:
    """The compiler flags: `FLAGS` and any in ``$VCL_JAX_KERNEL_CFLAGS`` (e.g.
    ``-mno-avx512f`` to build the AVX2 variant on an AVX-512 machine)."""
    return [*FLAGS, *os.environ.get("VCL_JAX_KERNEL_CFLAGS", "").split()]


def _library_path(cxx: str) -> Path:
    root = Path(os.environ.get("VCL_JAX_CACHE_DIR",
                               Path.home() / ".cache" / "vcl_jax")) / "kernels"
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (cxx, " ".join(_flags()), jax.__version__, _cpu_flags()):
        h.update(part.encode())
    return root / f"libconv3x3-{h.hexdigest()[:16]}.so"


def _build(cxx: str, out: Path) -> None:
    if shutil.which(cxx) is None:
        raise KernelUnavailable(f"no C++ compiler {cxx!r} on PATH (set $CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_lib = Path(tmp) / out.name
        cmd = [cxx, *_flags(), f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp_lib)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelUnavailable(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n"
                                    f"{proc.stderr[-2000:]}")
        os.replace(tmp_lib, out)  # atomic: concurrent builders each install a whole file


@functools.cache
def _load() -> int:
    """Builds (once per source and machine) and registers the kernels; returns `lanes`."""
    cxx = os.environ.get("CXX", "g++")
    path = _library_path(cxx)
    if not path.exists():
        _build(cxx, path)
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        raise KernelUnavailable(f"loading {path} failed: {e}") from e
    jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.VclConv3x3Forward),
                                platform="cpu")
    jax.ffi.register_ffi_target(_WEIGHT_GRAD, jax.ffi.pycapsule(lib.VclConv3x3WeightGrad),
                                platform="cpu")
    return int(lib.vcl_conv3x3_lanes())


def available() -> tuple[bool, str]:
    """Whether the kernels can run here, and if not, why."""
    if jax.default_backend() != "cpu":
        return False, f"the kernels are for the CPU backend, not {jax.default_backend()!r}"
    try:
        _load()
    except KernelUnavailable as e:
        return False, str(e)
    return True, ""


def lanes() -> int:
    """Vector width in floats; the kernels need output channels that are a multiple of it."""
    return _load()


def supports(out_channels: int) -> bool:
    """Whether `conv3x3` runs for this many output channels (a multiple of `lanes`). Its
    input gradient runs in the kernels only where the input channels are a multiple too,
    else through XLA."""
    return out_channels % lanes() == 0


@jax.custom_batching.custom_vmap
def _forward(x: jax.Array, k9: jax.Array) -> jax.Array:
    """``x: [B, H, W, Ci]``, ``k9: [9, Ci, Co]`` → ``[B, H, W, Co]``."""
    out = jax.ShapeDtypeStruct(x.shape[:-1] + k9.shape[-1:], jnp.float32)
    return jax.ffi.ffi_call(_FORWARD, out)(x, k9)


_UNROLL = 1  # mapped axes up to this size run as separate calls; longer ones as a lax.map


def _per_slice(fn, axis_size: int, in_batched, *args) -> jax.Array:
    """``fn`` on each slice of the mapped axis (unbatched args shared), stacked: a single
    slice (VCL's one weight draw) is one call; more (K draws, per-example gradients) are a
    ``lax.map`` (one compiled body)."""
    def slice_args(i):
        return [a[i] if b else a for a, b in zip(args, in_batched, strict=True)]
    if axis_size <= _UNROLL:
        return jnp.stack([fn(*slice_args(i)) for i in range(axis_size)])
    return jax.lax.map(lambda i: fn(*slice_args(i)), jnp.arange(axis_size))


@_forward.def_vmap
def _forward_vmap(axis_size, in_batched, x, k9):
    x_batched, k_batched = in_batched
    if not k_batched:  # one kernel: the mapped axis joins the batch (one call)
        y = _forward(x.reshape((-1,) + x.shape[2:]), k9)
        return y.reshape(x.shape[:-1] + k9.shape[-1:]), True
    # a kernel per slice: VCL's weight draws, each on its share of the batch or on all of it
    return _per_slice(_forward, axis_size, in_batched, x, k9), True


@jax.custom_batching.custom_vmap
def _weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct((9, x.shape[-1], dy.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(_WEIGHT_GRAD, out)(x, dy)


@_weight_grad.def_vmap
def _weight_grad_vmap(axis_size, in_batched, x, dy):
    # a kernel gradient per slice (per weight draw, or per example for per-example gradients)
    return _per_slice(_weight_grad, axis_size, in_batched, x, dy), True


def _xla_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``lax.conv`` 'SAME' of ``x: [B, H, W, Ci]`` (float32) with ``kernel: [3, 3, Ci, Co]``,
    ``Co`` a multiple of `lanes` (`supports`). The input gradient runs in the kernels when
    ``Ci`` is a multiple of `lanes` too, else through XLA."""
    return _conv3x3_fwd(x, kernel)[0]


def _conv3x3_fwd(x, kernel):
    _, _, ci, co = kernel.shape
    if kernel.shape[:2] != (3, 3) or x.dtype != jnp.float32 or not supports(co):
        raise ValueError(f"conv3x3: needs a float32 3×3 kernel with output channels a "
                         f"multiple of {lanes()}; got {x.dtype} {kernel.shape}")
    return _forward(x, kernel.reshape(9, ci, co)), (x, kernel)


def _conv3x3_bwd(res, dy):
    x, kernel = res
    _, _, ci, co = kernel.shape
    dk = _weight_grad(x, dy).reshape(kernel.shape)
    if ci % lanes() == 0:
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2).reshape(9, co, ci)
        dx = _forward(dy, flipped)
    else:
        dx = jax.vjp(lambda v: _xla_conv(v, kernel), x)[1](dy)[0]
    return dx, dk


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
