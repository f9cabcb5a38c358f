"""What every backbone family may share: PyTorch-style padding, the option-A shortcut,
torchvision's initialisers and the image check."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_jax import _validation

Array = jax.Array

# Kaiming normal with fan_out, as torchvision and the official CBAM code initialise convs.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Official CBAM code: kaiming_normal(fc.weight), i.e. fan_in, and a zero bias.
head_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def same_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # Symmetric k // 2 padding like PyTorch's Conv2d(padding=k // 2). Flax's 'SAME' pads
  # (0, 1) for stride 2 on even sizes, which would break weight conversion parity.
  return ((kernel_size // 2, kernel_size // 2),) * 2


def pad_shortcut(x: Array, features: int, strides: int) -> Array:
  """He et al. option A: subsample by ``strides`` and zero-pad channels up to ``features``.

  Channels are padded equally on both sides (extra one after), as in the widely used
  PyTorch CIFAR reference (akamaster/pytorch_resnet_cifar10).
  """
  x = x[:, ::strides, ::strides, :]
  extra = features - x.shape[-1]
  if extra < 0:
    raise ValueError(
        f"shortcut='pad' cannot reduce channels ({x.shape[-1]} -> {features}); use "
        "shortcut='projection'.")
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


# Channel counts of images: an axis 1 of this size before two larger axes is NCHW.
_IMAGE_CHANNELS = _validation.IMAGE_CHANNELS


def check_images(x: Array, network: str = 'ResNet', *, channels_last: bool = False) -> None:
  """NHWC floating-point images, or a one-line error saying how to get them.

  NCHW is assumed, unless ``channels_last``, when axis 1 has 1, 3 or 4 entries (grey, RGB,
  RGBA) and axes 2 and 3 both have more than 4 (e.g. ``(2, 3, 224, 224)``): read as NHWC
  that would be 3-pixel-high images of 224 channels.
  """
  shape = getattr(x, 'shape', None)
  if shape is None or len(shape) != 4:
    raise ValueError(
        f'{network} expects NHWC images of shape (B, H, W, C); got '
        f'{None if shape is None else tuple(shape)}. Add a batch axis with x[None] or '
        'transpose NCHW input with x.transpose(0, 2, 3, 1).')
  if (not channels_last and shape[1] in _IMAGE_CHANNELS
      and min(shape[2], shape[3]) > max(_IMAGE_CHANNELS)):
    raise ValueError(
        f'{network} expects NHWC images (B, H, W, C); {tuple(shape)} looks channels-first '
        f'(NCHW, {shape[1]} channels). Transpose with x.transpose(0, 2, 3, 1), or apply with '
        f'channels_last=True if these are {shape[1]}-pixel-high images of {shape[3]} channels.')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'{network} expects floating-point images, got {x.dtype}; convert with '
                    'x.astype(jnp.float32) (and scale integer images to [0, 1]).')
