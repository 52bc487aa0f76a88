"""MT-SGD vs MOO-SVGD on the three-target toy problem (the same as ``mtsgd toy``).

Writes ``toy_comparison.png`` (MT-SGD snapshots at steps 0/250/500/1000 and
MOO-SVGD at 0/500/1000/2000, plus the share of particles in the joint
high-density region and diag(U) against steps) and ``toy_comparison.json``.
See :mod:`mtsgd_jax.experiments.toy_comparison`. Examples::

    python examples/toy_comparison.py --out outputs/toy
    python examples/toy_comparison.py --seeds 0 1 2 3 4 --weighting normalized
"""

import sys

from mtsgd_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["toy", *sys.argv[1:]]))
