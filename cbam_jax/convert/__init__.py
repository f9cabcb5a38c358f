"""PyTorch ResNet weights -> :class:`cbam_jax.models.ResNet` variables.

Three layouts are understood (``source=``):

* ``'official'``: Jongchan/attention-module (``MODELS/model_resnet.py`` + ``cbam.py``),
  ImageNet (7x7 ``conv1``) and CIFAR (3x3 ``conv1``) network types, with or without CBAM.
* ``'timm'``: timm ResNets and ResNeXts built with ``block_args=dict(attn_layer='cbam')``
  or ``'se'`` (the attention lives under ``layerS.I.se``), and timm's ``mobilenetv2_*`` and
  ``mobilenetv1_100`` / ``_125`` (:mod:`~cbam_jax.convert.mobilenet`; attention freshly
  initialised as timm configures it).
* ``'torchvision'``: a plain torchvision ResNet, ResNeXt, Wide ResNet or ``mobilenet_v2``;
  the backbone is loaded and the attention modules asked for with ``attention=`` are freshly
  initialised (reported as new keys).

The architecture (block type, stage sizes, width, stem, ResNeXt's groups and width per
group, classes, attention and its hidden sizes, MLP bias, spatial BatchNorm and kernel size;
a MobileNet's version and width) is read from the keys and shapes.

Example::

  model, variables = from_pytorch(torch.load(path, weights_only=True)['state_dict'])
  logits = model.apply(variables, images_nhwc)

From the shell, ``python -m cbam_jax.convert IN.pth OUT_DIR --source=official`` writes
``OUT_DIR/model.json`` and an orbax checkpoint ``OUT_DIR/variables``; read them back with
:func:`cbam_jax.saving.load`.

One file per job: :mod:`~cbam_jax.convert.state_dict` reads state dicts,
:mod:`~cbam_jax.convert.architecture` infers the model, :mod:`~cbam_jax.convert.keys` maps
keys, :mod:`~cbam_jax.convert.conversion` puts them together (:func:`from_pytorch`) and
:mod:`~cbam_jax.convert.cli` is the command line; :mod:`cbam_jax.saving` writes and reads
the models.
"""

from cbam_jax.convert.architecture import SOURCES
from cbam_jax.convert.cli import main
from cbam_jax.convert.conversion import APIS, ConversionReport, from_pytorch
from cbam_jax.convert.state_dict import load_state_dict

__all__ = ['APIS', 'SOURCES', 'ConversionReport', 'from_pytorch', 'load_state_dict', 'main']
