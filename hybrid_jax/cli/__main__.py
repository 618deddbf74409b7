"""``python -m hybrid_jax.cli``: the ``hybrid-jax`` command."""

import sys

from hybrid_jax.cli import main

sys.exit(main())
