"""One set of weights, both APIs: linen ``{'params', 'batch_stats'}`` <-> NNX modules.

The NNX modules use the linen modules' names, so a module's ``nnx.Param`` state is the
linen ``params`` tree and its ``nnx.BatchStat`` state the ``batch_stats`` tree, path for
path. Example::

  linen_model = cbam_jax.models.create_model('resnet20', attention='cbam')
  variables = linen_model.init(jax.random.key(0), images)
  model = from_linen(linen_model, variables)                # an NNX ResNet, same weights
  variables_again = to_linen(model)                         # {'params': ..., 'batch_stats': ...}
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from cbam_jax import attention, models

__all__ = ['from_linen', 'load_linen', 'to_linen']

_COLLECTIONS = (('params', nnx.Param), ('batch_stats', nnx.BatchStat))


def to_linen(module: nnx.Module) -> dict[str, Any]:
  """``{'params': ..., 'batch_stats': ...}`` of an NNX module, for the linen twin's ``apply``."""
  return {collection: nnx.to_pure_dict(nnx.state(module, kind))
          for collection, kind in _COLLECTIONS}


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
  return {'/'.join(map(str, k)): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def load_linen(module: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
  """Writes linen ``variables`` into ``module`` in place (and returns it).

  Every ``nnx.Param`` / ``nnx.BatchStat`` must get a value of its shape and every given
  value must have a place; otherwise a ``ValueError`` lists the differences.
  """
  if not isinstance(variables, Mapping):
    raise ValueError('load_linen expects linen variables {\'params\': ..., '
                     '\'batch_stats\': ...}, e.g. the result of model.init(...).')
  extra = sorted(set(variables) - {c for c, _ in _COLLECTIONS})
  problems = [f'collections without an NNX variable type: {extra}'] if extra else []
  states = {}
  for collection, kind in _COLLECTIONS:
    state = nnx.state(module, kind)
    expected = _flat(nnx.to_pure_dict(state))
    given = _flat(variables.get(collection, {}))
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f'{k}: {tuple(jnp.shape(given[k]))} for {tuple(expected[k].shape)}'
              for k in sorted(set(expected) & set(given))
              if tuple(jnp.shape(given[k])) != tuple(expected[k].shape)]
    for what, keys in (('missing', missing), ('unexpected', unexpected),
                       ('wrong shapes', shapes)):
      if keys:
        problems.append(f'{collection} {what} ({len(keys)}): {", ".join(keys[:10])}')
    states[collection] = (state, variables.get(collection, {}))
  if problems:
    raise ValueError(f'The linen variables do not fit this {type(module).__name__}: '
                     + '; '.join(problems) + '. Build the NNX module with the linen '
                     "module's fields (from_linen does).")
  for state, tree in states.values():
    if tree:
      nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, dict(tree)))
      nnx.update(module, state)
  return module


def _fields(module: nn.Module) -> dict[str, Any]:
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.name not in ('parent', 'name')}


def from_linen(module: nn.Module, variables: Mapping[str, Any], *,
               sample_shape: Sequence[int] | None = None) -> nnx.Module:
  """The NNX twin of a linen attention module or registered backbone network (e.g.
  :class:`cbam_jax.models.ResNet`), holding ``variables``; in training mode, like every new
  NNX module.

  Args:
    module: a linen backbone network (:mod:`cbam_jax.models`) or attention module (any
      class in :mod:`cbam_jax.attention`).
    variables: its ``{'params', 'batch_stats'}``.
    sample_shape: for an attention module, the shape of an input (``in_features`` and the
      number of spatial dims are read from it and ``channel_axis``); not needed for a
      backbone (read from its stem's parameters).
  """
  fields = _fields(module)
  backbone = models.backbone_of(module)
  if backbone is not None:
    in_features = backbone.in_features(variables['params'])
    fields = {k: v for k, v in fields.items() if k not in backbone.linen_only}
    return _build_and_load(lambda: backbone.nnx(in_features=in_features, rngs=nnx.Rngs(0),
                                                **fields), variables)
  member = attention.member_of(type(module))
  if member is None:
    raise TypeError(f'{type(module).__name__} has no NNX twin; from_linen takes a '
                    'registered backbone network (cbam_jax.models) or a cbam_jax attention '
                    'module.')
  if sample_shape is None:
    raise ValueError('from_linen needs sample_shape (the shape of an input) for an attention '
                     'module: its parameters depend on the channel count and input rank.')
  shape = tuple(sample_shape)
  kwargs: dict[str, Any] = {}
  twin = member.nnx
  if 'num_spatial_dims' in inspect.signature(twin.__init__).parameters:
    kwargs['num_spatial_dims'] = len(shape) - 2
  in_features = int(shape[fields.get('channel_axis', -1)])
  return _build_and_load(lambda: twin(in_features, rngs=nnx.Rngs(0), **kwargs, **fields), variables)


def _build_and_load(build, variables: Mapping[str, Any]) -> nnx.Module:
  """``build()`` abstractly (no initialisers run: every value is overwritten), then loaded.

  A variable that ``variables`` lacks would stay abstract, so :func:`load_linen` must
  find every one (it checks).
  """
  return load_linen(nnx.eval_shape(build), variables)
