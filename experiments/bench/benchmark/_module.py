"""Module rows: the official CBAM against the memory floor, the XLA conv, the paper's
CBAM, a naive Flax CBAM and the official PyTorch module."""


from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_jax.attention.cbam import CBAM
from experiments.bench.benchmark._harness import (
  TorchSide,
  jax_call,
  time_calls,
  torch_side,
)

MODULE_SHAPES = ((32, 56, 56, 256), (32, 28, 28, 512), (32, 14, 14, 1024), (32, 7, 7, 2048),
                 (32, 56, 56, 64), (128, 32, 32, 16))
TINY_MODULE_SHAPES = ((2, 8, 8, 32),)


class NaiveCBAM(nn.Module):
  """CBAM as one would first write it in Flax: Dense layers and ``nn.Conv`` on the pools."""

  reduction_ratio: int = 16
  kernel_size: int = 7

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    channels = x.shape[-1]
    hidden = max(1, channels // self.reduction_ratio)
    fc1, fc2 = nn.Dense(hidden, name='fc1'), nn.Dense(channels, name='fc2')
    mlp = lambda v: fc2(nn.relu(fc1(v)))
    channel_map = nn.sigmoid(mlp(jnp.mean(x, axis=(1, 2))) + mlp(jnp.max(x, axis=(1, 2))))
    x = x * channel_map[:, None, None, :]
    pooled = jnp.concatenate([jnp.mean(x, axis=-1, keepdims=True),
                              jnp.max(x, axis=-1, keepdims=True)], axis=-1)
    logits = nn.Conv(1, (self.kernel_size,) * 2, padding='SAME', use_bias=False,
                     name='conv')(pooled)
    logits = nn.BatchNorm(use_running_average=not train, momentum=0.99, name='norm')(logits)
    return x * nn.sigmoid(logits)



# ----------------------------------------------------------------------------------------------
# Module benchmark.


def _jax_module_cases(x: jax.Array, key: jax.Array,
                      tiny: bool) -> dict[str, tuple[nn.Module, Any]]:
  cases = {'cbam_jax': CBAM(spatial_norm=True), 'naive': NaiveCBAM()}
  if not tiny:  # Each case is two compilations; CI checks the plumbing with two.
    cases['xla'] = CBAM(spatial_norm=True, conv_impl='xla')
    cases['paper'] = CBAM()
  return {name: (module, module.init(key, x)) for name, module in cases.items()}


def _forward_fn(module: nn.Module) -> Callable[..., jax.Array]:
  return lambda variables, x: module.apply(variables, x, train=False)


def _fwd_bwd_fn(module: nn.Module) -> Callable[..., Any]:
  def loss(params, other, x, cotangent):
    out, updates = module.apply({'params': params, **other}, x, train=True,
                                mutable=['batch_stats'])
    return jnp.vdot(out, cotangent), updates

  def step(variables, x, cotangent):
    params = variables['params']
    other = {k: v for k, v in variables.items() if k != 'params'}
    (_, updates), grads = jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)(
        params, other, x, cotangent)
    return grads, updates

  return step


def _torch_module_calls(side: TorchSide,
                        shape: Sequence[int]) -> dict[str, Callable[[], Any]]:
  import torch_reference
  torch, device = side.torch, side.device
  batch, height, width, channels = shape
  calls = {}
  for name, memory_format in (('torch_cl', torch.channels_last),
                              ('torch_nchw', torch.contiguous_format)):
    # One module in eval mode for the forward, one in train mode for fwd+bwd: the calls
    # are interleaved, so neither may switch the other's mode.
    eval_module = torch_reference.OfficialCBAM(channels).to(
        device, memory_format=memory_format).eval()
    train_module = torch_reference.OfficialCBAM(channels).to(
        device, memory_format=memory_format).train()
    x = torch.randn(batch, channels, height, width, device=device).contiguous(
        memory_format=memory_format)
    cotangent = torch.randn_like(x)
    x_grad = x.clone().requires_grad_(True)

    def forward(module=eval_module, x=x):
      with torch.no_grad():
        return module(x)

    def fwd_bwd(module=train_module, x_grad=x_grad, cotangent=cotangent):
      module.zero_grad(set_to_none=True)
      x_grad.grad = None
      module(x_grad).backward(cotangent)

    calls[f'{name}/forward'] = side.blocking(forward)
    calls[f'{name}/fwd_bwd'] = side.blocking(fwd_bwd)
  return calls


def run_module(shapes: Sequence[Sequence[int]], repeats: int,
               tiny: bool = False) -> list[dict[str, Any]]:
  side = torch_side()
  rows = []
  for shape in shapes:
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, shape, jnp.float32)
    cotangent = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32)
    jax_calls = {'floor': jax_call(lambda x: x * 1.0001, [x])}
    for name, (module, variables) in _jax_module_cases(x, key, tiny).items():
      jax_calls[f'{name}/forward'] = jax_call(_forward_fn(module), [variables, x])
      jax_calls[f'{name}/fwd_bwd'] = jax_call(_fwd_bwd_fn(module), [variables, x, cotangent])
    torch_calls = {} if side is None else _torch_module_calls(side, shape)
    times = time_calls(jax_calls, torch_calls, repeats)
    row: dict[str, Any] = {'shape': list(shape), 'bytes': int(x.nbytes),
                           'floor_ms': 2 * times.pop('floor')['ms'], 'impls': {}}
    for key_name, value in times.items():
      name, mode = key_name.split('/')
      row['impls'].setdefault(name, {})[mode] = value
    head = row['impls']['cbam_jax']
    for mode in ('forward', 'fwd_bwd'):
      ms = head[mode]['ms']
      # Minimal traffic: forward reads x and writes the output; the backward also reads
      # the cotangent and writes the input gradient.
      moved = (2 if mode == 'forward' else 4) * x.nbytes
      head[mode]['gb_per_s'] = moved / (ms * 1e-3) / 1e9
      head[mode]['vs_floor'] = ms / row['floor_ms']
      for other in ('naive', 'xla', 'torch_cl', 'torch_nchw'):
        if other in row['impls']:
          head[mode][f'vs_{other}'] = ms / row['impls'][other][mode]['ms']
    rows.append(row)
    print(_module_line(row), flush=True)
  return rows


def _module_line(row: dict[str, Any]) -> str:
  parts = [f'{tuple(row["shape"])}: floor {row["floor_ms"]:.2f} ms']
  for name, times in row['impls'].items():
    parts.append(f'{name} {times["forward"]["ms"]:.2f}/{times["fwd_bwd"]["ms"]:.2f}')
  return ' | '.join(parts)
