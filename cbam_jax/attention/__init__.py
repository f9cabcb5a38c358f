"""The attention family behind one registry, for both skins.

Each member is one file, ``cbam_jax/attention/<name>.py``: its math, its linen module, its
NNX module and one ``register(Member(...))`` (docs/extending.md). ``create(name, **fields)``
returns a linen module that maps ``(B, *spatial, C)`` features to refined features of the
same shape and dtype, called as ``module(x, train=False)``; ``cbam_jax.nnx.create(name,
in_features, rngs=..., **fields)`` its NNX twin. The models' ``attention=`` argument accepts
the same names (:func:`resolve_attention`). :mod:`cbam_jax.attention.presets` names the
paper's, the official code's and timm's fields of each.

==========  ==========================================================  ===========
name        module                                                      spatial dims
==========  ==========================================================  ===========
'cbam'      :class:`cbam_jax.CBAM` (Woo et al. 2018)                    1-3
'channel'   :class:`cbam_jax.ChannelAttention` (CBAM's channel branch)  1-3
'spatial'   :class:`cbam_jax.SpatialAttention` (CBAM's spatial branch)  1-3
'se'        :class:`SqueezeExcitation` (Hu et al. 2018)                 1-3
'eca'       :class:`EfficientChannelAttention` (Wang et al. 2020)       1-3
'bam'       :class:`BottleneckAttention` (Park et al. 2018)             1-3
'scse'      :class:`ConcurrentSpatialChannelSE` (Roy et al. 2018)       1-3
'coord'     :class:`CoordinateAttention` (Hou et al. 2021)              2
'triplet'   :class:`TripletAttention` (Misra et al. 2021)               2
'simam'     :class:`SimAM` (Yang et al. 2021), parameter-free           1-3
'lcbam'     :class:`LightCBAM` (timm's LightCbamModule)                 1-3
==========  ==========================================================  ===========
"""

from __future__ import annotations

from cbam_jax.attention import presets
from cbam_jax.attention._registry import (
    MODEL_PRESET,
    Member,
    available,
    create,
    member,
    member_of,
    members,
    name_of,
    preset_fields,
    register,
    resolve,
    resolve_attention,
    unregister,
)
from cbam_jax.attention.bam import BottleneckAttention
from cbam_jax.attention.cbam import CBAM, ChannelAttention, SpatialAttention
from cbam_jax.attention.coord import CoordinateAttention
from cbam_jax.attention.eca import EfficientChannelAttention, eca_kernel_size
from cbam_jax.attention.lcbam import LightCBAM, LightChannelAttention, LightSpatialAttention
from cbam_jax.attention.scse import ConcurrentSpatialChannelSE, SpatialSqueezeExcitation
from cbam_jax.attention.se import SqueezeExcitation
from cbam_jax.attention.simam import SimAM
from cbam_jax.attention.triplet import TripletAttention

__all__ = ['MODEL_PRESET', 'Member', 'available', 'create', 'member', 'member_of', 'members',
           'name_of', 'preset_fields', 'presets', 'register', 'resolve', 'resolve_attention',
           'unregister', 'BottleneckAttention', 'CBAM', 'ChannelAttention',
           'ConcurrentSpatialChannelSE', 'CoordinateAttention', 'EfficientChannelAttention',
           'LightCBAM', 'LightChannelAttention', 'LightSpatialAttention', 'SimAM',
           'SpatialAttention', 'SpatialSqueezeExcitation', 'SqueezeExcitation',
           'TripletAttention', 'eca_kernel_size']
