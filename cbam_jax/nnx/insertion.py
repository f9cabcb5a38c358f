"""Attention into any NNX module, in place: :func:`add_attention` (docs/insertion.md).

``where`` selects submodules (a type, or a predicate ``(path, module) -> bool``); each is
replaced by :class:`Attended`, which calls it and then the attention. On a registered NNX
backbone (:class:`cbam_jax.nnx.ResNet`) ``where=None`` is the backbone's own placement:
the module tree becomes, path for path, the one ``cbam_jax.nnx.create_model(name,
attention=...)`` builds, so saving, :func:`cbam_jax.nnx.to_linen` and the converter's
weights keep fitting. With ``identity_init=True`` the module computes what it did before
(docs/attention_family.md, "Identity at insertion").

Example::

  model = cbam_jax.nnx.create_model('resnet20', rngs=nnx.Rngs(0))   # ... trained
  cbam_jax.nnx.add_attention(model, 'cbam', identity_init=True, rngs=nnx.Rngs(1))

  net = nnx.Sequential(nnx.Conv(3, 16, (3, 3), rngs=rngs), nnx.BatchNorm(16, rngs=rngs))
  added = cbam_jax.nnx.add_attention(net, 'se', where=nnx.BatchNorm, rngs=rngs)
  # {'layers/1/attention': SqueezeExcitation(...)}; net.layers[1] is Attended(BatchNorm, SE)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from cbam_jax import models
from cbam_jax.models._attention import AttentionSpec, resolve_nnx_attention
from cbam_jax.models.resnet import ResNetNNX

__all__ = ['Attended', 'add_attention']

Where = type | Callable[[tuple[Any, ...], nnx.Module], bool] | None

# Attributes that name a module's output channels, in the order they are read.
_FEATURE_ATTRIBUTES = ('out_features', 'num_features')


class Attended(nnx.Module):
  """``attention(inner(*args, **kwargs))``: a module followed by attention.

  Train/eval mode reaches both (``model.eval()`` sets every nested module).

  Args:
    inner: the module whose output is attended.
    attention: the NNX attention module, built for ``inner``'s output channels.
  """

  def __init__(self, inner: nnx.Module, attention: nnx.Module):
    self.inner = inner
    self.attention = attention

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self.attention(self.inner(*args, **kwargs))


def add_attention(module: nnx.Module, attention: AttentionSpec = 'cbam', *,
                  where: Where = None, features: int | None = None, rngs: nnx.Rngs,
                  **fields: Any) -> dict[str, nnx.Module]:
  """Inserts ``attention`` into ``module`` in place; returns what it inserted.

  Args:
    module: any NNX module.
    attention: a registry name (``'cbam'``, ``'se'``, ...) or a factory ``f(in_features, *,
      rngs)`` of an NNX module (a linen or NNX attention class, or a ``functools.partial``
      of one), as the NNX networks take it.
    where: ``None``: the placement of a registered NNX backbone (:class:`cbam_jax.nnx.ResNet`:
      every residual block, as ``create_model(..., attention=...)``); a type: after every
      submodule of that type (e.g. ``nnx.BatchNorm``); a predicate ``(path, submodule) ->
      bool`` (``path`` a tuple of attribute names and list indices): after every submodule
      it selects. The module itself is never selected.
    features: the channels of the selected submodules' outputs; default: read from each
      (``out_features``, ``num_features``). Not with ``where=None``.
    rngs: for the attention's parameters.
    **fields: fields of the attention modules, e.g. ``identity_init=True`` (outputs stay as
      they were) or ``reduction_ratio=8``.

  Returns:
    ``{path: attention module}``, ``path`` the ``'/'``-joined place of each inserted
    module in ``module`` (``'layer1_0/attention'``, ``'layers/1/attention'``), in order.

  Raises:
    ValueError: ``where=None`` on a module that is no registered backbone, or a backbone
      that has attention already; ``where`` selects nothing; a selected module's channels
      cannot be read (pass ``features=``).
  """
  if attention is None:
    raise ValueError('add_attention has nothing to add: pass attention= (a name or a '
                     'factory).')
  if where is None:
    if features is not None:
      raise ValueError('features= is for where=...; with where=None the backbone gives each '
                       'place its channels.')
    return _into_backbone(module, attention, rngs, fields)
  select = where if not isinstance(where, type) else (lambda _, m: isinstance(m, where))
  if not callable(select):
    raise TypeError(f'where must be None, a module type or a predicate (path, module) -> '
                    f'bool; got {type(where).__name__}.')
  chosen = [(tuple(path), sub) for path, sub in nnx.iter_modules(module)
            if path and select(tuple(path), sub)]
  if not chosen:
    raise ValueError(f'where={where!r} selects no submodule of {type(module).__name__}; '
                     'pass a type or predicate that matches one.')
  training = _training(module)
  inserted = {}
  # Deepest first: wrapping a module leaves the paths of the modules around it as they were.
  for path, sub in sorted(chosen, key=lambda item: -len(item[0])):
    factory = _required(resolve_nnx_attention(
        attention, dtype=getattr(sub, 'dtype', None),
        param_dtype=getattr(sub, 'param_dtype', jnp.float32)))
    new = functools.partial(factory, **fields)(_features(path, sub, features), rngs=rngs)
    _set_mode(new, training)
    _replace(module, path, Attended(sub, new))
    inserted[_join(path + ('attention',))] = new
  order = [_join(path + ('attention',)) for path, _ in chosen]
  return {name: inserted[name] for name in order}


def _into_backbone(model: nnx.Module, attention: AttentionSpec, rngs: nnx.Rngs,
                   fields: Mapping[str, Any]) -> dict[str, nnx.Module]:
  """The blocks' attention of a ResNet, as its ``__init__`` attaches it."""
  if not isinstance(model, ResNetNNX):
    family = models.backbone_of(model)
    raise ValueError(f'add_attention(where=None) knows the placement of cbam_jax.nnx.ResNet '
                     f'only, not of {type(model).__name__}'
                     f'{f" (family {family.family!r})" if family else ""}; pass where= '
                     '(a module type or a predicate) to choose the places.')
  names = [name for name in model.block_names if not name.startswith('stage_attention')]
  if any(getattr(model, name).has_attention for name in names):
    raise ValueError('This ResNet has attention in its blocks already; add_attention adds '
                     'to a network without it (pass where= to place more elsewhere).')
  factory = functools.partial(_required(resolve_nnx_attention(
      attention, dtype=model.conv1.dtype, param_dtype=model.conv1.param_dtype)), **fields)
  training = _training(model)
  inserted = {}
  for name in names:
    block = getattr(model, name)
    block.attention = factory(block.out_features, rngs=rngs)
    block.has_attention = True
    _set_mode(block.attention, training)
    inserted[f'{name}/attention'] = block.attention
  return inserted


