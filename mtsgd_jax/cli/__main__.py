import sys

from mtsgd_jax.cli import main

sys.exit(main())
