"""Test settings: 8 fake CPU devices (set before anything else touches JAX)."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Keep TensorFlow (used only by the tfds input pipeline) off any accelerator.
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_platforms', 'cpu')