def _features(path: tuple[Any, ...], sub: nnx.Module, features: int | None) -> int:
  if features is not None:
    return features
  for name in _FEATURE_ATTRIBUTES:
    value = getattr(sub, name, None)
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  raise ValueError(f'Cannot read the output channels of {type(sub).__name__} at '
                   f'{_join(path)!r} (it has no {" or ".join(_FEATURE_ATTRIBUTES)}); pass '
                   'features= to add_attention.')


def _required(factory: Callable[..., Any] | None) -> Callable[..., Any]:
  if factory is None:
    raise ValueError('attention=None inserts nothing; pass a registry name (e.g. \'cbam\') '
                     'or a module class.')
  return factory


def _replace(root: nnx.Module, path: tuple[Any, ...], new: nnx.Module) -> None:
  parent: Any = root
  for key in path[:-1]:
    parent = getattr(parent, key) if isinstance(key, str) else parent[key]
  if isinstance(path[-1], str) and hasattr(parent, path[-1]):
    setattr(parent, path[-1], new)
  else:
    parent[path[-1]] = new


def _training(module: nnx.Module) -> bool | None:
  """Whether ``module``'s BatchNorms (else Dropouts) are in training mode; ``None``: it has
  neither."""
  for attribute, in_training in (('use_running_average', False), ('deterministic', False)):
    for _, sub in nnx.iter_modules(module):
      value = getattr(sub, attribute, None)
      if isinstance(value, bool):
        return value == in_training
  return None


def _set_mode(module: nnx.Module, training: bool | None) -> None:
  """New modules start in training mode; this puts them in their host's."""
  if training is False:
    module.eval()


def _join(path: tuple[Any, ...]) -> str:
  return '/'.join(str(key) for key in path)
