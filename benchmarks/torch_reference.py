"""PyTorch reference of ``vcl_jax.models.unet.ContextUNet`` and its MLE / VCL train steps.

The baseline a researcher would write in PyTorch: the same architecture (GroupNorm,
tanh-GELU, per-task embeddings, 2×2/2 transposed convs, 7×7 bottleneck projection),
the same per-pixel-mean ε-loss with classifier-free-guidance dropout, Adam; VCL with
one reparameterised weight draw per step through ``torch.func.functional_call``.
Only for ``benchmarks/``; needs the optional ``bench`` extra (``pip install torch``).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.func import functional_call


def _groups(c: int) -> int:
    return 8 if c % 8 == 0 else 1


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(_groups(cout), cout),
                         nn.GELU(approximate="tanh"))


class ResidualConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, residual: bool = False):
        super().__init__()
        self.b1, self.b2, self.residual, self.same = (ConvBlock(cin, cout), ConvBlock(cout, cout),
                                                      residual, cin == cout)

    def forward(self, x):
        x1 = self.b1(x)
        x2 = self.b2(x1)
        if not self.residual:
            return x2
        return ((x if self.same else x1) + x2) / 1.414


class Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.t = nn.ConvTranspose2d(cin, cout, 2, 2)
        self.r1, self.r2 = ResidualConvBlock(cout, cout), ResidualConvBlock(cout, cout)

    def forward(self, x, skip):
        return self.r2(self.r1(self.t(torch.cat([x, skip], 1))))


class EmbedFC(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Linear(cin, cout), nn.GELU(approximate="tanh"), nn.Linear(cout, cout))


class TorchContextUNet(nn.Module):
    """NCHW twin of ``ContextUNet`` (28×28, bottleneck 7×7)."""

    def __init__(self, n_feat: int, n_tasks: int = 10, channels: int = 1, embed_dim: int = 32,
                 size: int = 28):
        super().__init__()
        n = n_feat
        self.task_embeddings = nn.Parameter(torch.randn(n_tasks, embed_dim))
        self.null_embedding = nn.Parameter(torch.zeros(embed_dim))
        self.init_conv = ResidualConvBlock(channels, n, residual=True)
        self.down1 = nn.Sequential(ResidualConvBlock(n, n), nn.MaxPool2d(2))
        self.down2 = nn.Sequential(ResidualConvBlock(n, 2 * n), nn.MaxPool2d(2))
        self.cemb1, self.temb1 = EmbedFC(embed_dim, 2 * n), EmbedFC(1, 2 * n)
        self.cemb2, self.temb2 = EmbedFC(embed_dim, n), EmbedFC(1, n)
        self.up0 = nn.Sequential(nn.ConvTranspose2d(2 * n, 2 * n, size // 4, size // 4),
                                 nn.GroupNorm(_groups(2 * n), 2 * n), nn.ReLU())
        self.up1, self.up2 = Up(4 * n, n), Up(2 * n, n)
        self.out = nn.Sequential(nn.Conv2d(2 * n, n, 3, padding=1), nn.GroupNorm(_groups(n), n),
                                 nn.ReLU(), nn.Conv2d(n, channels, 3, padding=1))

    def forward(self, x, t, task, keep):
        c = torch.where(keep[:, None], self.task_embeddings[task], self.null_embedding)
        t = t[:, None]
        cemb1, temb1 = self.cemb1(c)[..., None, None], self.temb1(t)[..., None, None]
        cemb2, temb2 = self.cemb2(c)[..., None, None], self.temb2(t)[..., None, None]
        x0 = self.init_conv(x)
        down1 = self.down1(x0)
        down2 = self.down2(down1)
        hidden = nn.functional.gelu(down2.mean((2, 3), keepdim=True), approximate="tanh")
        up0 = self.up0(hidden)
        up1 = self.up1(cemb1 * up0 + temb1, down2)
        up2 = self.up2(cemb2 * up1 + temb2, down1)
        return self.out(torch.cat([up2, x0], 1))


class Diffusion:
    """The ε-loss with a linear schedule (T, β₁, β_T as in the paper)."""

    def __init__(self, T: int = 400, beta_1: float = 1e-4, beta_T: float = 0.02,  # noqa: N803
                 p_uncond: float = 0.1, device: str = "cpu"):
        self.T, self.p_uncond, self.device = T, p_uncond, device
        beta = torch.linspace(beta_1, beta_T, T, device=device)
        self.alpha_bar = torch.cumprod(1 - beta, 0)

    def loss(self, eps_fn, x0, task):
        b = x0.shape[0]
        t = torch.randint(1, self.T + 1, (b,), device=self.device)
        noise = torch.randn_like(x0)
        ab = self.alpha_bar[t - 1][:, None, None, None]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        keep = torch.rand(b, device=self.device) >= self.p_uncond
        return ((eps_fn(xt, t.float() / self.T, task, keep) - noise) ** 2).mean()


class MLEStep:
    def __init__(self, model: TorchContextUNet, lr: float = 1e-3, device: str = "cpu",
                 compile: bool = False):
        self.model, self.diff = model, Diffusion(device=device)
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.eps_fn = torch.compile(model) if compile else model

    def __call__(self, x0, task) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.diff.loss(self.eps_fn, x0, task)
        loss.backward()
        self.opt.step()
        return float(loss.detach())  # waits for the step, as JAX's timing blocks on it


class VCLStep:
    """One weight draw per step; KL to a fixed prior divided by the dataset size."""

    def __init__(self, model: TorchContextUNet, n_data: int, lr: float = 1e-3,
                 log_var_init: float = -10.0, device: str = "cpu", compile: bool = False):
        self.model, self.diff, self.n_data = model, Diffusion(device=device), n_data
        norms = {n for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}
        self.random = {n: not ("embedding" in n or n.rsplit(".", 1)[0] in norms)
                       for n, _ in model.named_parameters()}
        self.mean = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        self.log_var = {n: torch.full_like(p, log_var_init).requires_grad_()
                        for n, p in self.mean.items() if self.random[n]}
        self.prior = ({n: m.detach().clone() for n, m in self.mean.items() if self.random[n]},
                      {n: v.detach().clone() for n, v in self.log_var.items()})
        self.opt = torch.optim.Adam([*self.mean.values(), *self.log_var.values()], lr=lr)
        call = lambda w, x, t, d, k: functional_call(self.model, w, (x, t, d, k))
        self.call = torch.compile(call) if compile else call

    def kl(self):
        total = 0.0
        for n, lv in self.log_var.items():
            mp, lp = self.prior[0][n], self.prior[1][n]
            total = total + 0.5 * torch.sum(torch.exp(lv - lp) + (self.mean[n] - mp) ** 2
                                            * torch.exp(-lp) - 1 + lp - lv)
        return total

    def __call__(self, x0, task) -> float:
        self.opt.zero_grad(set_to_none=True)
        w = {n: m + torch.exp(0.5 * self.log_var[n]) * torch.randn_like(m) if self.random[n]
             else m for n, m in self.mean.items()}
        eps_fn = lambda x, t, d, k: self.call(w, x, t, d, k)
        loss = self.diff.loss(eps_fn, x0, task) + self.kl() / self.n_data
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def make_step(n_feat: int, method: str, batch: int = 128, seed: int = 0, device: str = "cpu",
              compile: bool = False):
    """A no-argument callable that runs one PyTorch train step (MLE or VCL, K = 1) on a fixed
    random batch of ``batch`` images, on ``device``; ``compile``: the U-Net through
    ``torch.compile`` (the first calls compile)."""
    torch.manual_seed(seed)
    model = TorchContextUNet(n_feat).to(device)
    kw = dict(device=device, compile=compile)
    step = MLEStep(model, **kw) if method == "mle" else VCLStep(model, n_data=6000, **kw)
    x0 = torch.rand(batch, 1, 28, 28, device=device)
    task = torch.randint(0, 10, (batch,), device=device)
    return lambda: step(x0, task)


def train_throughput(n_feat: int, method: str, batch: int = 128, steps: int = 3,
                     warmup: int = 1, seed: int = 0) -> dict:
    """Images per second of the PyTorch train step (best of ``steps`` after warm-up)."""
    step = make_step(n_feat, method, batch, seed)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    dt = min(times)
    return {"impl": "torch", "n_feat": n_feat, "method": method, "batch": batch,
            "threads": torch.get_num_threads(), "step_ms": 1e3 * dt,
            "images_per_s": batch / dt}


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """PyTorch's float32 ``n × n`` matmul rate (GFLOP/s, best of ``repeats``): the BLAS that
    its convolutions and linear layers run on, next to `benchmarks.run.gemm_gflops`."""
    a = torch.randn(n, n)
    torch.mm(a, a)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def num_params(n_feat: int) -> int:
    return sum(math.prod(p.shape) for p in TorchContextUNet(n_feat).parameters())
