"""A few steps of a tiny model on tiny 'shapes' images: for tests and CI (seconds on CPU).

  python -m experiments.training.train --config experiments/configs/smoke.py --workdir /tmp/smoke
"""

from experiments.configs import base_config


def get_config():
  config = base_config()
  config.dataset = 'shapes'
  config.image_size = 16
  config.augment = 'none'
  config.model.name = 'resnet_tiny'
  config.model.attention = 'cbam'
  config.shapes.num_train = 128
  config.shapes.num_eval = 64
  config.num_epochs = 2
  config.global_batch_size = 16
  config.eval_batch_size = 32
  config.learning_rate = 0.05
  config.lr_reference_batch_size = 0
  config.checkpoint_every_steps = 4
  config.log_every_steps = 2
  return config
