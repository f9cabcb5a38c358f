"""The typed public API: the package says it is typed, and the fields every module shares
carry Flax's types. The type checker itself runs from .ci/run (docs/testing.md, "Types")."""

import importlib.resources
import pathlib
import tomllib
import typing

import flax.typing
import pytest

from cbam_jax import attention
from cbam_jax.models.resnet import ResNet

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


def test_resnet_fields_carry_flax_types():
  hints = typing.get_type_hints(ResNet)
  assert hints['dtype'] == hints['param_dtype'] == flax.typing.Dtype
  assert hints['kernel_init'] == flax.typing.Initializer
