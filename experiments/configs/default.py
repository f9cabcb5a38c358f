"""The embedded default: a small CBAM ResNet on the built-in procedural 'shapes' dataset.

No download; a few minutes on 2 CPU cores; accuracy well above chance (1/6).

  python -m experiments.training.train --config experiments/configs/default.py \
      --workdir /tmp/default
"""

from experiments.configs import base_config


def get_config():
  config = base_config()
  config.dataset = 'shapes'
  config.image_size = 32
  config.augment = 'none'
  config.model.name = 'resnet_tiny'
  config.model.attention = 'cbam'
  config.num_epochs = 10
  config.global_batch_size = 128
  config.eval_batch_size = 256
  config.learning_rate = 0.1
  config.warmup_epochs = 1.0
  config.weight_decay = 5e-4
  return config
