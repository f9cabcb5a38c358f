"""The commands and studies around cbam_jax: training, data, benchmarks, inspection.

Every command imports this package before anything else, so it is where TensorFlow's
start-up output is kept out of theirs (TensorFlow is imported later, if at all, for tfds,
image resizing and TensorBoard). ``TF_CPP_MIN_LOG_LEVEL`` silences its C++ logging, but
TensorFlow 2.21 prints "oneDNN custom operations are on" (twice per process, through absl)
whatever that level, so its oneDNN kernels are switched off too: TensorFlow's results here
are the same without them (``tf.image.resize`` gives the same bytes either way). A value
already set in the environment wins.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
