"""Study variants (an attention name plus ``config.model`` overrides) and seed lists.

A variant is ``ATTENTION`` or ``NAME=ATTENTION:FIELD=VALUE[:FIELD=VALUE...]``; FIELD is a
``config.model`` field or ``attention_fields.F`` (a field of the attention module).
``bam@stages`` is BAM at the stage transitions (``stage_attention='bam'``, its paper's
placement); every other name is the module in every residual block (``attention=name``).
The attention table (``experiments.bench.compare_attention``) takes the plain names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from experiments import cli

STAGE_BAM = 'bam@stages'


def variant_fields(variant: str) -> dict[str, Any]:
  """``create_model`` fields of a variant name ('none', a registry name or 'bam@stages')."""
  if variant == 'none':
    return {'attention': None}
  if variant == STAGE_BAM:
    return {'attention': None, 'stage_attention': 'bam'}
  return {'attention': variant}


def parse_variants(spec: str) -> list[str]:
  """'all' or a comma-separated list of plain variant names -> the names, checked."""
  from cbam_jax import attention as registry  # Imported late: --help stays instant.

  if spec == 'all':
    return ['none', *registry.available(), STAGE_BAM]
  variants = [s.strip() for s in spec.split(',') if s.strip()]
  valid = ('none', *registry.available(), STAGE_BAM)
  for variant in variants:
    if variant not in valid:
      raise cli.UserError(f'Unknown attention {variant!r}; use "all" or a comma-separated list '
                          f'of {", ".join(valid)}.')
  return variants


@dataclasses.dataclass(frozen=True)
class Variant:
  """A named study variant: an attention name plus ``config.model`` field overrides.

  ``overrides`` maps ``config.model`` fields (``zero_init_spatial_gate``) and
  ``attention_fields.FIELD`` (fields of the attention module) to values, as written.
  """

  name: str
  attention: str
  overrides: tuple[tuple[str, str], ...] = ()

  @property
  def fields(self) -> str:
    """The overrides as written, ``FIELD=VALUE:...`` ('' for none)."""
    return ':'.join(f'{k}={v}' for k, v in self.overrides)

  def train_flags(self) -> list[str]:
    """``experiments.training.train`` flags that select this variant's model."""
    fields = variant_fields(self.attention)
    flags = [f'--config.model.attention={fields["attention"] or "none"}',
             f'--config.model.stage_attention={fields.get("stage_attention") or "none"}']
    attention_fields = [f'{k.split(".", 1)[1]}={v}' for k, v in self.overrides
                        if k.startswith('attention_fields.')]
    flags += [f'--config.model.{k}={v}' for k, v in self.overrides
              if not k.startswith('attention_fields.')]
    if attention_fields:
      flags.append(f'--config.model.attention_fields={",".join(attention_fields)}')
    return flags


def parse_variant(spec: str) -> Variant:
  """``ATTENTION`` or ``NAME=ATTENTION:FIELD=VALUE[:FIELD=VALUE...]`` -> a :class:`Variant`.

  E.g. ``cbam``, ``cbam_gate1=cbam:zero_init_spatial_gate=False``,
  ``cbam_r4=cbam:attention_fields.reduction_ratio=4``.
  """
  head, *overrides = spec.strip().split(':')
  name, sep, attention = head.partition('=')
  if not sep:
    name, attention = head, head
  name, attention = name.strip(), attention.strip()
  if not name.replace('_', '').replace('@', '').replace('-', '').isalnum():
    raise cli.UserError(f'Variant {spec!r}: the name {name!r} must be letters, digits, _ or -.')
  pairs = []
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep or not key.strip():
      raise cli.UserError(f'Variant {spec!r}: {item!r} is not FIELD=VALUE; write e.g. '
                          'cbam_r4=cbam:attention_fields.reduction_ratio=4.')
    pairs.append((key.strip(), value.strip()))
  return Variant(name, attention, tuple(pairs))


def parse_study_variants(spec: str) -> list[Variant]:
  """A comma-separated list of :func:`parse_variant` specs, or 'all' (plain attention names)."""
  if spec == 'all':
    return [Variant(v, v) for v in parse_variants('all')]
  variants = [parse_variant(s) for s in spec.split(',') if s.strip()]
  parse_variants(','.join(v.attention for v in variants))  # Unknown attention names fail here.
  names = [v.name for v in variants]
  if len(set(names)) != len(names):
    raise cli.UserError(f'Variant names must be unique; got {", ".join(names)}.')
  return variants


def parse_seeds(spec: str) -> list[int]:
  """``'0,1,2'`` or ``'0-4'`` (inclusive) or a mix -> a list of seeds, in order."""
  seeds = []
  for part in filter(None, (p.strip() for p in spec.split(','))):
    first, sep, last = part.partition('-')
    try:
      seeds += list(range(int(first), int(last) + 1)) if sep else [int(first)]
    except ValueError:
      raise cli.UserError(f'--seeds {spec!r}: use e.g. 0-4 or 0,1,2.') from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise cli.UserError(f'--seeds {spec!r}: give at least one seed, each once.')
  return seeds
