"""cbam_jax.nnx models: the linen zoo's names, parameter counts and numbers; converted
PyTorch weights; an NNX training loop; nnx.split/merge and orbax round trips."""

import dataclasses
import inspect
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from nnx_parity import assert_close, assert_same_step, randomized

from cbam_jax import models
from cbam_jax import nnx as cbam_nnx
from cbam_jax.nnx import transfer

MODELS_DOC = Path(__file__).resolve().parents[1] / 'docs' / 'models.md'


def rngs(seed: int = 0) -> nnx.Rngs:
  # RBG keys: threefry initialisers cost ~1 s of XLA compile per parameter shape on CPU.
  return nnx.Rngs(jax.random.key(seed, impl='rbg'))


def images(batch: int = 4, size: int = 8, seed: int = 1) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def documented_param_counts() -> list[tuple[str, str | None, int]]:
  rows = re.findall(r'^\| (\w+) \| \d+x\d+ \| \d+ \| (\w+) \| ([\d,]+) \(', MODELS_DOC.read_text(),
                    re.MULTILINE)
  return [(name, None if att == 'none' else att, int(count.replace(',', '')))
          for name, att, count in rows]


# The docs/models.md rows checked here (tracing the large models takes minutes): each block type
# and stem, each shortcut.
CHECKED_MODELS = ('resnet18', 'resnet50', 'resnet20', 'resnet_tiny')


@pytest.mark.slow
def test_every_model_name_and_documented_param_count():
  rows = documented_param_counts()
  assert {name for name, _, _ in rows} == set(models.available_models())
  assert cbam_nnx.available_models() == models.available_models()
  for name, attention, expected in rows:
    if name not in CHECKED_MODELS:
      continue
    model = nnx.eval_shape(lambda n=name, a=attention: cbam_nnx.create_model(
        n, attention=a, rngs=nnx.Rngs(0)))
    assert cbam_nnx.count_params(model) == expected, (name, attention)
  with pytest.raises(ValueError, match="Unknown model 'resnet19'"):
    cbam_nnx.create_model('resnet19', rngs=nnx.Rngs(0))


@pytest.mark.parametrize('family', models.available_backbones())
def test_signature_names_every_linen_field_with_its_default(family):
  """Every family's NNX network (like ``nnx.Linear``) names each field of its linen network
  but the linen-only layer factories, keyword-only, with the same default; a misspelt one
  gets the closest, and a linen-only one is refused by name."""
  backbone = models.get_backbone(family)
  linen = {f.name: f for f in dataclasses.fields(backbone.linen)
           if f.name not in ('parent', 'name', *backbone.linen_only)}
  params = inspect.signature(backbone.nnx.__init__).parameters
  assert set(params) - {'self', 'in_features', 'rngs'} == set(linen)
  for name, field in linen.items():
    assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    default = inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
    assert params[name].default is default, name
  assert params['rngs'].kind is inspect.Parameter.KEYWORD_ONLY
  size = next(iter(backbone.sizes))
  nnx_name = backbone.nnx.__name__
  with pytest.raises(TypeError, match=rf"{nnx_name} got unexpected field\(s\) \['atention'\] "
                                      r"\('atention': did you mean 'attention'\?\)"):
    cbam_nnx.create_model(size, atention='cbam', rngs=nnx.Rngs(0))
  for name in backbone.linen_only:
    with pytest.raises(TypeError, match=rf"unexpected field\(s\) \['{name}'\]"):
      cbam_nnx.create_model(size, **{name: None}, rngs=nnx.Rngs(0))


