"""``python -m cbam_jax.convert``: see :mod:`cbam_jax.convert.cli`."""

import sys

from cbam_jax.convert.cli import main

sys.exit(main())
