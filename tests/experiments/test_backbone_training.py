"""The trainer with the new backbones (issue 32): it builds every family by name from
``config.model`` and takes a real training step of each."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbam_jax import models, saving
from experiments.configs import smoke
from experiments.training import train_lib


def _images(batch: int, size: int, seed: int = 1) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def _one_step(model, tx) -> tuple[train_lib.TrainState, train_lib.TrainState]:
  state = jax.jit(functools.partial(train_lib.create_train_state, model, tx, (32, 32, 3), 0))()
  batch = {'image': _images(2, 32), 'label': jnp.array([0, 3])}
  step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx, label_smoothing=0.0))
  return state, step(state, batch)


@pytest.mark.parametrize('name', ['wrn16_8', 'resnext29_8x64d', 'resnext50_32x4d',
                                  'mobilenet_v2', 'mobilenetv1_070'])
def test_the_trainer_builds_the_model_by_name(name):
  config = smoke.get_config()
  config.model.name = name
  description = train_lib.model_description(config, num_classes=10)
  assert description['backbone'] == models.backbone_for_model(name).family
  assert saving.build(description) == models.create_model(name, num_classes=10,
                                                          attention='cbam')


@pytest.mark.slow
def test_one_trainer_step_of_wrn16_8():
  config = smoke.get_config()
  config.model.name = 'wrn16_8'
  config.model.attention = 'none'  # CBAM's compile time is tested elsewhere.
  # Family fields through config.model, and a network that compiles in seconds.
  config.model.depth, config.model.widen_factor = 10, 1
  model = saving.build(train_lib.model_description(config, num_classes=10))
  assert (model.depth, model.widen_factor) == (10, 1)
  state, new = _one_step(model, optax.sgd(0.05, momentum=0.9))
  assert int(new.step) == 1 and np.isfinite(float(new.epoch_sums['loss']))
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params, state.params)
  assert max(jax.tree_util.tree_leaves(moved)) > 0


@pytest.mark.slow
def test_the_trainer_builds_and_steps_mobilenet_v2():
  config = smoke.get_config()
  config.model.name = 'mobilenet_v2'
  config.model.width_multiplier = 0.25  # A family field through config.model.
  config.model.attention = 'none'  # Compiles in a fraction of CBAM's time.
  description = train_lib.model_description(config, num_classes=4)
  assert description['backbone'] == 'mobilenet_v2'
  model = saving.build(description)
  assert model.attention is None and model.num_classes == 4 and model.width_multiplier == 0.25
  state, new = _one_step(model, optax.sgd(0.05))
  assert int(new.step) == 1 and np.isfinite(float(new.epoch_sums['loss']))
  assert not np.array_equal(new.params['fc']['kernel'], state.params['fc']['kernel'])
