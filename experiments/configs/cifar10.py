"""CIFAR-10 with a CIFAR ResNet and CBAM in every block.

The attention-free twin: `--config.model.attention=none` (same seed, data and schedule).
Data: `config.folder` = the shared JPEG tarball (an image folder, train split only, so a
fraction is held out for evaluation), or `--config.folder= --config.dataset=cifar10` for
tfds (then `config.eval_split='test'`).

  python -m experiments.training.train --config experiments/configs/cifar10.py --workdir /tmp/c10
"""

import os

from experiments.configs import base_config

SHARED_TARBALL = os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared', 'data',
                              'cifar10-jpeg-train.tar.gz')


def get_config():
  config = base_config()
  config.dataset = 'folder'
  config.folder = os.path.normpath(SHARED_TARBALL)
  config.train_split = 'train'
  config.holdout_fraction = 0.1
  config.image_size = 32
  config.augment = 'cifar'
  config.model.name = 'resnet20'
  config.model.attention = 'cbam'
  # He et al.'s CIFAR recipe: SGD momentum 0.9, lr 0.1 at batch 128, wd 1e-4 (here with a
  # cosine schedule); 200 epochs reach ~92% on the official test set. Shorten with
  # --config.num_epochs for CPU runs.
  config.num_epochs = 200
  config.global_batch_size = 128
  config.eval_batch_size = 500
  config.learning_rate = 0.1
  config.lr_reference_batch_size = 128
  config.weight_decay = 1e-4
  config.warmup_epochs = 1.0
  config.nesterov = True
  return config