# (model fields, image size, train): basic and bottleneck blocks, CIFAR and ImageNet stems,
# pad and projection shortcuts, block and stage attention.
MODEL_CASES = [
    # The fast run keeps the cheapest case; a CBAM model in train mode compiles for ~20 s.
    pytest.param(dict(name='resnet_tiny', attention='cbam'), 8, True, marks=pytest.mark.slow),
    (dict(name='resnet_tiny', attention='se', stage_attention='bam', shortcut='pad'), 8, False),
    pytest.param(dict(name='resnet18', stage_sizes=(1, 1), block_cls=models.Bottleneck,
                      num_filters=4, attention='eca', num_classes=5), 16, False,
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize('fields,size,train', MODEL_CASES, ids=['tiny-cbam-train',
                                                                'tiny-se-bam-eval',
                                                                'bottleneck-eca-eval'])
def test_matches_linen_model(fields, size, train):
  fields = dict(fields)
  linen_model = models.create_model(fields.pop('name'), **fields)
  x = images(size=size)
  variables = randomized(jax.eval_shape(linen_model.init, jax.random.key(0), x), seed=3)
  model = transfer.from_linen(linen_model, variables)
  assert isinstance(model, cbam_nnx.ResNet)
  assert_same_step(linen_model, model, variables, x, train)


@pytest.mark.slow
def test_same_structure_as_linen_create_model():
  linen_model = models.create_model('resnet20', attention='cbam')
  variables = jax.eval_shape(linen_model.init, jax.random.key(0), images(size=32))
  model = nnx.eval_shape(lambda: cbam_nnx.create_model('resnet20', attention='cbam',
                                                         rngs=nnx.Rngs(0)))
  shapes = jax.tree_util.tree_map(jnp.shape, transfer.to_linen(model))
  assert shapes == jax.tree_util.tree_map(jnp.shape, dict(variables))
  # The official preset: spatial BatchNorm, scale zero-initialised (gate starts at 0.5).
  real = cbam_nnx.create_model('resnet_tiny', attention='cbam', rngs=rngs())
  np.testing.assert_array_equal(real.layer1_0.attention.spatial.norm.scale[...], 0.0)
  assert real.layer1_0.attention.spatial.norm.momentum == 0.99


@pytest.mark.slow
def test_training_loop_then_split_merge_and_orbax_round_trips(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  model = cbam_nnx.create_model('resnet_tiny', attention='cbam', rngs=rngs())
  x = images(batch=8)
  labels = jnp.arange(8) % 10
  optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)

  def loss_fn(model, x, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

  @nnx.jit
  def train_step(model, optimizer, x, labels):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, labels)
    optimizer.update(model, grads)
    return loss

  stats_before = transfer.to_linen(model)['batch_stats']
  losses = [float(train_step(model, optimizer, x, labels)) for _ in range(6)]
  assert losses[-1] < losses[0], losses
  stats = transfer.to_linen(model)['batch_stats']
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), stats,
                                 stats_before)
  assert min(jax.tree_util.tree_leaves(moved)) > 0  # Every BatchNorm, attention's too.

  model.eval()
  forward = nnx.jit(lambda m, x: m(x))
  expected = forward(model, x)
  assert expected.shape == (8, 10)
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         transfer.to_linen(model)['batch_stats'], stats)  # eval: untouched.

  graphdef, state = nnx.split(model)
  np.testing.assert_array_equal(np.asarray(forward(nnx.merge(graphdef, state), x)),
                                np.asarray(expected))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'state', state)
    checkpointer.wait_until_finished()
    abstract = nnx.eval_shape(lambda: cbam_nnx.create_model(
        'resnet_tiny', attention='cbam', rngs=nnx.Rngs(2)))
    abstract_graphdef, abstract_state = nnx.split(abstract)
    restored = checkpointer.restore(tmp_path / 'state', abstract_state)
  restored_model = nnx.merge(abstract_graphdef, restored)
  restored_model.eval()
  np.testing.assert_array_equal(np.asarray(forward(restored_model, x)), np.asarray(expected))
  # And to linen: the same logits from the linen model.
  linen_model = models.create_model('resnet_tiny', attention='cbam')
  assert_close(jax.jit(linen_model.apply)(transfer.to_linen(restored_model), x), expected)


def test_load_linen_names_what_does_not_fit():
  model = nnx.eval_shape(lambda: cbam_nnx.create_model('resnet_tiny', attention='cbam',
                                                         rngs=nnx.Rngs(0)))
  linen_model = models.create_model('resnet_tiny', attention='se')
  variables = jax.eval_shape(linen_model.init, jax.random.key(0), images())
  with pytest.raises(ValueError, match=r'params missing \(\d+\): .*spatial'):
    transfer.load_linen(model, variables)
