"""PyTorch baselines for :mod:`experiments.bench.benchmark` (imported only when torch is installed).

Written from the official CBAM code (Jongchan/attention-module ``MODELS/cbam.py`` and
``model_resnet.py``): a channel gate with one MLP shared by the average- and max-pooled
descriptors, a spatial gate ``sigmoid(BN(conv7x7([max_c; mean_c])))``, attention on the
residual branch after the last BatchNorm. The ResNets mirror :mod:`cbam_jax.models`:
CIFAR ResNet-20 with He et al.'s option-A (zero-pad) shortcut and ImageNet ResNet-50 with
projection shortcuts, so the two frameworks time the same network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelGate(nn.Module):
  def __init__(self, channels: int, reduction_ratio: int = 16):
    super().__init__()
    hidden = max(1, channels // reduction_ratio)
    self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(),
                             nn.Linear(hidden, channels))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    size = (x.size(2), x.size(3))
    logits = (self.mlp(F.avg_pool2d(x, size, stride=size)) +
              self.mlp(F.max_pool2d(x, size, stride=size)))
    return x * torch.sigmoid(logits)[:, :, None, None]


class SpatialGate(nn.Module):
  def __init__(self, kernel_size: int = 7):
    super().__init__()
    self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
    self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    pooled = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)
    return x * torch.sigmoid(self.bn(self.conv(pooled)))


class CBAM(nn.Module):
  """The official module: channel gate, then spatial gate (with BatchNorm)."""

  def __init__(self, channels: int, reduction_ratio: int = 16):
    super().__init__()
    self.channel = ChannelGate(channels, reduction_ratio)
    self.spatial = SpatialGate()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.spatial(self.channel(x))


class BasicBlock(nn.Module):
  def __init__(self, in_planes: int, planes: int, stride: int, attention: bool):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.attention = CBAM(planes) if attention else None
    self.stride, self.extra = stride, planes - in_planes

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.attention is not None:
      out = self.attention(out)
    shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
    if self.extra:  # Option A: zero-pad the new channels.
      shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
    return F.relu(out + shortcut)


class Bottleneck(nn.Module):
  def __init__(self, in_planes: int, planes: int, stride: int, attention: bool):
    super().__init__()
    out_planes = planes * 4
    self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out_planes)
    self.attention = CBAM(out_planes) if attention else None
    self.downsample = None
    if stride != 1 or in_planes != out_planes:
      self.downsample = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(out_planes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.attention is not None:
      out = self.attention(out)
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(out + shortcut)


class ResNet(nn.Module):
  """``stem='cifar'``: 3x3 conv, BasicBlocks 16-32-64; ``'imagenet'``: 7x7/2 + max-pool,
  Bottlenecks 64-128-256-512."""

  def __init__(self, stage_sizes, *, stem: str, attention: bool, num_classes: int):
    super().__init__()
    block, width = (BasicBlock, 16) if stem == 'cifar' else (Bottleneck, 64)
    expansion = 1 if block is BasicBlock else 4
    if stem == 'cifar':
      self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                nn.ReLU())
    else:
      self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    layers, in_planes = [], width
    for stage, num_blocks in enumerate(stage_sizes):
      planes = width * 2**stage
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        layers.append(block(in_planes, planes, stride, attention))
        in_planes = planes * expansion
    self.layers = nn.Sequential(*layers)
    self.fc = nn.Linear(in_planes, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.layers(self.stem(x))
    return self.fc(torch.mean(x, dim=(2, 3)))
