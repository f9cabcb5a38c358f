"""The one registry of attention members, for both skins.

Each member's file ends with ``register(Member(...))``: its name, its linen and NNX classes,
the maps it sows and its presets. Everything else reads from here: the factories
(:func:`cbam_jax.attention.create`, :func:`cbam_jax.nnx.create`), the presets
(:mod:`cbam_jax.attention.presets`), the models' ``attention=`` argument
(:func:`resolve_attention`), weight transfer between the skins and the conformance tests
(tests/test_members.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import flax.linen as nn
from flax.typing import Dtype

from cbam_jax import _validation
from cbam_jax._base import AttentionModule, NnxAttentionModule, nnx_field_names

# The presets a member may configure (see cbam_jax.attention.presets).
PRESETS = ('paper', 'official', 'timm')
# The models' configuration of the registry's modules: the official CBAM code's.
MODEL_PRESET = 'official'
SKINS = ('linen', 'nnx')


@dataclasses.dataclass(frozen=True)
class Member:
  """What the library knows about one attention member.

  Attributes:
    name: the registry name (``attention='cbam'``).
    linen: the linen class (a :class:`cbam_jax._base.AttentionModule`).
    nnx: the NNX class (a :class:`cbam_jax._base.NnxAttentionModule`) with the same fields
      as keywords, the same defaults, parameter names and numbers.
    maps: the names it sows (linen ``'intermediates'``, NNX ``nnx.Intermediate``), each
      ``*_map``, float32 in [0, 1]; a value of another kind gets another name (BAM's
      ``*_logits``).
    presets: ``{preset: fields}`` for the presets that configure it differently from its
      defaults (``'paper'`` is always the defaults).
  """

  name: str
  linen: type[AttentionModule]
  nnx: type[NnxAttentionModule]
  maps: tuple[str, ...] = ()
  presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  @property
  def spatial_dims(self) -> tuple[int, ...]:
    """The ranks of input (spatial dimensions) the member is defined for."""
    return self.linen.supported_spatial_dims


_MEMBERS: dict[str, Member] = {}


def register(member: Member) -> Member:
  """Makes ``member.name`` a name of :func:`create`, :func:`cbam_jax.nnx.create`, the
  presets and the models' ``attention=``; returns ``member``."""
  if not isinstance(member, Member):
    raise TypeError(f'register takes a Member(name, linen, nnx, ...), got {member!r}.')
  if member.name in _MEMBERS:
    raise ValueError(f'Attention {member.name!r} is already registered.')
  if not (isinstance(member.linen, type) and issubclass(member.linen, AttentionModule)):
    raise TypeError(f'Member {member.name!r}: linen must be a cbam_jax AttentionModule '
                    f'subclass, got {member.linen!r}.')
  if not (isinstance(member.nnx, type) and issubclass(member.nnx, NnxAttentionModule)):
    raise TypeError(f'Member {member.name!r}: nnx must be a cbam_jax NnxAttentionModule '
                    f'subclass, got {member.nnx!r}.')
  missing = sorted({f.name for f in dataclasses.fields(member.linen) if f.init}
                   - {'parent', 'name'} - set(nnx_field_names(member.nnx)))
  if missing:
    raise TypeError(f'Member {member.name!r}: its NNX __init__ lacks the linen fields '
                    f'{missing}; name each as a keyword with the linen default (e.g. '
                    '`identity_init: bool = False`).')
  if member.nnx.supported_spatial_dims != member.linen.supported_spatial_dims:
    raise ValueError(f'Member {member.name!r}: its linen and NNX classes support different '
                     'spatial ranks.')
  for preset in member.presets:
    _validation.check_choice('attention preset', preset, PRESETS)
  frozen = MappingProxyType({k: MappingProxyType(dict(v)) for k, v in member.presets.items()})
  member = dataclasses.replace(member, maps=tuple(member.maps), presets=frozen)
  _MEMBERS[member.name] = member
  return member


def unregister(name: str) -> None:
  """Removes a member registered with :func:`register` (e.g. a test's toy member)."""
  member(name)
  del _MEMBERS[name]


def available() -> tuple[str, ...]:
  """Names accepted by :func:`create`, sorted."""
  return tuple(sorted(_MEMBERS))


def member(name: str) -> Member:
  """The member registered as ``name``; a clear error listing the names otherwise."""
  try:
    return _MEMBERS[name]
  except (KeyError, TypeError):
    raise ValueError(
        f'Unknown attention {name!r}.{_validation.did_you_mean(name, available())} Valid '
        f'names: {", ".join(available())}; or pass a '
        'module class or functools.partial.') from None


def members() -> tuple[Member, ...]:
  """Every registered member, sorted by name."""
  return tuple(_MEMBERS[name] for name in available())


def resolve(name: str) -> type[nn.Module]:
  """The linen class registered as ``name``; a clear error listing the names otherwise."""
  return member(name).linen


def create(name: str, **fields: Any) -> nn.Module:
  """Builds the linen attention module called ``name`` with the given fields."""
  return resolve(name)(**fields)


