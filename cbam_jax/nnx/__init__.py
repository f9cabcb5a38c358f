"""cbam_jax for Flax NNX: every attention module and model, on the same math as linen.

``cbam_jax.nnx.CBAM(in_features=64, rngs=nnx.Rngs(0))`` creates its parameters eagerly;
the keyword fields are those of the linen twin (:class:`cbam_jax.CBAM`), with the same
defaults, named in the signature. Each attention class lives in its member's file
(``cbam_jax/attention/<name>.py``, e.g. :class:`cbam_jax.attention.cbam.NnxCBAM`) beside
its linen twin. Modules start in training mode (``model.eval()`` / ``model.train()``
switch BatchNorm); attention maps are recorded as ``nnx.Intermediate`` under
``nnx.capture``. :func:`create_model` builds the registered backbones
(:mod:`cbam_jax.models`, one registry for both skins); :func:`to_linen`, :func:`from_linen`
and :func:`load_linen` move weights between the two APIs; :func:`add_attention` inserts
attention into any NNX module (docs/insertion.md). See docs/nnx.md.
"""

from cbam_jax.attention._registry import available
from cbam_jax.attention._registry import create_nnx as create
from cbam_jax.attention._registry import resolve_nnx as resolve
from cbam_jax.attention.bam import NnxBAMChannelGate as BAMChannelGate
from cbam_jax.attention.bam import NnxBAMSpatialGate as BAMSpatialGate
from cbam_jax.attention.bam import NnxBottleneckAttention as BottleneckAttention
from cbam_jax.attention.cbam import NnxCBAM as CBAM
from cbam_jax.attention.cbam import NnxChannelAttention as ChannelAttention
from cbam_jax.attention.cbam import NnxSpatialAttention as SpatialAttention
from cbam_jax.attention.coord import NnxCoordinateAttention as CoordinateAttention
from cbam_jax.attention.eca import NnxEfficientChannelAttention as EfficientChannelAttention
from cbam_jax.attention.lcbam import NnxLightCBAM as LightCBAM
from cbam_jax.attention.lcbam import NnxLightChannelAttention as LightChannelAttention
from cbam_jax.attention.lcbam import NnxLightSpatialAttention as LightSpatialAttention
from cbam_jax.attention.scse import NnxConcurrentSpatialChannelSE as ConcurrentSpatialChannelSE
from cbam_jax.attention.scse import NnxSpatialSqueezeExcitation as SpatialSqueezeExcitation
from cbam_jax.attention.se import NnxSqueezeExcitation as SqueezeExcitation
from cbam_jax.attention.simam import NnxSimAM as SimAM
from cbam_jax.attention.triplet import NnxTripletAttention as TripletAttention
from cbam_jax.attention.triplet import NnxZPoolGate as ZPoolGate
from cbam_jax.conv import NnxMaterializedInputConv as MaterializedInputConv
from cbam_jax.models import available_models
from cbam_jax.models import count_nnx_params as count_params
from cbam_jax.models import create_nnx_model as create_model
from cbam_jax.models._attention import resolve_nnx_attention as resolve_attention
from cbam_jax.models.mobilenet_v1 import MobileNetV1NNX as MobileNetV1
from cbam_jax.models.mobilenet_v2 import MobileNetV2NNX as MobileNetV2
from cbam_jax.models.resnet import ResNetNNX as ResNet
from cbam_jax.models.wide_resnet import WideResNetNNX as WideResNet
from cbam_jax.nnx.insertion import Attended, add_attention
from cbam_jax.nnx.transfer import from_linen, load_linen, to_linen

__all__ = ['CBAM', 'BAMChannelGate', 'BAMSpatialGate', 'BottleneckAttention',
           'ChannelAttention', 'ConcurrentSpatialChannelSE', 'CoordinateAttention',
           'EfficientChannelAttention', 'LightCBAM', 'LightChannelAttention',
           'LightSpatialAttention', 'SimAM', 'SpatialAttention', 'SpatialSqueezeExcitation',
           'SqueezeExcitation', 'TripletAttention', 'ZPoolGate', 'available', 'create',
           'resolve', 'MaterializedInputConv', 'MobileNetV1', 'MobileNetV2', 'ResNet',
           'WideResNet', 'available_models', 'count_params', 'create_model',
           'resolve_attention', 'from_linen', 'load_linen', 'to_linen', 'Attended',
           'add_attention']
