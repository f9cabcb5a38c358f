"""What one hand-written backward for the whole CBAM module would save in compile time.

  python -m experiments.bench.fused_vjp                       # resnet20, batch 128
  python -m experiments.bench.fused_vjp --model resnet50 --batch 8 --image_size 224

A measurement, not a library module: :class:`FusedCBAM` is the official CBAM configuration
(avg + max pools, one MLP with biases and ReLU, a 7x7 conv then BatchNorm, sigmoid gates,
channel first) as ONE ``jax.custom_vjp`` whose backward is written out by hand with the
fewest passes we found (each pool's gradient, the BatchNorm's, the conv's through
``lax.conv`` as on GPU, the MLP's), so XLA sees one forward and one backward instead of
autodiff's and the library's fast paths'. It computes CBAM's function (its gradients equal
autodiff of the same math, ties of a max split evenly as JAX does; tested) but not the
library's bits: ``lax.conv`` and another summation order. Prints the kernels
(:func:`experiments.bench.benchmark.kernel_count`) and compile seconds of the benchmark's SGD
training step without attention, with the library's CBAM and with this one, compiled one
after another from the arguments' shapes, the fastest of ``--rounds``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags
from jax import lax

from experiments import cli
from experiments.bench import compile_kernels

PROG = 'python -m experiments.bench.fused_vjp'
EPSILON = 1e-5
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _conv(planes: jax.Array, kernel: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(planes, kernel, (1, 1), 'SAME', dimension_numbers=_DIMENSIONS)


def _forward(x, w1, b1, w2, b2, kernel, scale, bias):
  """CBAM of ``x`` ``(B, H, W, C)`` in training mode: ``(out, batch mean, batch variance,
  what the backward needs)``."""
  batch = x.shape[0]
  avg, top = x.mean((1, 2)), x.max((1, 2))
  pooled = jnp.concatenate([avg, top], 0)  # One MLP pass for both pools: (2B, C).
  hidden = jax.nn.relu(pooled @ w1 + b1)
  logits = hidden @ w2 + b2
  channel = jax.nn.sigmoid(logits[:batch] + logits[batch:])
  y = x * channel[:, None, None, :]
  planes = jnp.stack([y.mean(-1), y.max(-1)], -1)
  s = _conv(planes, kernel)[..., 0]
  mean = s.mean()
  variance = jnp.square(s - mean).mean()
  normed = (s - mean) * lax.rsqrt(variance + EPSILON)
  spatial = jax.nn.sigmoid(normed * scale[0] + bias[0])
  out = y * spatial[..., None]
  return out, mean, variance, (x, top, pooled, hidden, channel, planes, normed, spatial, variance)


@jax.custom_vjp
def fused_cbam(x, w1, b1, w2, b2, kernel, scale, bias):
  """``(out, batch mean, batch variance)`` of the spatial logits; see :func:`_forward`."""
  return _forward(x, w1, b1, w2, b2, kernel, scale, bias)[:3]


def _fused_forward(x, w1, b1, w2, b2, kernel, scale, bias):
  *outputs, saved = _forward(x, w1, b1, w2, b2, kernel, scale, bias)
  return tuple(outputs), (saved, w1, w2, kernel, scale)


def _fused_backward(residuals, cotangents):
  (x, top, pooled, hidden, channel, planes, normed, spatial, variance), w1, w2, kernel, scale = (
      residuals)
  g = cotangents[0]  # The batch statistics only feed the running averages: no gradient.
  batch, height, width, features = x.shape
  y = x * channel[:, None, None, :]
  # The spatial gate, its BatchNorm and conv.
  d_spatial = (g * y).sum(-1)
  dy = g * spatial[..., None]
  d_normed_in = d_spatial * spatial * (1 - spatial)
  d_bias = d_normed_in.sum()[None]
  d_scale = (d_normed_in * normed).sum()[None]
  d_normed = d_normed_in * scale[0]
  ds = lax.rsqrt(variance + EPSILON) * (
      d_normed - d_normed.mean() - normed * (d_normed * normed).mean())
  _, conv_vjp = jax.vjp(_conv, planes, kernel)
  d_planes, d_kernel = conv_vjp(ds[..., None])
  # The channel pools of y (the max's gradient split over ties, as JAX's).
  is_top = y == planes[..., 1:2]
  dy = (dy + d_planes[..., 0:1] / features
        + jnp.where(is_top, d_planes[..., 1:2] / is_top.sum(-1, keepdims=True), 0.0))
  # The channel gate and the shared MLP.
  d_channel = (dy * x).sum((1, 2))
  dx = dy * channel[:, None, None, :]
  d_logits = jnp.tile(d_channel * channel * (1 - channel), (2, 1))
  d_w2, d_b2 = hidden.T @ d_logits, d_logits.sum(0)
  d_hidden = (d_logits @ w2.T) * (hidden > 0)
  d_w1, d_b1 = pooled.T @ d_hidden, d_hidden.sum(0)
  d_pooled = d_hidden @ w1.T
  d_avg, d_top = d_pooled[:batch], d_pooled[batch:]
  # The spatial pools of x.
  is_max = x == top[:, None, None, :]
  dx = (dx + d_avg[:, None, None, :] / (height * width)
        + jnp.where(is_max, (d_top / is_max.sum((1, 2)))[:, None, None, :], 0.0))
  return dx, d_w1, d_b1, d_w2, d_b2, d_kernel, d_scale, d_bias


fused_cbam.defvjp(_fused_forward, _fused_backward)


class FusedCBAM(nn.Module):
  """CBAM (official configuration) through :func:`fused_cbam`; the same parameters and
  BatchNorm statistics as the library's, under other names. A measurement only: it
  normalises with the batch's statistics in evaluation mode too."""

  reduction_ratio: int = 16
  momentum: float = 0.99

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    features = x.shape[-1]
    hidden = max(1, features // self.reduction_ratio)
    kernel_init = nn.initializers.lecun_normal()
    w1 = self.param('fc1_kernel', kernel_init, (features, hidden))
    b1 = self.param('fc1_bias', nn.initializers.zeros, (hidden,))
    w2 = self.param('fc2_kernel', kernel_init, (hidden, features))
    b2 = self.param('fc2_bias', nn.initializers.zeros, (features,))
    kernel = self.param('conv_kernel', kernel_init, (7, 7, 2, 1))
    scale = self.param('norm_scale', nn.initializers.zeros, (1,))
    bias = self.param('norm_bias', nn.initializers.zeros, (1,))
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (1,))
    running_var = self.variable('batch_stats', 'var', jnp.ones, (1,))
    # Batch statistics in both modes: only the training step is measured.
    out, mean, variance = fused_cbam(x, w1, b1, w2, b2, kernel, scale, bias)
    if train and not self.is_initializing():
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_var.value = self.momentum * running_var.value + (1 - self.momentum) * variance
    return out


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string('model', 'resnet20', 'A name from cbam_jax.models.available_models().',
                      flag_values=values)
  flags.DEFINE_integer('batch', 128, 'Batch size.', lower_bound=1, flag_values=values)
  flags.DEFINE_integer('image_size', 32, 'Image height and width.', lower_bound=8,
                       flag_values=values)
  flags.DEFINE_integer('rounds', 2, 'Compiles of each program; the fastest counts.',
                       lower_bound=1, flag_values=values)
  flags.DEFINE_integer('time_rounds', 0, 'Also time the three training steps, interleaved, '
                       'this many rounds (median ms); 0 = compile only.', lower_bound=0,
                       flag_values=values)


