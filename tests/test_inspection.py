"""Tests for cbam_jax.inspection: map extraction, upsampling, Grad-CAM, localisation scores."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from random_variables import random_variables

from cbam_jax import CBAM, ChannelAttention, SpatialAttention, models
from cbam_jax import inspection as ci
from cbam_jax.attention import SqueezeExcitation


@functools.cache
def _tiny_resnet(attention):
  model = models.create_model('resnet_tiny', attention=attention, num_classes=5)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  return model, random_variables(model, x), x


@pytest.mark.slow
def test_resnet_cbam_maps_by_block():
  model, variables, x = _tiny_resnet('cbam')
  # jit: one compilation is much cheaper than op-by-op dispatch through a ResNet.
  logits, maps = jax.jit(
      lambda v, x: ci.attention_maps(model, v, x, return_output=True))(variables, x)
  assert sorted(maps) == ['layer1_0', 'layer2_0']
  chex.assert_shape(maps['layer1_0']['channel_map'], (2, 8))
  chex.assert_shape(maps['layer1_0']['spatial_map'], (2, 16, 16))
  chex.assert_shape(maps['layer2_0']['channel_map'], (2, 16))
  chex.assert_shape(maps['layer2_0']['spatial_map'], (2, 8, 8))
  _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=['intermediates']))(variables, x)
  expected = state['intermediates']['layer2_0']['attention']['spatial']['spatial_map'][0]
  chex.assert_trees_all_close(maps['layer2_0']['spatial_map'], expected)


def test_resnet_without_attention_has_no_maps():
  model, variables, x = _tiny_resnet(None)
  maps = jax.eval_shape(lambda v, x: ci.attention_maps(model, v, x), variables, x)
  assert maps == {}


@pytest.mark.parametrize('module, names', [
    (CBAM(reduction_ratio=4), ['channel_map', 'spatial_map']),
    (ChannelAttention(reduction_ratio=4), ['channel_map']),
    (SpatialAttention(), ['spatial_map']),
    (SqueezeExcitation(reduction_ratio=4), ['channel_map']),
], ids=['cbam', 'channel', 'spatial', 'se'])
def test_bare_modules(module, names):
  x = jax.random.normal(jax.random.key(0), (3, 5, 6, 8))
  maps = jax.jit(lambda v, x: ci.attention_maps(module, v, x))(random_variables(module, x), x)
  assert list(maps) == ['']
  assert sorted(maps['']) == names
  if 'channel_map' in names:
    chex.assert_shape(maps['']['channel_map'], (3, 8))
  if 'spatial_map' in names:
    chex.assert_shape(maps['']['spatial_map'], (3, 5, 6))


def test_full_paths_with_empty_strip_and_repeated_calls():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      attention = ChannelAttention(reduction_ratio=2, name='attention')
      return attention(attention(x))

  x = jnp.ones((1, 4, 4, 4))
  model = Twice()
  variables = model.init(jax.random.key(0), x)
  flat = ci.flatten_intermediates(
      model.apply(variables, x, mutable=['intermediates'])[1]['intermediates'])
  assert sorted(flat) == ['attention/channel_map[0]', 'attention/channel_map[1]']
  assert sorted(ci.attention_maps(model, variables, x, strip=())) == ['attention[0]',
                                                                     'attention[1]']


def test_top_channels():
  channel_map = jnp.array([[0.1, 0.9, 0.5, 0.3], [0.3, 0.7, 0.1, 0.9]])
  indices, values = ci.top_channels(channel_map, k=2)
  np.testing.assert_array_equal(indices, [1, 3])
  np.testing.assert_allclose(values, [0.8, 0.6], rtol=1e-6)
  per_block = ci.top_channels({'a': {'channel_map': channel_map},
                               'b': {'spatial_map': jnp.ones((2, 3, 3))}}, k=9)
  assert list(per_block) == ['a']
  np.testing.assert_array_equal(per_block['a'][0], [1, 3, 2, 0])
  with pytest.raises(ValueError, match='k must be'):
    ci.top_channels(channel_map, k=0)


def test_constant_stays_constant(variant):
  maps = jnp.full((2, 4, 5), 0.37)
  out = variant(lambda m: ci.upsample(m, (16, 20)))(maps)
  chex.assert_shape(out, (2, 16, 20))
  np.testing.assert_allclose(out, 0.37, rtol=1e-6)


def test_one_hot_lands_on_its_cell(variant):
  maps = jnp.zeros((1, 2, 2)).at[0, 1, 0].set(1.0)  # bottom-left cell
  nearest = variant(lambda m: ci.upsample(m, 8, method='nearest'))(maps)
  expected = np.zeros((1, 8, 8))
  expected[0, 4:, :4] = 1.0
  np.testing.assert_array_equal(nearest, expected)
  bilinear = variant(lambda m: ci.upsample(m, 8))(maps)
  # Half-pixel centres: the input cell's centre (pixels 5.5, 1.5) lies between output
  # pixels, whose 2x2 neighbourhood holds the maximum; the far corner stays 0.
  assert float(bilinear[0, 7, 0]) == pytest.approx(1.0, abs=5e-7)
  assert float(bilinear[0, 0, 7]) == pytest.approx(0.0, abs=5e-7)
  assert float(bilinear[0, 4:, :4].sum()) > 0.75 * float(bilinear.sum())


def test_unbatched_and_errors():
  chex.assert_shape(ci.upsample(jnp.ones((3, 3)), (6, 9)), (6, 9))
  with pytest.raises(ValueError, match='spatial maps'):
    ci.upsample(jnp.ones((2, 3, 4, 5)), 8)
  with pytest.raises(ValueError, match='size'):
    ci.upsample(jnp.ones((2, 3, 4)), (0, 4))


class _Features(nn.Module):
  """A named block whose output is fixed: the input itself (B, H, W, C)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return x * 1.0


