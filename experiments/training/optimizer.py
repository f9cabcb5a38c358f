"""The optimiser and learning-rate schedule of a training config (optax)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

PyTree = Any


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup, then 'cosine' to zero, 'step' decay or 'constant'."""
  peak = config.learning_rate
  if config.lr_reference_batch_size:
    peak *= config.global_batch_size / config.lr_reference_batch_size
  total_steps = config.num_epochs * steps_per_epoch
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1), end_value=0.0)
  if config.schedule == 'step':
    boundaries = {int(epoch * steps_per_epoch): config.lr_decay_factor
                  for epoch in config.lr_decay_epochs}
    after_warmup = optax.piecewise_constant_schedule(
        peak, {step - warmup_steps: factor for step, factor in boundaries.items()
               if step > warmup_steps})
  elif config.schedule == 'constant':
    after_warmup = optax.constant_schedule(peak)
  else:
    raise ValueError(f'config.schedule={config.schedule!r} is not one of cosine, step, '
                     'constant.')
  if not warmup_steps:
    return after_warmup
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, after_warmup], [warmup_steps])


def decay_mask(params: PyTree) -> PyTree:
  """True for kernels (2+ dims); biases and normalisation scales/offsets are not decayed."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config: ml_collections.ConfigDict,
                     steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``(optimiser, learning-rate schedule)`` for ``config``."""
  schedule = learning_rate_schedule(config, steps_per_epoch)
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == 'sgd':
    if config.weight_decay:
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum or None,
                           nesterov=bool(config.nesterov and config.momentum)))
  elif config.optimizer == 'adamw':
    parts.append(optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                             weight_decay=config.weight_decay, mask=decay_mask))
  else:
    raise ValueError(f'config.optimizer={config.optimizer!r} is not one of sgd, adamw.')
  return optax.chain(*parts), schedule
