"""Particle-count scaling benchmark (the same as ``mtsgd scaling``).

Seconds for 1000 toy-problem steps (K = 3, d = 2) for M in 5..1000 for MT-SGD
with each QP backend, MOO-SVGD, MGDA and the SVGD floor; compile time apart;
medians of round-robin repeats; the ratios mtsgd/moo_svgd and mtsgd/floor;
a network-sized case (d = 139,015, M = 5, K = 7); optionally a blocked run at
large M. See :mod:`mtsgd_jax.experiments.scaling`. The README's numbers come from::

    python benchmarks/scaling.py --out benchmarks/results --large-m 20000
"""

import sys

from mtsgd_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["scaling", *sys.argv[1:]]))
