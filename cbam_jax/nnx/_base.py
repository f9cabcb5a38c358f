"""Fields of an NNX model taken from its linen twin's dataclass (the ResNets).

The attention members' NNX base and helpers live in :mod:`cbam_jax._base`, beside the
linen ones, so that a member's one file serves both skins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from cbam_jax._base import unknown_fields_message


def resolve_fields(linen_cls: type[nn.Module], fields: Mapping[str, Any]) -> dict[str, Any]:
  """Every field of ``linen_cls`` (but ``parent``/``name``): ``fields``' value or the default.

  Sequences become tuples (NNX keeps non-array attributes as static, hashable data).
  """
  declared = {f.name: f for f in dataclasses.fields(linen_cls)
              if f.name not in ('parent', 'name')}
  unknown = sorted(set(fields) - set(declared))
  if unknown:
    raise TypeError(unknown_fields_message(linen_cls.__name__, unknown, declared))
  resolved = {}
  for name, field in declared.items():
    if name in fields:
      value = fields[name]
    elif field.default is not dataclasses.MISSING:
      value = field.default
    else:
      value = field.default_factory()  # type: ignore[misc]
    resolved[name] = tuple(value) if isinstance(value, list) else value
  return resolved
