"""ImageNet-1k with ResNet-50 + CBAM: the paper's recipe (Woo et al. 2018, Sec. 4.1).

SGD momentum 0.9, lr 0.1 per 256 images, weight decay 1e-4, batch 256, 90 epochs. The
default schedule is cosine with 5 warmup epochs; the paper's step schedule is
`--config.schedule=step --config.warmup_epochs=0` (x0.1 at epochs 30, 60, 80). bfloat16
compute: `--config.model.dtype=bfloat16`. Data: tfds 'imagenet2012' (manual download into
`config.data_dir`, prepared as ArrayRecord), decoded by 8 grain worker processes.

  python -m experiments.training.train --config experiments/configs/imagenet.py --workdir gs://...
"""

from experiments.configs import base_config


def get_config():
  config = base_config()
  config.dataset = 'imagenet2012'
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.image_size = 224
  config.augment = 'imagenet'
  config.input_workers = 8  # JPEG decoding dominates: processes, not threads
  config.model.name = 'resnet50'
  config.model.attention = 'cbam'
  config.num_epochs = 90
  config.global_batch_size = 256
  config.eval_batch_size = 256
  config.optimizer = 'sgd'
  config.learning_rate = 0.1
  config.lr_reference_batch_size = 256
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.schedule = 'cosine'
  config.warmup_epochs = 5.0
  config.lr_decay_epochs = (30, 60, 80)
  config.lr_decay_factor = 0.1
  config.checkpoint_every_steps = 1000
  config.log_every_steps = 100
  return config
