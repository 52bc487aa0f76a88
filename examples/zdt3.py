"""MT-SGD vs MOO-SVGD, MGDA and linear scalarisation on ZDT3 (the same as ``mtsgd zdt``).

ZDT3 with 30 variables, 50 particles from the uniform distribution on the box,
Adam 5e-4 for 10,000 iterations, particles projected onto [1e-6, 1 - 1e-6]
after each step, 5 seeds. Writes ``zdt3_fronts.png`` (final fronts over the
true front), ``zdt3_hv.png`` (hypervolume and IGD against the iteration) and
``zdt3.json``, and prints the summary table. See
:mod:`mtsgd_jax.experiments.zdt`. Examples::

    python examples/zdt3.py --out docs/results/zdt3
    python examples/zdt3.py --methods mtsgd "mtsgd:weighting=score,T=0.01" moo_svgd_obj --seeds 100 101 102
"""

import sys

from mtsgd_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["zdt", *sys.argv[1:]]))
