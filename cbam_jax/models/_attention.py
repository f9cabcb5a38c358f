"""Attention specs -> factories, for every backbone family, in both skins.

A family's networks take ``attention=`` as ``None``, a registry name
(:func:`cbam_jax.attention.available`) or a module factory; :func:`resolve_attention`
(linen) and :func:`resolve_nnx_attention` (NNX) turn it into a factory with the network's
dtypes and the models' preset (the official CBAM code's) filled in. Both are
:func:`cbam_jax.attention.resolve_attention`, one per skin; :func:`network_attention` makes
a network's two factories.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from flax.typing import Dtype

from cbam_jax import attention as attention_registry

# None | registry name | module factory (a Module class or a functools.partial of one).
AttentionSpec = str | Callable[..., Any] | None

resolve_attention = functools.partial(attention_registry.resolve_attention, skin='linen')
resolve_nnx_attention = functools.partial(attention_registry.resolve_attention, skin='nnx')


def network_attention(skin: str, attention: AttentionSpec, stage_attention: AttentionSpec,
                      attention_fields: Mapping[str, Any] | None, *, dtype: Dtype,
                      param_dtype: Dtype, zero_init_spatial_gate: bool
                      ) -> tuple[Callable[..., Any] | None, Callable[..., Any] | None]:
  """A backbone's ``(attention, stage_attention)`` factories of ``skin`` (``'linen'`` or
  ``'nnx'``) from its fields: ``attention_fields`` go to the block attention only."""
  dtypes: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype,
                                zero_init_spatial_gate=zero_init_spatial_gate)
  block = attention_registry.resolve_attention(attention, skin=skin, **dtypes)
  if block is not None and attention_fields:
    block = functools.partial(block, **attention_fields)
  return block, attention_registry.resolve_attention(stage_attention, skin=skin,
                                                     what='stage_attention', **dtypes)
