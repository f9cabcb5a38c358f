"""Model rows: one training step with and without CBAM, JAX and PyTorch, its time and peak
memory; memory rows: XLA's buffer assignment for the same steps."""


from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cbam_jax import models
from cbam_jax.conv import materializes_input
from cbam_jax.models._attention import AttentionSpec
from experiments.bench.benchmark._harness import (
  TorchSide,
  compile_jax,
  jax_call,
  time_calls,
  torch_side,
)

# ----------------------------------------------------------------------------------------------
# Model benchmark.


def jax_train_step(model: nn.Module, optimizer: optax.GradientTransformation):
  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                    train=True, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates['batch_stats']

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    with jax.named_scope('optimizer'):  # Metadata only: lets compile_kernels find the update.
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    return params, new_stats, opt_state, loss

  return step


def jax_model_setup(name: str, fields: dict[str, Any], attention: AttentionSpec, batch: int,
                     size: int, *, abstract: bool = False):
  """The SGD training step of ``create_model(name, attention=..., **fields)`` and its
  arguments ``[params, batch_stats, opt_state, images, labels]``. ``abstract``: the
  arguments as ``jax.ShapeDtypeStruct`` (``jax.eval_shape``; nothing is initialised),
  enough to trace, lower and compile the step, not to run it."""
  model = models.create_model(name, attention=attention, **fields)
  optimizer = optax.sgd(0.1, momentum=0.9)

  def arguments():
    images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
    labels = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, model.num_classes)
    variables = model.init(jax.random.PRNGKey(2), images[:1], train=False)
    params, batch_stats = variables['params'], variables['batch_stats']
    return [params, batch_stats, optimizer.init(params), images, labels]

  args = jax.eval_shape(arguments) if abstract else arguments()
  return jax_train_step(model, optimizer), args


def torch_model(name: str, fields: dict[str, Any], attention: bool):
  """The PyTorch counterpart of ``create_model(name, **fields)``, with official CBAM in
  every block when ``attention`` (:mod:`torch_reference`)."""
  import torch_reference
  jax_model = models.create_model(name, **fields)
  if name == 'mobilenet_v2':
    return torch_reference.MobileNetV2(attention, num_classes=jax_model.num_classes)
  # The ResNet family: stage sizes, groups and width from the JAX model's own fields.
  return torch_reference.benchmark_resnet(
      jax_model.stage_sizes, stem='cifar' if name == 'resnet20' else 'imagenet',
      attention=attention, num_classes=jax_model.num_classes, groups=jax_model.groups,
      width_per_group=jax_model.width_per_group)


def _torch_model_step(side: TorchSide, name: str, fields: dict[str, Any], attention: bool,
                      batch: int, size: int, channels_last: bool,
                      ) -> tuple[Callable[[], None], Callable[[], float]]:
  """The blocking training step and a function measuring its peak MB (run after the timed
  calls: the optimizer's momentum exists from the first step on)."""
  torch, device = side.torch, side.device
  model = torch_model(name, fields, attention)
  classes = models.create_model(name, **fields).num_classes
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(device, memory_format=memory_format).train()
  images = torch.randn(batch, 3, size, size, device=device).contiguous(
      memory_format=memory_format)
  labels = torch.randint(0, classes, (batch,), device=device)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()

  blocking = side.blocking(step)

  def peak_mb() -> float:
    optimizer.zero_grad(set_to_none=True)  # The step's own first act, outside the count.
    state = [tensor for group in optimizer.state.values() for tensor in group.values()
             if torch.is_tensor(tensor)]
    live = [*model.parameters(), *model.buffers(), *state, images, labels]
    return side.step_peak_bytes(blocking, live) / 2**20

  return blocking, peak_mb


