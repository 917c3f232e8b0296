"""The PyTorch side of each case: the twin network's training step or sampler, as one closure.

Each builder takes the case's inputs (NumPy arrays made once) and settings, and a
`Variant` (device, memory format, autocast, torch.compile), and returns a
`step() -> None` that runs one training step or one sampling call. Models and
inputs live on `variant.device`; the forward pass (and the loss) runs under
`torch.autocast(device, dtype=torch.bfloat16)` for bfloat16 variants (AMP: float32
weights, no gradient scaling, which bfloat16 does not need). Adam is
`fused=True`, PyTorch's fastest implementation on CPU and CUDA.

Only the PyTorch process (and the in-process profiles) import this module.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.plan import Variant


def adam(params, lr: float, betas=(0.9, 0.999)) -> torch.optim.Optimizer:
  try:
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
  except (RuntimeError, ValueError, TypeError):  # builds without a fused kernel for this device
    return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


def memory_format(variant: Variant) -> torch.memory_format:
  return torch.channels_last if variant.memory_format == 'channels_last' else torch.contiguous_format


def prepare(module: nn.Module, variant: Variant) -> tuple[nn.Module, nn.Module]:
  """(module on the variant's device and in its memory format, what to call: compiled or the module)."""
  module = module.to(variant.device, memory_format=memory_format(variant))
  return module, (torch.compile(module) if variant.compiled else module)


def nchw(nhwc: np.ndarray, variant: Variant) -> torch.Tensor:
  """A NHWC array as an NCHW tensor on the variant's device, in its memory format.

  Transposed on the host first: a permuted view of a 1-channel NHWC array has NHWC strides and would make
  PyTorch pick channels_last kernels in the 'contiguous' variant.
  """
  x = torch.from_numpy(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))).to(variant.device)
  return x.contiguous(memory_format=memory_format(variant))


def autocast(variant: Variant):
  """`torch.autocast` to bfloat16 for bfloat16 variants, else nothing."""
  if variant.dtype == 'bfloat16':
    return torch.autocast(variant.device, dtype=torch.bfloat16)
  return contextlib.nullcontext()


def ema_(ema: list, live: list, step: int, decay: float) -> None:
  """The trainers' EMA, with TF-style warm-up of the decay."""
  d = min(decay, (1.0 + step) / (10.0 + step))
  with torch.no_grad():
    torch._foreach_lerp_(ema, live, 1.0 - d)


def classifier_train(net: nn.Module, images: np.ndarray, labels: np.ndarray, lr: float, betas, variant: Variant):
  """The classifier trainer's step: uint8 -> [-1, 1] on the device, weighted cross-entropy, Adam."""
  module, run = prepare(net, variant)
  module.train()
  opt = adam(module.parameters(), lr, betas)
  x = nchw(images, variant)
  y = torch.from_numpy(labels).long().to(variant.device)
  w = torch.ones(len(labels), device=variant.device)

  def step():
    with autocast(variant):
      logits = run(x.float() / 127.5 - 1.0)
      loss = (F.cross_entropy(logits.float(), y, reduction='none') * w).sum() / w.sum().clamp_min(1e-12)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  return step


def dcgan_train(gen: nn.Module, disc: nn.Module, images: np.ndarray, latent_dim: int, g, variant: Variant):
  """What `cxrjax.trainers.gan.make_gan_step` does, for an unconditional DCGAN without DiffAugment or R1.

  G forward without gradient, D update on the real and the fake batch, G forward again and a G update
  through the updated D (gradients of G only), EMA of G. `g` is `config.gan` (learning rates, betas, EMA).
  """
  g_mod, g_run = prepare(gen, variant)
  d_mod, d_run = prepare(disc, variant)
  g_mod.train()
  d_mod.train()
  g_params, d_params = list(g_mod.parameters()), list(d_mod.parameters())
  opt_g = adam(g_params, g.lr_g, (g.b1, g.b2))
  opt_d = adam(d_params, g.lr_d, (g.b1, g.b2))
  live = g_params + [b for b in g_mod.buffers() if b.is_floating_point()]
  ema = [t.detach().clone() for t in live]
  real = nchw(images.astype(np.float32) / 127.5 - 1.0, variant)
  batch = len(images)
  count = [0]

  def step():
    z = torch.randn(batch, latent_dim, device=variant.device)
    with autocast(variant):
      with torch.no_grad():
        fake = g_run(z)
      loss_d = F.softplus(-d_run(real)).float().mean() + F.softplus(d_run(fake)).float().mean()
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    with autocast(variant):
      loss_g = F.softplus(-d_run(g_run(z))).float().mean()  # non-saturating
    grads = torch.autograd.grad(loss_g, g_params)  # G's gradients only, as the JAX step
    for p, gr in zip(g_params, grads):
      p.grad = gr
    opt_g.step()
    ema_(ema, live, count[0], g.ema_decay)
    count[0] += 1

  return step


