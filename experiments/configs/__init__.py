"""Training configurations: ``ml_collections`` config files for ``experiments/training/train.py``.

Each file's ``get_config()`` starts from :func:`base_config` (the data fields of
``input_pipeline.default_data_config()`` plus every training field below, with their
defaults) and changes what its recipe needs. Any field can be overridden on the command
line, e.g. ``--config.num_epochs=3 --config.model.attention=none``.
"""

from __future__ import annotations

import ml_collections

# `model.attention` values that mean "no attention" (the plain ResNet baseline). A string
# keeps the field overridable from the command line, where `None` would arrive as 'None'.
NO_ATTENTION = ('none', '')


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with defaults; config files change what they need."""
  from experiments.data import (
    pipeline as input_pipeline,  # Imported here: config files stay cheap to list.
  )

  config = input_pipeline.default_data_config()

  # Model: `name` is a `cbam_jax.models.create_model` name; every other field of
  # `config.model` is passed to it (num_classes comes from the dataset).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet_tiny'
  config.model.attention = 'cbam'  # A cbam_jax.attention name, or 'none' for no attention.
  # A module after every stage but the last (BAM's placement), e.g. 'bam'; 'none' for none.
  config.model.stage_attention = 'none'
  # Compute dtype: 'float32', or 'bfloat16' for mixed precision (parameters stay float32).
  config.model.dtype = 'float32'
  # Unset (None) = the model's default; set e.g. --config.model.zero_init_spatial_gate=False
  # (start CBAM's spatial gates at sigmoid(BN) with scale 1 instead of 0.5).
  config.model.zero_init_spatial_gate = ml_collections.config_dict.placeholder(bool)
  # Fields of the `attention` module over its registry configuration, as comma-separated
  # FIELD=VALUE with Python-literal values: --config.model.attention_fields=reduction_ratio=4
  # (ResNet.attention_fields). Unset = none.
  config.model.attention_fields = ml_collections.config_dict.placeholder(str)

  config.num_epochs = 1
  # Optimiser: 'sgd' (momentum, optionally Nesterov) or 'adamw'.
  config.optimizer = 'sgd'
  # Peak learning rate for a batch of `lr_reference_batch_size` images; scaled linearly to
  # `global_batch_size` (0 = use `learning_rate` as is).
  config.learning_rate = 0.1
  config.lr_reference_batch_size = 256
  config.momentum = 0.9
  config.nesterov = True
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  # Decoupled for AdamW, an L2 term on the gradient for SGD (as in PyTorch); applied to
  # kernels only (arrays with 2+ dimensions), never to biases or normalisation parameters.
  config.weight_decay = 1e-4
  # 'cosine' (linear warmup, then cosine to 0), 'step' (warmup, then x `lr_decay_factor`
  # at each of `lr_decay_epochs`) or 'constant' (warmup, then flat).
  config.schedule = 'cosine'
  config.warmup_epochs = 0.0
  config.lr_decay_epochs = (30, 60, 80)
  config.lr_decay_factor = 0.1
  config.label_smoothing = 0.0
  config.grad_clip_norm = 0.0  # Clip gradients to this global norm; 0 = no clipping.
  # A NaN or infinite loss or gradient: 'stop' the run with an error (checked every
  # `log_every_steps` and before every checkpoint; nothing non-finite is saved), or 'skip'
  # those steps (the parameters stay as they were; the epoch line says how many).
  config.on_nonfinite = 'stop'

  # Checkpoints (orbax) under `<workdir>/checkpoints`: one at the end of every epoch and
  # every `checkpoint_every_steps` steps (0 = epoch ends only); the last
  # `keep_checkpoints` are kept, plus the one with the best eval top-1.
  config.checkpoint_every_steps = 0
  config.keep_checkpoints = 3
  config.async_checkpointing = True
  # Fine-tuning: a checkpoint directory to take params/batch_stats from before step 0
  # (one written by `python -m cbam_jax.convert`, or a workdir / checkpoints dir of this
  # trainer). Strict: it must be of this model, except for attention it lacks (inserted,
  # initialised per `init_attention`) and a classifier head of another size (initialised
  # afresh); anything else is an error unless `init_from_partial`. The held-out set is
  # evaluated once before the first step (epoch 0 in metrics.jsonl).
  config.init_from = ''
  # Attention inserted into the init_from network: 'identity' (identity_init=True: the
  # network starts computing exactly what it computed) or 'official' (the member's own init).
  config.init_attention = 'identity'
  # Load only the arrays of init_from that match this model, listing every one left out.
  config.init_from_partial = False

  config.eval_every_epochs = 1
  config.log_every_steps = 20  # Progress-bar refresh (each one waits for the device).
  config.progress_bar = True
  # TensorBoard event files: None = when TensorFlow is installed (the [tf] extra).
  config.tensorboard = ml_collections.config_dict.placeholder(bool)
  return config