def run_models(cases, repeats: int) -> list[dict[str, Any]]:
  side = torch_side()
  # The models' default conv (MaterializedInputConv) beside plain nn.Conv; where it
  # materialises nothing (accelerators) the two are one program, timed once.
  conv_cases = [('jax', {})]
  if materializes_input():
    conv_cases.append(('jax_nn_conv', {'conv': nn.Conv}))
  rows = []
  for name, fields, batch, size in cases:
    row: dict[str, Any] = {'model': name, 'fields': fields, 'batch': batch, 'image_size': size}
    jax_calls, torch_calls, peak_mb = {}, {}, {}
    for attention in (None, 'cbam'):
      tag = 'cbam' if attention else 'plain'
      for prefix, conv_fields in conv_cases:
        case_fields = {**fields, **conv_fields}
        step, args = jax_model_setup(name, case_fields, attention, batch, size)
        cache_key = (name, repr(case_fields), attention, batch, size)
        jax_calls[f'{prefix}_{tag}'] = jax_call(step, args, donate=(0, 1, 2),
                                                cache_key=cache_key)
        compiled, _ = compile_jax(step, args, (0, 1, 2), cache_key=cache_key)  # Cached.
        peak_mb[f'{prefix}_{tag}'] = lambda compiled=compiled: step_memory(compiled)['peak_mb']
      if side is not None:
        for layout, channels_last in (('cl', True), ('nchw', False)):
          torch_calls[f'torch_{layout}_{tag}'], peak_mb[f'torch_{layout}_{tag}'] = (
              _torch_model_step(side, name, fields, attention is not None, batch, size,
                                channels_last))
    row['impls'] = time_calls(jax_calls, torch_calls, repeats)
    for impl, times in row['impls'].items():
      times['images_per_s'] = batch / (times['ms'] * 1e-3)
      times['peak_mb'] = peak_mb[impl]()
    impls = row['impls']
    row['cbam_overhead'] = {
        prefix: impls[f'{prefix}_cbam']['ms'] / impls[f'{prefix}_plain']['ms']
        for prefix in ('jax', 'jax_nn_conv', 'torch_cl', 'torch_nchw')
        if f'{prefix}_cbam' in impls}
    row['jax_vs_nn_conv'] = {tag: impls[f'jax_{tag}']['ms'] / impls[f'jax_nn_conv_{tag}']['ms']
                             for tag in ('plain', 'cbam') if f'jax_nn_conv_{tag}' in impls}
    row['jax_vs_torch'] = {
        f'{layout}_{tag}': impls[f'jax_{tag}']['ms'] / impls[f'torch_{layout}_{tag}']['ms']
        for layout in ('cl', 'nchw') for tag in ('plain', 'cbam')
        if f'torch_{layout}_{tag}' in impls}
    rows.append(row)
    print(f'{name} b{batch} {size}px: ' + ' | '.join(
        f'{k} {v["ms"]:.1f} ms' for k, v in impls.items()), flush=True)
  return rows


def step_memory(compiled: Any) -> dict[str, float]:
  """MB from XLA's buffer assignment of a compiled step (``memory_analysis()``)."""
  stats = compiled.memory_analysis()
  # XLA:CPU reports no real peak (peak_memory_in_bytes is the argument size there), so
  # the peak is bounded by everything live at once: arguments + outputs + temporaries.
  live = (stats.argument_size_in_bytes + stats.output_size_in_bytes +
          stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return {
      'peak_mb': live / 2**20,
      'xla_peak_mb': getattr(stats, 'peak_memory_in_bytes', 0) / 2**20,
      'temp_mb': stats.temp_size_in_bytes / 2**20,
      'argument_mb': stats.argument_size_in_bytes / 2**20,
      'output_mb': stats.output_size_in_bytes / 2**20,
  }


def run_memory(cases) -> list[dict[str, Any]]:
  rows = []
  for name, fields, batch, size in cases:
    row: dict[str, Any] = {'model': name, 'batch': batch, 'image_size': size}
    for attention in (None, 'cbam'):
      step, args = jax_model_setup(name, fields, attention, batch, size)
      compiled, _ = compile_jax(step, args, (0, 1, 2),
                                cache_key=(name, repr(fields), attention, batch, size))
      tag = 'cbam' if attention else 'plain'
      row[tag] = step_memory(compiled)
    row['cbam_ratio'] = (row['cbam']['peak_mb'] / row['plain']['peak_mb']
                         if row['plain']['peak_mb'] else None)
    rows.append(row)
    print(f'{name} b{batch}: peak {row["plain"]["peak_mb"]:.0f} MB plain, '
          f'{row["cbam"]["peak_mb"]:.0f} MB with CBAM', flush=True)
  return rows
