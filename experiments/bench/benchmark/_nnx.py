"""NNX rows: the CBAM training step of cbam_jax.nnx (nnx.jit and split/jit/merge) against
the linen step, time and peak memory."""


from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from experiments.bench.benchmark._harness import (
  CompileTimes,
  compile_jax,
  jax_call,
  time_calls,
)
from experiments.bench.benchmark._models import jax_model_setup, step_memory

# ----------------------------------------------------------------------------------------------
# NNX against linen: the same CBAM training step.

NNX_CASES = (('resnet20', {}, 128, 32),)
TINY_NNX_CASES = (('resnet20', {'stage_sizes': (1,)}, 2, 8),)


def nnx_setup(name: str, fields: dict[str, Any], batch: int, size: int,
              attention: str | None = 'cbam', *, abstract: bool = False):
  """An NNX model (CBAM by default) with its optimizer (same SGD as the linen step) and the
  batch. ``abstract``: every array a ``jax.ShapeDtypeStruct`` (``nnx.eval_shape``; nothing
  is initialised), enough to trace, lower and compile a step, not to run it."""
  from flax import nnx

  from cbam_jax.nnx import create_model as create_nnx_model

  def build():
    model = create_nnx_model(name, attention=attention, rngs=nnx.Rngs(2), **fields)
    images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
    labels = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, model.num_classes)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    return model, optimizer, images, labels

  return nnx.eval_shape(build) if abstract else build()


def nnx_train_step(model, optimizer, images, labels):
  from flax import nnx

  def loss_fn(model):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def _nnx_jit_call(model, optimizer, images, labels):
  """nnx.jit: the module and optimizer are updated in place. ``((call, compile_s), memory)``."""
  from flax import nnx

  step = nnx.jit(nnx_train_step, donate_argnums=(0, 1))
  start = time.perf_counter()
  lowered = step.lower(model, optimizer, images, labels)  # Traces and lowers.
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compile_s = CompileTimes(lowered_at - start, 0.0, time.perf_counter() - lowered_at)
  jax.block_until_ready(step(model, optimizer, images, labels))  # Traced once, cached.
  return ((lambda: jax.block_until_ready(step(model, optimizer, images, labels)), compile_s),
          step_memory(compiled))


def _nnx_split_call(model, optimizer, images, labels, cache_key):
  """nnx.split / jax.jit / nnx.merge: one pure function of the donated state."""
  from flax import nnx

  graphdef, state = nnx.split((model, optimizer))

  def functional_step(state, images, labels):
    model, optimizer = nnx.merge(graphdef, state)
    loss = nnx_train_step(model, optimizer, images, labels)
    return nnx.state((model, optimizer)), loss

  args = [state, images, labels]
  call = jax_call(functional_step, args, donate=(0,), cache_key=cache_key)
  return call, step_memory(compile_jax(functional_step, args, (0,), cache_key=cache_key)[0])


def run_nnx(cases, repeats: int) -> list[dict[str, Any]]:

  rows = []
  for name, fields, batch, size in cases:
    row: dict[str, Any] = {'model': name, 'fields': fields, 'batch': batch, 'image_size': size,
                           'attention': 'cbam'}
    linen_step, linen_args = jax_model_setup(name, fields, 'cbam', batch, size)
    linen_key = (name, repr(fields), 'cbam', batch, size)
    calls = {'linen': jax_call(linen_step, linen_args, donate=(0, 1, 2), cache_key=linen_key)}
    memory = {'linen': step_memory(compile_jax(linen_step, linen_args, (0, 1, 2),
                                               cache_key=linen_key)[0])}

    nnx_key = ('nnx', name, repr(fields), batch, size)
    calls['nnx_jit'], memory['nnx_jit'] = _nnx_jit_call(*nnx_setup(name, fields, batch, size))
    calls['nnx_split'], memory['nnx_split'] = _nnx_split_call(
        *nnx_setup(name, fields, batch, size), cache_key=nnx_key)
    row['impls'] = time_calls(calls, {}, repeats)
    for impl, times in row['impls'].items():
      times['images_per_s'] = batch / (times['ms'] * 1e-3)
      times['peak_mb'] = memory[impl]['peak_mb']
    linen = row['impls']['linen']
    row['vs_linen'] = {impl: {'time': times['ms'] / linen['ms'],
                              'peak_memory': times['peak_mb'] / linen['peak_mb']}
                       for impl, times in row['impls'].items() if impl != 'linen'}
    row['targets_met'] = {impl: ratios['time'] <= 1.05 and abs(ratios['peak_memory'] - 1) <= 0.05
                          for impl, ratios in row['vs_linen'].items()}
    rows.append(row)
    print(f'{name} b{batch} {size}px CBAM: ' + ' | '.join(
        f'{k} {v["ms"]:.1f} ms {v["peak_mb"]:.0f} MB' for k, v in row['impls'].items()),
        flush=True)
  return rows
