"""cbam_jax for Flax NNX: every attention module and model, on the same math as linen.

``cbam_jax.nnx.CBAM(in_features=64, rngs=nnx.Rngs(0))`` creates its parameters eagerly;
the keyword fields are those of the linen twin (:class:`cbam_jax.CBAM`), with the same
defaults. Modules start in training mode (``model.eval()`` / ``model.train()`` switch
BatchNorm); attention maps are recorded as ``nnx.Intermediate`` under ``nnx.capture``.
:func:`create_model` builds the linen zoo's ResNets; :func:`to_linen`, :func:`from_linen`
and :func:`load_linen` move weights between the two APIs. See docs/nnx.md.
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
from cbam_jax.nnx.models import ResNet, available_models, count_params, create_model
from cbam_jax.nnx.transfer import from_linen, load_linen, to_linen

__all__ = ['CBAM', 'BottleneckAttention', 'ChannelAttention', 'ConcurrentSpatialChannelSE',
           'CoordinateAttention', 'EfficientChannelAttention', 'LightCBAM',
           'LightChannelAttention', 'LightSpatialAttention', 'SimAM', 'SpatialAttention',
           'SpatialSqueezeExcitation', 'SqueezeExcitation', 'TripletAttention', 'available',
           'create', 'resolve', 'ResNet', 'available_models', 'count_params', 'create_model',
           'from_linen', 'load_linen', 'to_linen']
