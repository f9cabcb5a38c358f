"""Attention into a trained linen network: :func:`add_attention` (docs/insertion.md).

The network is a registered backbone's linen network (:func:`cbam_jax.models.backbone_of`);
the new one is the same network with attention (``model.clone(attention=...)``), holding
every old weight and BatchNorm statistic unchanged and fresh variables for the attention
only. With ``identity_init=True`` the new network computes the old one's logits
(docs/attention_family.md, "Identity at insertion"). Any other module: the NNX
:func:`cbam_jax.nnx.add_attention`.

Example::

  model, variables = ...                      # a trained resnet20, attention=None
  model, variables = add_attention(model, variables, 'cbam', identity_init=True)
  model.apply(variables, images)              # the old logits, until training moves them
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_jax import attention as attention_registry
from cbam_jax import models
from cbam_jax.models._attention import AttentionSpec

__all__ = ['add_attention']

# The input of the abstract inits: one image, large enough for every stem (an ImageNet stem
# and four stages halve 32 px five times, to 1 px); parameter shapes do not depend on it.
_INIT_SIZE = 32


def add_attention(model: nn.Module, variables: Mapping[str, Any],
                  attention: AttentionSpec = 'cbam', *, stage_attention: AttentionSpec = None,
                  rng: int | jax.Array = 0, **fields: Any) -> tuple[nn.Module, dict[str, Any]]:
  """``model`` with attention added and ``variables`` carried over: ``(new_model,
  new_variables)``.

  Args:
    model: a registered backbone's linen network without attention at the places asked for
      (e.g. ``create_model('resnet20')``).
    variables: its ``{'params', 'batch_stats'}``; every array is carried over unchanged
      (the same array objects) to the same path in ``new_variables``.
    attention: the attention in every block, as the network's ``attention`` field takes it
      (a registry name such as ``'cbam'``, a module factory, or ``None`` for none).
    stage_attention: the attention after stages, as the ``stage_attention`` field takes it.
    rng: PRNG key, or an int seed of an ``'rbg'`` key (as :func:`cbam_jax.convert.from_pytorch`),
      for the new attention variables.
    **fields: fields of the added modules, e.g. ``identity_init=True`` (the new network
      then computes the old one's logits) or ``reduction_ratio=8``. They are merged over the
      network's ``attention_fields`` for ``attention``; a ``stage_attention`` gets them as a
      ``functools.partial`` (a registry name: of its class, with the models' preset).

  Returns:
    ``(new_model, new_variables)``: ``model.clone(attention=..., ...)`` and its variables,
    the old ones plus the attention's fresh ones.

  Raises:
    TypeError: ``model`` is not a registered backbone's linen network.
    ValueError: nothing to add; attention already at a place asked for; ``variables`` do
      not fit ``model``, or an old array has no place of its path and shape in the new
      network (nothing is loaded partially).
  """
  backbone = models.backbone_of(model)
  if backbone is None or not isinstance(model, backbone.linen):
    raise TypeError(f'add_attention takes a registered backbone\'s linen network, got '
                    f'{type(model).__name__}; use cbam_jax.nnx.add_attention for any NNX '
                    'module, or build the network with create_model(..., attention=...).')
  changes = _changes(model, attention, stage_attention, fields)
  new_model = model.clone(**changes)
  for what in ('attention', 'stage_attention'):  # An unknown name fails here, not in init.
    if what in changes:
      models.resolve_attention(changes[what], what=what, dtype=None, param_dtype=None)

  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise ValueError('add_attention expects the variables {\'params\': ..., '
                     '\'batch_stats\': ...} of model, e.g. the result of model.init(...).')
  images = jnp.zeros((1, _INIT_SIZE, _INIT_SIZE, backbone.in_features(variables['params'])),
                     jnp.float32)
  key = jax.random.key(rng, impl='rbg') if isinstance(rng, int) else rng
  old = _flat(variables)
  _check_fits(old, _flat(_abstract_init(model, key, images)), type(model).__name__,
              'the variables do not fit model', 'Pass the variables model was trained with.')
  abstract = _abstract_init(new_model, key, images)
  new_flat = _flat(abstract)
  _check_fits(old, new_flat, type(model).__name__,
              'the old variables have no place in the network with attention',
              'Add attention only at places the network has none.', only_given=True)

  fresh_paths = [path for path in new_flat if path not in old]

  @jax.jit
  def fresh(key):  # Only the new variables: XLA drops the unused initialisers.
    flat = _flat(new_model.init(key, images, train=False))
    return [flat[path] for path in fresh_paths]

  values = {**dict(zip(fresh_paths, fresh(key), strict=True)), **old}
  new_variables = flax.traverse_util.unflatten_dict(
      {path: values[path] for path in new_flat})
  return new_model, new_variables


def _changes(model: nn.Module, attention: AttentionSpec, stage_attention: AttentionSpec,
             fields: Mapping[str, Any]) -> dict[str, Any]:
  """The fields of ``model.clone`` that add ``attention`` and ``stage_attention``."""
  if attention is None and stage_attention is None:
    raise ValueError('add_attention has nothing to add: pass attention= and/or '
                     'stage_attention=.')
  changes: dict[str, Any] = {}
  if attention is not None:
    _check_free(model, 'attention', attention)
    changes['attention'] = attention
    if fields:
      changes['attention_fields'] = flax.core.FrozenDict(
          {**(model.attention_fields or {}), **fields})
  if stage_attention is not None:
    _check_free(model, 'stage_attention', stage_attention)
    changes['stage_attention'] = _with_fields(stage_attention, fields) if fields else (
        stage_attention)
  return changes


def _check_free(model: nn.Module, what: str, spec: AttentionSpec) -> None:
  if not hasattr(model, what):
    raise ValueError(f'{type(model).__name__} has no {what} field; add_attention cannot '
                     f'place {what} in it.')
  if getattr(model, what) is not None:
    raise ValueError(f'{type(model).__name__} already has {what}={getattr(model, what)!r}; '
                     f'pass {what}=None to add_attention (or start from the network without '
                     f'{what}) instead of {spec!r}.')


def _with_fields(spec: AttentionSpec, fields: Mapping[str, Any]) -> Any:
  """``spec`` as a factory with ``fields``: a registry name becomes its class with the
  models' preset (what the name stands for in a network) and ``fields``."""
  if isinstance(spec, str):
    preset = attention_registry.preset_fields(spec)
    return functools.partial(attention_registry.resolve(spec), **{**preset, **fields})
  if spec is None:
    raise ValueError('attention=None inserts nothing; pass a registry name or a module class.')
  return functools.partial(spec, **fields)


def _abstract_init(model: nn.Module, key: jax.Array, images: jax.Array) -> Any:
  return jax.eval_shape(functools.partial(model.init, train=False), key, images)


def _flat(variables: Any) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))


def _check_fits(given: Mapping[tuple[str, ...], Any], expected: Mapping[tuple[str, ...], Any],
                name: str, problem: str, fix: str, only_given: bool = False) -> None:
  """Raises a ``ValueError`` listing the paths of ``given`` that ``expected`` lacks or shapes
  differently (and, unless ``only_given``, those of ``expected`` that ``given`` lacks)."""
  def listed(paths):
    paths = ['/'.join(p) for p in paths]
    return ', '.join(paths[:8]) + (f' and {len(paths) - 8} more' if len(paths) > 8 else '')

  problems = []
  unexpected = [p for p in given if p not in expected]
  shapes = [p for p in given if p in expected
            and tuple(jnp.shape(given[p])) != tuple(expected[p].shape)]
  missing = [] if only_given else [p for p in expected if p not in given]
  for what, paths in (('no place', unexpected), ('other shapes', shapes),
                      ('missing', missing)):
    if paths:
      problems.append(f'{what} ({len(paths)}): {listed(paths)}')
  if problems:
    raise ValueError(f'{name}: {problem}: {"; ".join(problems)}. {fix}')
