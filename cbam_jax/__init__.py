"""cbam_jax: CBAM and visual attention modules for JAX and Flax."""

from cbam_jax import conv, functional, models
from cbam_jax.attention.cbam import CBAM, ChannelAttention, SpatialAttention

__version__ = '0.1.0'

__all__ = ['CBAM', 'ChannelAttention', 'SpatialAttention', 'conv', 'functional', 'models',
           '__version__']
