"""Conv rows: forward, input and kernel gradient of ResNet-20's 3x3 convs, JAX against
torch channels-last."""


from __future__ import annotations

import functools
from typing import Any

import jax

from experiments.bench.benchmark._harness import (
  jax_call,
  time_calls,
  torch_side,
)

# ----------------------------------------------------------------------------------------------
# Conv passes: where XLA:CPU's training step loses to PyTorch's.


def run_convs(cases, repeats: int) -> list[dict[str, Any]]:
  """Forward, input gradient and kernel gradient of a 3x3 conv, JAX NHWC vs torch CL."""
  side = torch_side()
  torch = None if side is None else side.torch
  from jax import lax

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  rows = []
  for batch, height, width, c_in, c_out in cases:
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, height, width, c_in))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c_in, c_out)) * 0.1
    g = jax.random.normal(jax.random.PRNGKey(2), (batch, height, width, c_out))
    jax_calls = {
        'jax/forward': jax_call(conv, [x, w]),
        'jax/input_grad': jax_call(lambda g, x, w: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
                                   [g, x, w]),
        'jax/kernel_grad': jax_call(lambda g, x, w: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
                                    [g, x, w]),
    }
    torch_calls = {}
    if side is not None:
      cl = torch.channels_last
      randn = functools.partial(torch.randn, device=side.device)
      tx = randn(batch, c_in, height, width).contiguous(memory_format=cl)
      tw = randn(c_out, c_in, 3, 3).contiguous(memory_format=cl)
      tg = randn(batch, c_out, height, width).contiguous(memory_format=cl)

      def backward(mask, tx=tx, tw=tw, tg=tg):
        return lambda: torch.ops.aten.convolution_backward(
            tg, tx, tw, [0], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

      torch_calls = {
          'torch_cl/forward': side.blocking(
              lambda tx=tx, tw=tw: torch.nn.functional.conv2d(tx, tw, padding=1)),
          'torch_cl/input_grad': side.blocking(backward([True, False, False])),
          'torch_cl/kernel_grad': side.blocking(backward([False, True, False])),
      }
    times = time_calls(jax_calls, torch_calls, repeats)
    row: dict[str, Any] = {'shape': [batch, height, width, c_in, c_out], 'passes': {}}
    for name, value in times.items():
      impl, conv_pass = name.split('/')
      row['passes'].setdefault(conv_pass, {})[impl] = value['ms']
    for values in row['passes'].values():
      if 'torch_cl' in values:
        values['jax_vs_torch_cl'] = values['jax'] / values['torch_cl']
    rows.append(row)
    print(f'conv {row["shape"]}: ' + ' | '.join(
        f'{p} ' + '/'.join(f'{v:.2f}' for v in values.values())
        for p, values in row['passes'].items()), flush=True)
  return rows
