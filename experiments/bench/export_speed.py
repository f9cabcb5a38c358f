r"""Inference time of an exported CBAM ResNet: onnxruntime and reloaded StableHLO against JAX.

  python -m experiments.bench.export_speed                       # ResNet-50, 224x224, batch 1 and 8
  python -m experiments.bench.export_speed --model resnet20 --image_size 32

Exports the model (evaluation mode, random weights of the trained scale) with
cbam_jax.export, checks the outputs against JAX, then times the three side by side,
interleaved (experiments.bench.timing), on this machine's CPU. Needs the ONNX converter
(docs/deploy.md). The numbers in docs/deploy.md come from this script.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.bench import timing

PROG = 'python -m experiments.bench.export_speed'


def _define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string('model', 'resnet50', 'A cbam_jax.models name.', flag_values=values)
  flags.DEFINE_string('attention', 'cbam', 'The attention of every block.', flag_values=values)
  flags.DEFINE_integer('image_size', 224, 'Input height and width.', flag_values=values)
  flags.DEFINE_list('batch_sizes', ['1', '8'], 'Batch sizes to time.', flag_values=values)
  flags.DEFINE_integer('rounds', 10, 'Interleaved rounds per batch size.', flag_values=values)


def _variables(model, x):
  """Random variables with He-scaled kernels and varied BatchNorm statistics: the scale of a
  trained model's activations, without compiling ``init``."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
    if name.endswith("['scale']"):
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    if name.endswith("['kernel']") and len(leaf.shape) > 1:
      std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
      return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)
    return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _cpu_name() -> str:
  try:
    lines = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return platform.processor() or 'unknown CPU'
  names = [line.split(':', 1)[1].strip() for line in lines.splitlines()
           if line.startswith('Model name')]
  return names[0] if names else 'unknown CPU'


def main(argv: Sequence[str] | None = None) -> dict[int, dict[str, float]]:
  values = flags.FlagValues()
  _define_flags(values)
  try:
    values([PROG, *(sys.argv[1:] if argv is None else argv)])
  except flags.Error as error:
    print(f'{PROG}: {" ".join(str(error).split())}', file=sys.stderr)
    raise SystemExit(2) from None
  import onnxruntime

  from cbam_jax.export import to_onnx, to_stablehlo
  from cbam_jax.models import create_model

  model = create_model(values.model, attention=values.attention)
  size = values.image_size
  batches = [int(b) for b in values.batch_sizes]
  rng = np.random.default_rng(1)
  example = jnp.asarray(rng.standard_normal((1, size, size, 3)), jnp.float32)
  variables = _variables(model, example)
  jitted = jax.jit(lambda x: model.apply(variables, x, train=False))
  exported = jax.export.deserialize(to_stablehlo(model, variables, example))
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'model.onnx')
    to_onnx(model, variables, example, path)
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
  print(f'{values.model} + {values.attention}, {size}x{size}, float32, {_cpu_name()}, '
        f'{os.cpu_count()} cores, jax {jax.__version__}, onnxruntime '
        f'{onnxruntime.__version__}; median (min) ms per batch over {values.rounds} '
        'interleaved rounds')
  results = {}
  for batch in batches:
    x = np.asarray(rng.standard_normal((batch, size, size, 3)), np.float32)
    want = np.asarray(jitted(x))
    onnx_out, = session.run(None, {'input': x})
    error = max(float(np.max(np.abs(onnx_out - want))),
                float(np.max(np.abs(np.asarray(exported.call(x)) - want))))
    calls = {
        'jax.jit': lambda x=x: jax.block_until_ready(jitted(x)),
        'stablehlo': lambda x=x: jax.block_until_ready(exported.call(x)),
        'onnxruntime': lambda x=x: session.run(None, {'input': x}),
    }
    times = timing.interleaved_times(calls, values.rounds)
    medians, minima = timing.median_ms(times), timing.min_ms(times)
    ratios = timing.ratios(medians, 'jax.jit')
    print(f'batch {batch} (max |diff| vs jax.jit {error:.2g}): ' + ', '.join(
        f'{name} {medians[name]:.1f} ({minima[name]:.1f}) ms = {ratios[name]:.2f}x'
        for name in calls))
    results[batch] = medians
  return results


if __name__ == '__main__':
  main()