class _LinearHead(nn.Module):
  """score_k = sum_c W[c, k] * mean_hw(A_c) (+ squares with ``square=True``)."""

  weights: np.ndarray
  square: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    a = _Features(name='features')(x, train)
    pooled = jnp.mean(a * a if self.square else a, axis=(1, 2))
    return pooled @ jnp.asarray(self.weights)


def _grad_cam_inputs():
  """Activations A (3, 4, 5, 6) and head weights W (6, 4), the same in every test."""
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(3, 4, 5, 6)), jnp.float32),
          rng.normal(size=(6, 4)).astype(np.float32))


def _expected_cam(raw):
  raw = np.maximum(np.asarray(raw), 0.0)
  lo = raw.min(axis=(1, 2), keepdims=True)
  hi = raw.max(axis=(1, 2), keepdims=True)
  return (raw - lo) / (hi - lo)


def test_linear_model_known_answer(variant):
  a, w = _grad_cam_inputs()
  model = _LinearHead(w)
  target = jnp.array([0, 3, 1])
  cam, logits = variant(
      lambda a, t: ci.grad_cam(model, {}, a, 'features', t, return_logits=True))(a, target)
  # d score / d A = W[c, t] / (H W): the weights are W[:, t] up to a positive factor.
  raw = np.einsum('bhwc,cb->bhw', a, w[:, np.asarray(target)])
  np.testing.assert_allclose(cam, _expected_cam(raw), atol=1e-5)
  np.testing.assert_allclose(logits, np.asarray(a).mean(axis=(1, 2)) @ w,
                             rtol=1e-5, atol=1e-6)
  unnormalised = variant(
      lambda a, t: ci.grad_cam(model, {}, a, 'features', t, normalize=None))(a, target)
  np.testing.assert_allclose(unnormalised, np.maximum(raw, 0) / 20, rtol=1e-5, atol=1e-6)


def test_default_target_is_the_prediction():
  a, w = _grad_cam_inputs()
  model = _LinearHead(w)
  predicted = np.argmax(np.asarray(a).mean(axis=(1, 2)) @ w, axis=-1)
  np.testing.assert_allclose(ci.grad_cam(model, {}, a, 'features'),
                             ci.grad_cam(model, {}, a, 'features', predicted),
                             atol=1e-6)


def test_nonlinear_model_known_answer():
  a, w = _grad_cam_inputs()
  # score = sum_c W[c, t] mean(A_c^2): gradient 2 W[c, t] A_c / (H W), weights
  # proportional to W[c, t] mean(A_c).
  model = _LinearHead(w, square=True)
  cam = ci.grad_cam(model, {}, a, 'features', 2)
  weights = w[:, 2][None] * np.asarray(a).mean(axis=(1, 2))
  raw = np.einsum('bhwc,bc->bhw', a, weights)
  np.testing.assert_allclose(cam, _expected_cam(raw), atol=1e-5)


@pytest.mark.slow
def test_resnet_last_block_matches_the_head():
  # The last block's output is pooled and fed to the Dense head, so the Grad-CAM weights
  # are fc.kernel[:, target] / (H W); this exercises intercepting a real nested block.
  model, variables, x = _tiny_resnet('cbam')

  @jax.jit
  def run(variables, x):
    outputs = ci.module_output(model, variables, x, 'layer2_0')
    _, state = model.apply(variables, x, capture_intermediates=True,
                           mutable=['intermediates'])
    cams = {block: ci.grad_cam(model, variables, x, block, return_logits=True)
            for block in ('layer1_0', 'layer2_0')}
    return outputs, state['intermediates']['layer2_0']['__call__'][0], cams

  (logits, activation), captured, cams = run(variables, x)
  chex.assert_trees_all_close(activation, captured)
  cam, cam_logits = cams['layer2_0']
  chex.assert_trees_all_close(cam_logits, logits)  # The zero probe changes nothing.
  kernel = np.asarray(variables['params']['fc']['kernel'])
  raw = np.einsum('bhwc,cb->bhw', activation, kernel[:, np.argmax(logits, -1)])
  np.testing.assert_allclose(cam, _expected_cam(raw), atol=1e-5)
  chex.assert_shape(cams['layer1_0'][0], (2, 16, 16))


