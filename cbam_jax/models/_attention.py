"""Attention specs -> factories, for every backbone family, in both skins.

A family's networks take ``attention=`` as ``None``, a registry name
(:func:`cbam_jax.attention.available`) or a module factory; :func:`resolve_attention`
(linen) and :func:`resolve_nnx_attention` (NNX) turn it into a factory with the network's
dtypes and the models' preset (the official CBAM code's) filled in.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from cbam_jax import attention as attention_registry
from cbam_jax.attention import presets
from cbam_jax.nnx import _base as nnx_base
from cbam_jax.nnx.attention import create, resolve

Dtype = Any
# None | registry name | module factory (a Module class or a functools.partial of one).
AttentionSpec = str | Callable[..., nn.Module] | None


def _factory_class(factory: Callable[..., Any]) -> Any:
  while isinstance(factory, functools.partial):
    factory = factory.func
  return factory


def _with_supported_fields(factory: Callable[..., nn.Module],
                           fields: Mapping[str, Any]) -> Callable[..., nn.Module]:
  """``factory`` with those ``fields`` it declares and a partial has not already set."""
  cls = _factory_class(factory)
  preset = factory.keywords if isinstance(factory, functools.partial) else {}
  if isinstance(cls, type) and dataclasses.is_dataclass(cls):
    declared = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in fields.items() if k in declared and k not in preset}
  else:  # A plain function: pass everything it has not been given yet.
    fields = {k: v for k, v in fields.items() if k not in preset}
  return functools.partial(factory, **fields) if fields else factory


# The models' configuration of the registry's modules: the official CBAM code's.
MODEL_PRESET = 'official'


def preset_fields(name: str, zero_init_spatial_gate: bool, preset: str = MODEL_PRESET
                  ) -> dict[str, Any]:
  """The fields the models give the attention registered as ``name``: ``preset``'s, with
  the spatial BatchNorm scale zero-initialised only when ``zero_init_spatial_gate``."""
  fields = presets.fields(preset, name)
  if 'norm_scale_init' in fields and not zero_init_spatial_gate:
    fields['norm_scale_init'] = nn.initializers.ones_init()
  return fields


def resolve_attention(spec: AttentionSpec, *, dtype: Dtype, param_dtype: Dtype,
                      zero_init_spatial_gate: bool = True,
                      what: str = 'attention') -> Callable[..., nn.Module] | None:
  """A factory ``f(name=...)`` for ``spec``, with the model's dtypes filled in.

  Args:
    spec: ``None``; a name from :func:`cbam_jax.attention.available` (``'cbam'`` and
      ``'spatial'`` get the official configuration: spatial BatchNorm, scale zero-initialised
      when ``zero_init_spatial_gate``); or a module class / ``functools.partial``, used as
      given apart from ``dtype``/``param_dtype`` where the factory declares but does not
      already set them.
  """
  if spec is None:
    return None
  if isinstance(spec, str):
    factory = attention_registry.resolve(spec)
    fields = preset_fields(spec, zero_init_spatial_gate)
  elif callable(spec):
    factory, fields = spec, {}
  else:
    raise TypeError(
        f'{what} must be None, a name ({", ".join(attention_registry.available())}) or a '
        f'module factory such as functools.partial(CBAM, ...); got {type(spec).__name__}.')
  return _with_supported_fields(factory, {**fields, 'dtype': dtype, 'param_dtype': param_dtype})


def _unwrap(spec: Any) -> tuple[Any, dict[str, Any]]:
  cls, keywords = spec, {}
  while isinstance(cls, functools.partial):
    keywords = {**cls.keywords, **keywords}
    cls = cls.func
  return cls, keywords


def _nnx_factory(spec: Any, dtype: Any, param_dtype: Any, what: str) -> Any:
  """An NNX or linen attention class (or partial) -> a partial of the NNX class with the
  model's dtypes where it does not set them, as linen fills them; anything else as given."""
  cls, keywords = _unwrap(spec)
  if isinstance(cls, type) and issubclass(cls, nnx_base.AttentionModule):
    cls = cls.linen_twin
  twin = nnx_base.nnx_twin(cls)
  if twin is None:
    return spec
  linen = resolve_attention(functools.partial(cls, **keywords), dtype=dtype,
                            param_dtype=param_dtype, what=what)
  return functools.partial(twin, **_unwrap(linen)[1])


def resolve_nnx_attention(spec: AttentionSpec, *, dtype: Any, param_dtype: Any,
                          zero_init_spatial_gate: bool = True,
                          what: str = 'attention') -> Callable[..., Any] | None:
  """A factory ``f(in_features, *, rngs)`` of an NNX module for ``spec``, as
  :func:`resolve_attention` resolves it (same preset, same dtypes).

  ``spec``: ``None``, a registry name, ``f(in_features, *, rngs)`` of an NNX module, or a
  linen attention factory (class or partial) of a module with an NNX twin.
  """
  if spec is None:
    return None
  if isinstance(spec, str):
    resolve(spec)
    fields = preset_fields(spec, zero_init_spatial_gate)
    return functools.partial(create, spec, **fields, dtype=dtype, param_dtype=param_dtype)
  if callable(spec):
    return _nnx_factory(spec, dtype, param_dtype, what)
  raise TypeError(
      f'{what} must be None, a name ({", ".join(attention_registry.available())}) or a '
      f'factory f(in_features, *, rngs) of an NNX module; got {type(spec).__name__}.')
