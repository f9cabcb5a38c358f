"""What every backbone family may share: PyTorch-style padding, the option-A shortcut,
torchvision's initialisers and the image check."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def check_images(x: Array, network: str = 'ResNet') -> None:
  """NHWC floating-point images, or a one-line error saying how to get them."""
  shape = getattr(x, 'shape', None)
  if shape is None or len(shape) != 4:
    raise ValueError(
        f'{network} expects NHWC images of shape (B, H, W, C); got '
        f'{None if shape is None else tuple(shape)}. Add a batch axis with x[None] or '
        'transpose NCHW input with x.transpose(0, 2, 3, 1).')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'{network} expects floating-point images, got {x.dtype}; convert with '
                    'x.astype(jnp.float32) (and scale integer images to [0, 1]).')
