"""cbam_jax for Flax NNX: every attention module and model, on the same math as linen.

``cbam_jax.nnx.CBAM(in_features=64, rngs=nnx.Rngs(0))`` creates its parameters eagerly;
the keyword fields are those of the linen twin (:class:`cbam_jax.CBAM`), with the same
defaults. Modules start in training mode (``model.eval()`` / ``model.train()`` switch
BatchNorm); attention maps are recorded as ``nnx.Intermediate`` under ``nnx.capture``.
:mod:`cbam_jax.nnx.transfer` moves weights between the two APIs.
"""

from cbam_jax.nnx.attention import (
                                    BottleneckAttention,
                                    ConcurrentSpatialChannelSE,
                                    CoordinateAttention,
                                    EfficientChannelAttention,
                                    LightCBAM,
                                    LightChannelAttention,
                                    LightSpatialAttention,
                                    SimAM,
                                    SpatialSqueezeExcitation,
                                    SqueezeExcitation,
                                    TripletAttention,
                                    available,
                                    create,
                                    resolve,
)
from cbam_jax.nnx.layers import CBAM, ChannelAttention, SpatialAttention

__all__ = ['CBAM', 'BottleneckAttention', 'ChannelAttention', 'ConcurrentSpatialChannelSE',
           'CoordinateAttention', 'EfficientChannelAttention', 'LightCBAM',
           'LightChannelAttention', 'LightSpatialAttention', 'SimAM', 'SpatialAttention',
           'SpatialSqueezeExcitation', 'SqueezeExcitation', 'TripletAttention', 'available',
           'create', 'resolve']
