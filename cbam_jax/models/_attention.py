"""Attention specs -> factories, for every backbone family, in both skins.

A family's networks take ``attention=`` as ``None``, a registry name
(:func:`cbam_jax.attention.available`) or a module factory; :func:`resolve_attention`
(linen) and :func:`resolve_nnx_attention` (NNX) turn it into a factory with the network's
dtypes and the models' preset (the official CBAM code's) filled in. Both are
:func:`cbam_jax.attention.resolve_attention`, one per skin.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from cbam_jax import attention as attention_registry

# None | registry name | module factory (a Module class or a functools.partial of one).
AttentionSpec = str | Callable[..., Any] | None

resolve_attention = functools.partial(attention_registry.resolve_attention, skin='linen')
resolve_nnx_attention = functools.partial(attention_registry.resolve_attention, skin='nnx')