def resolve_nnx(name: str) -> type[NnxAttentionModule]:
  """The NNX class registered as ``name`` (``cbam_jax.nnx.resolve``)."""
  return member(name).nnx


def create_nnx(name: str, in_features: int, *, rngs: Any, **fields: Any) -> NnxAttentionModule:
  """Builds the NNX attention module called ``name`` for ``in_features`` channels
  (``cbam_jax.nnx.create``).

  ``fields`` are the member's (those of its linen module), plus ``num_spatial_dims`` for the
  members whose parameters depend on the input rank (``cbam``, ``spatial``, ``bam``,
  ``lcbam``).
  """
  return resolve_nnx(name)(in_features, rngs=rngs, **fields)


def _unwrap(factory: Any) -> tuple[Any, dict[str, Any]]:
  """A class or (nested) ``functools.partial`` -> (the class, the partials' keywords)."""
  cls = factory
  keywords: dict[str, Any] = {}
  while isinstance(cls, functools.partial):
    keywords = {**cls.keywords, **keywords}
    cls = cls.func
  return cls, keywords


def member_of(cls: Any) -> Member | None:
  """The member whose linen or NNX class is ``cls`` (or a partial of it), or ``None``."""
  cls = _unwrap(cls)[0]
  for registered in _MEMBERS.values():
    if cls is registered.linen or cls is registered.nnx:
      return registered
  return None


def name_of(factory: Any) -> str:
  """The registry name of ``factory`` (a registered class of either skin or a
  ``functools.partial`` of one); a clear error otherwise."""
  found = member_of(factory)
  if found is None:
    raise ValueError(f'{factory!r} is not a registered attention module; registered: '
                     f'{", ".join(available())}.')
  return found.name


def preset_fields(name: str, preset: str = MODEL_PRESET, *,
                  zero_init_spatial_gate: bool = True) -> dict[str, Any]:
  """The fields of attention ``name`` under ``preset`` (a fresh dict), with a BatchNorm
  scale zero-initialised by the preset reset to ones unless ``zero_init_spatial_gate``."""
  _validation.check_choice('attention preset', preset, PRESETS)
  fields = dict(member(name).presets.get(preset, {}))
  if 'norm_scale_init' in fields and not zero_init_spatial_gate:
    fields['norm_scale_init'] = nn.initializers.ones_init()
  return fields


def _with_supported_fields(factory: Callable[..., nn.Module],
                           fields: Mapping[str, Any]) -> Callable[..., nn.Module]:
  """``factory`` with those ``fields`` it declares and a partial has not already set."""
  cls = _unwrap(factory)[0]
  preset = factory.keywords if isinstance(factory, functools.partial) else {}
  if isinstance(cls, type) and dataclasses.is_dataclass(cls):
    declared = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in fields.items() if k in declared and k not in preset}
  else:  # A plain function: pass everything it has not been given yet.
    fields = {k: v for k, v in fields.items() if k not in preset}
  return functools.partial(factory, **fields) if fields else factory


def resolve_attention(spec: Any, *, skin: str = 'linen', dtype: Dtype | None, param_dtype: Dtype,
                      preset: str = MODEL_PRESET, zero_init_spatial_gate: bool = True,
                      what: str = 'attention') -> Callable[..., Any] | None:
  """A model's attention factory for ``spec``, with the model's dtypes filled in.

  Args:
    spec: ``None``; a name from :func:`available` (configured by ``preset``: for
      ``'cbam'`` and ``'spatial'`` the official spatial BatchNorm, its scale zero-initialised
      when ``zero_init_spatial_gate``); or a module factory (a class of either skin or a
      ``functools.partial`` of one), used as given apart from ``dtype``/``param_dtype``
      where it declares but does not already set them.
    skin: ``'linen'`` returns ``f(name=...)`` of a linen module; ``'nnx'`` returns
      ``f(in_features, *, rngs)`` of an NNX module (a registered class of either skin
      becomes the NNX class with the same fields; any other factory is used as given).
  """
  _validation.check_choice('skin', skin, SKINS)
  if spec is None:
    return None
  if isinstance(spec, str):
    named = member(spec)
    fields = preset_fields(spec, preset, zero_init_spatial_gate=zero_init_spatial_gate)
    cls = named.linen if skin == 'linen' else named.nnx
    return functools.partial(cls, **fields, dtype=dtype, param_dtype=param_dtype)
  if not callable(spec):
    kind = ('module factory such as functools.partial(CBAM, ...)' if skin == 'linen' else
            'factory f(in_features, *, rngs) of an NNX module')
    raise TypeError(f'{what} must be None, a name ({", ".join(available())}) or a {kind}; '
                    f'got {type(spec).__name__}.')
  dtypes = {'dtype': dtype, 'param_dtype': param_dtype}
  if skin == 'linen':
    return _with_supported_fields(spec, dtypes)
  found = member_of(spec)
  if found is None:
    return spec
  keywords = _unwrap(spec)[1]
  return functools.partial(found.nnx, **{**dtypes, **keywords})