# The three training steps compared, by their names in the output.
STEPS = {'none': None, 'cbam': 'cbam', 'one hand-written VJP': FusedCBAM}


def table(model: str, batch: int, image_size: int, rounds: int) -> str:
  """The markdown table: kernels and seconds of each step, and their ratio to the plain one."""
  from experiments.bench.benchmark import compile_jax, jax_model_setup, kernel_count

  best: dict[str, tuple[int, float, float]] = {}
  for _ in range(rounds):  # Interleaved, so that load hits every program alike.
    for name, attention in STEPS.items():
      step, args = jax_model_setup(model, {}, attention, batch, image_size, abstract=True)
      compiled, times = compile_jax(step, args, donate=(0, 1, 2))
      seconds = times.trace_s + times.lower_s + times.xla_s
      if name not in best or seconds < best[name][1]:
        best[name] = (kernel_count(compiled.as_text()), seconds, times.xla_cpu_s)
  plain_kernels, plain_seconds, plain_cpu = best['none']
  lines = [f'{model}, batch {batch}, {image_size} px: trace + lower + XLA compile of the '
           f'SGD training step, fastest of {rounds}', '',
           '| attention | kernels | seconds | XLA CPU seconds |', '|---|---:|---:|---:|']
  for name, (kernels, seconds, cpu) in best.items():
    lines.append(f'| {name} | {kernels} ({kernels / plain_kernels:.2f}x) | {seconds:.2f} '
                 f'({seconds / plain_seconds:.2f}x) | {cpu:.2f} ({cpu / plain_cpu:.2f}x) |')
  return '\n'.join(lines)


def step_times(model: str, batch: int, image_size: int, rounds: int) -> str:
  """Median milliseconds of the three training steps, timed in interleaved rounds."""
  from experiments.bench import timing
  from experiments.bench.benchmark import jax_model_setup

  calls = {}
  for name, attention in STEPS.items():
    step, args = jax_model_setup(model, {}, attention, batch, image_size)
    compiled = jax.jit(step).lower(*args).compile()
    calls[name] = lambda compiled=compiled, args=args: jax.block_until_ready(compiled(*args))
  medians = timing.interleaved_median_ms(calls, rounds)
  times = ', '.join(f'{name} {ms:.1f} ms' for name, ms in medians.items())
  fused = medians['one hand-written VJP'] / medians['cbam']
  return (f'Step time, median of {rounds} interleaved rounds: {times} ({fused:.2f}x the '
          "library's CBAM step).")


@cli.command(PROG)
def main(argv: Sequence[str] | None = None) -> str:
  """The command line (``argv`` without the program name; default ``sys.argv[1:]``); returns
  the table it prints."""
  values, _ = cli.parse(argv, define_flags, prog=PROG, usage=__doc__)
  compile_kernels.check_model(values.model)
  text = table(values.model, values.batch, values.image_size, values.rounds)
  if values.time_rounds:
    text += '\n\n' + step_times(values.model, values.batch, values.image_size,
                                values.time_rounds)
  print(text)
  return text


if __name__ == '__main__':
  main()