def dcgan_sample(gen: nn.Module, z: np.ndarray, variant: Variant):
  """The generator in eval mode, to uint8 (`gan.make_sampler`)."""
  g_mod, g_run = prepare(gen, variant)
  g_mod.eval()
  zt = torch.from_numpy(z).to(variant.device)

  def step():
    with torch.inference_mode(), autocast(variant):
      out = g_run(zt).float()
      ((out + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)

  return step


def unet_train(net: nn.Module, latents: np.ndarray, labels: np.ndarray, schedule, ldm, variant: Variant):
  """What `ldm.make_diffusion_step` does on given latents: noise, label dropout, MSE to eps or v, Adam, EMA.

  `schedule` is the trainer's `diffusion.Schedule`; `ldm` is `config.ldm`. The learning-rate warm-up of
  the UNet's schedule is not mirrored (a scalar per step).
  """
  dev = variant.device
  module, run = prepare(net, variant)
  module.train()
  params = list(module.parameters())
  opt = adam(params, ldm.unet.lr)
  ema = [p.detach().clone() for p in params]
  x0 = nchw(latents, variant)
  y = torch.from_numpy(labels).long().to(dev)
  # Writable copies: torch.from_numpy warns on read-only arrays.
  sa = torch.from_numpy(np.array(schedule.sqrt_alphas_cumprod)).to(dev)
  s1a = torch.from_numpy(np.array(schedule.sqrt_one_minus_alphas_cumprod)).to(dev)
  batch, null_label = len(labels), net.num_classes
  count = [0]

  def step():
    t = torch.randint(0, ldm.num_timesteps, (batch,), device=dev)
    noise = torch.randn_like(x0)
    a, b = sa[t].view(-1, 1, 1, 1), s1a[t].view(-1, 1, 1, 1)
    x_t = a * x0 + b * noise
    target = noise if ldm.prediction == 'eps' else a * noise - b * x0
    labels_t = torch.where(torch.rand(batch, device=dev) < ldm.label_dropout, torch.full_like(y, null_label), y)
    with autocast(variant):
      loss = F.mse_loss(run(x_t, t, labels_t).float(), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ema_(ema, params, count[0], ldm.unet.ema_decay)
    count[0] += 1

  return step


def ddim_sample(net: nn.Module, labels: np.ndarray, latent_shape, schedule, ldm, variant: Variant):
  """`diffusion.ddim_sample` (eta 0) with classifier-free guidance, cond + uncond in one batched call per step."""
  from cxrjax import diffusion  # noqa: PLC0415 - the timesteps are the JAX sampler's own

  dev = variant.device
  module, run = prepare(net, variant)
  module.eval()
  fmt = memory_format(variant)
  hw, ch = latent_shape[0], latent_shape[-1]
  sb, null_label = len(labels), net.num_classes
  y = torch.from_numpy(labels).long().to(dev)
  y2 = torch.cat([y, torch.full_like(y, null_label)])
  ts = diffusion.ddim_timesteps(ldm.num_timesteps, ldm.sample_steps)
  ts_prev = np.append(ts[1:], -1)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  gscale = ldm.guidance_scale

  def step():
    with torch.inference_mode():
      x = torch.randn(sb, ch, hw, hw, device=dev).contiguous(memory_format=fmt)
      for t, tp in zip(ts, ts_prev):
        a_t, a_p = abar[t], (abar[tp] if tp >= 0 else 1.0)
        with autocast(variant):
          out = run(torch.cat([x, x]), torch.full((2 * sb,), int(t), dtype=torch.long, device=dev), y2).float()
        out = out[sb:] + gscale * (out[:sb] - out[sb:])
        if ldm.prediction == 'eps':
          eps = out
          x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        else:  # v
          x0 = math.sqrt(a_t) * x - math.sqrt(1.0 - a_t) * out
          eps = math.sqrt(1.0 - a_t) * x + math.sqrt(a_t) * out
        x = math.sqrt(a_p) * x0 + math.sqrt(1.0 - a_p) * eps
    return x

  return step