def test_grad_cam_errors():
  a, w = _grad_cam_inputs()
  model = _LinearHead(w)
  with pytest.raises(ValueError, match="No module at path 'nope'.*features"):
    ci.grad_cam(model, {}, a, 'nope')
  with pytest.raises(ValueError, match='normalize'):
    ci.grad_cam(model, {}, a, 'features', normalize='l2')
  model_2d = _Twice2d()
  variables = model_2d.init(jax.random.key(0), jnp.ones((2, 3, 3, 2)))
  with pytest.raises(ValueError, match='called 2 times'):
    ci.grad_cam(model_2d, variables, jnp.ones((2, 3, 3, 2)), 'block')
  dense = nn.Sequential([nn.Dense(3)])  # __call__ takes no `train`.
  variables = dense.init(jax.random.key(0), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r'\(B, H, W, C\) activation'):
    ci.grad_cam(dense, variables, jnp.ones((2, 4)), 'layers_0')


class _Twice2d(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    block = nn.Conv(2, (1, 1), name='block')
    return block(block(x)).mean(axis=(1, 2))


BOXES = jnp.array([[2.0, 3.0, 6.0, 7.0], [0.0, 0.0, 10.0, 10.0]])  # (y0, x0, y1, x1)


def test_box_mask_uses_exclusive_integer_ends():
  mask = np.asarray(ci.box_mask(BOXES, (10, 10)))
  expected = np.zeros((10, 10))
  expected[2:6, 3:7] = 1
  np.testing.assert_array_equal(mask[0], expected)
  np.testing.assert_array_equal(mask[1], np.ones((10, 10)))


def test_mass_in_box(variant):
  inside = np.zeros((10, 10))
  inside[3, 4] = 2.0
  half = np.zeros((10, 10))
  half[3, 4] = half[8, 8] = 1.0
  uniform = np.ones((10, 10))
  maps = jnp.asarray(np.stack([inside, half, uniform, np.zeros((10, 10))]), jnp.float32)
  boxes = jnp.concatenate([BOXES[:1]] * 4)
  mass = variant(ci.attention_mass_in_box)(maps, boxes)
  np.testing.assert_allclose(mass, [1.0, 0.5, 16 / 100, 0.0], rtol=1e-6)


def test_pointing_game(variant):
  maps = np.zeros((4, 10, 10), np.float32)
  maps[0, 5, 6] = 1.0  # inside box 0 (last row and column of it)
  maps[1, 9, 9] = 1.0  # inside the whole-image box 1
  maps[2, 6, 6] = 1.0  # one row below box 0: centre 6.5 is 0.5 px from the edge y1 = 6
  maps[3, 9, 3] = 1.0  # centre (9.5, 3.5): 3.5 px below box 0
  boxes = jnp.stack([BOXES[0], BOXES[1], BOXES[0], BOXES[0]])
  hits = variant(ci.pointing_game)(maps, boxes)
  np.testing.assert_array_equal(hits, [True, True, False, False])
  tolerant = variant(functools.partial(ci.pointing_game, tolerance=3.5))(maps, boxes)
  np.testing.assert_array_equal(tolerant, [True, True, True, True])
  almost = variant(functools.partial(ci.pointing_game, tolerance=3.4))(maps, boxes)
  np.testing.assert_array_equal(almost, [True, True, True, False])


def test_localisation_errors():
  with pytest.raises(ValueError, match='maps must be'):
    ci.attention_mass_in_box(jnp.ones((2, 10)), BOXES)
  with pytest.raises(ValueError, match='boxes must be'):
    ci.pointing_game(jnp.ones((3, 10, 10)), BOXES)
  with pytest.raises(ValueError, match='tolerance'):
    ci.pointing_game(jnp.ones((2, 10, 10)), BOXES, tolerance=-1)


def test_normalize_maps():
  maps = jnp.array([[[1.0, 3.0]], [[2.0, 2.0]]])
  np.testing.assert_allclose(ci.normalize_maps(maps), [[[0, 1]], [[0, 0]]])
  np.testing.assert_allclose(ci.normalize_maps(maps, 'max'), [[[1 / 3, 1]], [[1, 1]]])
  with pytest.raises(ValueError, match='kind'):
    ci.normalize_maps(maps, 'l1')
