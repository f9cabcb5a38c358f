"""The typed public API: the package says it is typed, and the fields every module shares
carry Flax's types. The type checker itself runs from .ci/run (docs/testing.md, "Types")."""

import importlib.resources
import pathlib
import tomllib
import typing

import flax.typing
import pytest

from cbam_jax import attention, models

ROOT = pathlib.Path(__file__).resolve().parent.parent

# flax.typing's types of the fields every attention member has, in both skins.
SHARED_FIELD_TYPES = {
    'dtype': flax.typing.Dtype | None,
    'param_dtype': flax.typing.Dtype,
    'precision': flax.typing.PrecisionLike,
    'kernel_init': flax.typing.Initializer,
    'bias_init': flax.typing.Initializer,
}


def test_the_package_ships_its_py_typed_marker():
  # PEP 561: without the marker a type checker ignores the package's annotations.
  assert importlib.resources.files('cbam_jax').joinpath('py.typed').is_file()
  pyproject = tomllib.loads((ROOT / 'pyproject.toml').read_text())
  assert 'py.typed' in pyproject['tool']['setuptools']['package-data']['cbam_jax']


@pytest.mark.parametrize('name', attention.available())
def test_member_fields_carry_flax_types(name):
  member = attention.member(name)
  linen = typing.get_type_hints(member.linen)
  nnx = typing.get_type_hints(member.nnx.__init__)
  for field, expected in SHARED_FIELD_TYPES.items():
    assert linen[field] == expected, (field, linen[field])
    assert nnx[field] == expected, (field, nnx[field])


@pytest.mark.parametrize('family', models.available_backbones())
def test_backbone_fields_carry_flax_types(family):
  """Both skins' networks type their dtypes and initialiser with Flax's types, and the NNX
  signature types every field as the linen network does."""
  backbone = models.get_backbone(family)
  linen = typing.get_type_hints(backbone.linen)
  nnx = typing.get_type_hints(backbone.nnx.__init__)
  for hints in (linen, nnx):
    assert hints['dtype'] == hints['param_dtype'] == flax.typing.Dtype, family
    assert hints['kernel_init'] == flax.typing.Initializer, family
  for field in set(nnx) - {'in_features', 'rngs', 'return'}:
    assert nnx[field] == linen[field], (family, field, nnx[field], linen[field])
