"""PyTorch ResNet (and MobileNet) weights -> Flax variables: :func:`from_pytorch`."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from cbam_jax import _validation, saving
from cbam_jax.convert import mobilenet
from cbam_jax.convert.architecture import SOURCES, infer_model
from cbam_jax.convert.keys import attention_layout, listing, source_hint, torch_key
from cbam_jax.convert.state_dict import prepare

APIS = ('linen', 'nnx')

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ConversionReport:
  """What :func:`from_pytorch` did with each key.

  Attributes:
    source: the layout read.
    config: the model description (:func:`cbam_jax.saving.describe`).
    loaded_keys: PyTorch keys that were converted.
    new_keys: Flax variables (``'params/layer1_0/attention/...'``) with no PyTorch
      counterpart in this source, freshly initialised (``'torchvision'`` attention).
    missing_keys: PyTorch keys the model needs but the state dict lacks; their variables
      were freshly initialised (only possible with ``strict=False``).
    unexpected_keys: PyTorch keys that were not used (only possible with ``strict=False``).
  """

  source: str
  config: dict[str, Any]
  loaded_keys: tuple[str, ...]
  new_keys: tuple[str, ...]
  missing_keys: tuple[str, ...]
  unexpected_keys: tuple[str, ...]


def from_pytorch(
    state_dict: Mapping[str, Any],
    source: str = 'official',
    *,
    strict: bool = True,
    attention: Any = 'auto',
    attention_fields: Mapping[str, Any] | None = None,
    identity_init: bool = False,
    rng: int | jax.Array = 0,
    return_report: bool = False,
    api: str = 'linen',
) -> Any:
  """A :class:`cbam_jax.models.ResNet` (ResNeXt, Wide ResNet) and its Flax variables from
  PyTorch weights; also a :class:`cbam_jax.models.MobileNetV2` from torchvision's
  ``mobilenet_v2`` or timm's ``mobilenetv2_*`` keys and a :class:`~cbam_jax.models.MobileNetV1`
  from timm's ``mobilenetv1_100`` / ``_125`` (:mod:`cbam_jax.convert.mobilenet`).

  Args:
    state_dict: names -> torch tensors or numpy arrays (anything ``np.asarray`` accepts),
      optionally wrapped as ``{'state_dict': ...}``; ``module.`` prefixes are stripped and
      ``num_batches_tracked`` ignored.
    source: ``'official'`` (Jongchan/attention-module), ``'timm'`` or ``'torchvision'``.
    strict: raise on missing or unexpected keys. With ``False`` missing variables keep their
      fresh initialisation and unexpected keys are ignored (both are logged and reported).
    attention: ``'auto'`` reads the attention from the weights, except for
      ``'torchvision'`` where it means ``'cbam'`` (the official configuration) and timm's
      MobileNets (no attention in timm's) where it means ``'cbam'`` as timm configures it
      (:mod:`cbam_jax.attention.presets` ``'timm'``). With those also ``None`` (no
      attention), a name from :func:`cbam_jax.attention.available` (timm MobileNets: under
      the timm preset) or a module factory; it is freshly initialised from ``rng``.
    attention_fields: fields the weights cannot tell, e.g. ``{'pool_types': ('avg', 'max',
      'lse')}`` for an official model trained with other pools; with fresh attention, fields
      for an ``attention=`` class (or, timm MobileNets, over the preset of a name).
    identity_init: fresh attention only (``'torchvision'``, timm MobileNets): the fresh
      attention modules start as the identity (docs/attention_family.md, "Identity at
      insertion"), so the converted network computes the plain network's logits; stored in
      the model's ``attention_fields``.
    rng: PRNG key, or an int seed of an ``'rbg'`` key, for the variables without
      PyTorch counterpart.
    return_report: also return a :class:`ConversionReport`.
    api: ``'linen'`` or ``'nnx'``.

  Returns:
    With ``api='linen'``: ``(model, variables)`` with ``variables = {'params': ...,
    'batch_stats': ...}`` (float32), for ``model.apply(variables, images_nhwc)``. With
    ``api='nnx'``: the NNX network (:class:`cbam_jax.nnx.ResNet`, ...) holding those weights (in
    training mode, as every new NNX module; call ``model.eval()`` for inference). Plus
    the report if asked.

  Raises:
    ValueError: unknown source; architecture that cannot be inferred; with ``strict``,
      missing or unexpected keys (all listed); a shape that does not match;
      ``identity_init`` without fresh attention.
  """
  _validation.check_choice('source', source, SOURCES)
  _validation.check_choice('api', api, APIS)
  arrays = prepare(state_dict)
  model: Any  # A ResNet, or a MobileNet for MobileNet keys.
  mobilenet_layout = mobilenet.layout(arrays, source)
  if mobilenet_layout is not None:
    model, in_channels = mobilenet.infer_model(arrays, attention, dict(attention_fields or {}),
                                               source)
  else:
    model, in_channels = infer_model(arrays, source, attention, dict(attention_fields or {}))
  if identity_init:
    adds_attention = source == 'torchvision' or mobilenet_layout is not None
    if not adds_attention or model.attention is None:
      raise ValueError(
          'identity_init=True starts freshly added attention as the identity; it needs '
          'source=\'torchvision\' with attention, or a timm MobileNet with attention (got '
          f'source={source!r}, attention={attention!r}). Drop identity_init, or use '
          'cbam_jax.models.add_attention.')
    model = model.clone(attention_fields=FrozenDict({**(model.attention_fields or {}),
                                                     'identity_init': True}))
  if mobilenet_layout is not None:
    key_of = functools.partial(mobilenet.torch_key, model, mobilenet_layout)
  else:
    key_of = functools.partial(torch_key, attention_layout=attention_layout(source, model))

  # Parameter shapes do not depend on the image size; 8x8 keeps init cheap.
  dummy = jnp.zeros((1, 8, 8, in_channels), jnp.float32)
  # From a seed, an 'rbg' key: its init compiles ~2.5x faster on CPU than threefry's.
  key = jax.random.key(rng, impl='rbg') if isinstance(rng, int) else rng
  abstract = jax.eval_shape(functools.partial(model.init, train=False), key, dummy)
  flat = {tuple(str(getattr(p, 'key', p)) for p in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(dict(abstract))[0]}

  values: dict[tuple[str, ...], np.ndarray] = {}
  new, missing, loaded = [], [], []
  for path, leaf in flat.items():
    mapped = key_of(path[1:])
    if mapped is None:
      new.append('/'.join(path))
      continue
    pytorch_key, transform = mapped
    if pytorch_key not in arrays:
      missing.append(pytorch_key)
      continue
    value = transform(arrays[pytorch_key])
    if value.shape != leaf.shape:
      raise ValueError(
          f'{pytorch_key} has shape {arrays[pytorch_key].shape}, which gives {value.shape} for '
          f'{"/".join(path)} but the inferred model needs {leaf.shape}. The state dict does '
          f'not follow the {source!r} layout (or mixes architectures).')
    values[path] = np.ascontiguousarray(value, dtype=np.float32)
    loaded.append(pytorch_key)
  unexpected = sorted(set(arrays) - set(loaded))
  if strict and (missing or unexpected):
    problems = []
    if missing:
      problems.append(f'missing keys ({len(missing)}): {listing(missing)}')
    if unexpected:
      problems.append(f'unexpected keys ({len(unexpected)}): {listing(unexpected)}')
    raise ValueError(
        f'State dict does not match the inferred {source!r} model: ' + '; '.join(problems)
        + '.' + source_hint(unexpected, source)
        + ' Pass strict=False to load the matching keys anyway.')
  if missing or unexpected:
    _log.warning('Converted with strict=False: %d missing keys (freshly initialised): %s; '
                 '%d unexpected keys (ignored): %s', len(missing), listing(missing),
                 len(unexpected), listing(unexpected))

  if len(values) == len(flat):
    initial = None
  else:  # Fresh values for the variables PyTorch did not provide.
    initial = jax.jit(functools.partial(model.init, train=False))(key, dummy)
  treedef = jax.tree_util.tree_structure(dict(abstract))
  leaves = [jnp.asarray(values[path]) if path in values else None for path in flat]
  if initial is not None:
    fresh = jax.tree_util.tree_leaves(dict(initial))
    leaves = [fresh[i] if leaf is None else leaf for i, leaf in enumerate(leaves)]
  variables = jax.tree_util.tree_unflatten(treedef, leaves)
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  converted: tuple[Any, ...] = (model, variables)
  if api == 'nnx':
    from cbam_jax.nnx.transfer import from_linen  # NNX only when asked for.

    converted = (from_linen(model, variables),)
  if not return_report:
    return converted if len(converted) > 1 else converted[0]
  report = ConversionReport(
      source=source, config=saving.describe(model, in_channels=in_channels),
      loaded_keys=tuple(loaded), new_keys=tuple(new), missing_keys=tuple(missing),
      unexpected_keys=tuple(unexpected))
  return (*converted, report)
