"""Multi-task learning on Multi-Digits: MT-SGD vs MOO-SVGD, MGDA, linear scalarisation, Pareto MTL and
single-task training (M = 5 networks each, 3 seeds). No download needed.

Writes ``multitask.json`` and ``multitask_reliability.png`` to ``--out`` and prints a markdown table
(mean ± std over seeds). See :mod:`mtsgd_jax.experiments.multitask`. The default configuration takes
about 15 minutes on a 2-core CPU. Examples::

    python examples/multi_digits.py --out docs/results/multitask
    python examples/multi_digits.py --methods mtsgd mgda --seeds 0 --epochs 2 --num-train 256
"""

import argparse

from mtsgd_jax.experiments import multitask
from mtsgd_jax.training import METHODS


def main(argv=None):
    d = multitask.DEFAULT_CONFIG
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="outputs/multitask", help="output directory")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=d["methods"])
    p.add_argument("--seeds", nargs="+", type=int, default=d["seeds"])
    p.add_argument("--num-particles", type=int, default=d["num_particles"])
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--num-train", type=int, default=d["num_train"])
    p.add_argument("--num-eval", type=int, default=d["num_eval"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default=d["optimizer"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--kernel-space", choices=("parameter", "function"), default=d["kernel_space"])
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    config = {
        "methods": a.methods, "seeds": a.seeds, "num_particles": a.num_particles, "epochs": a.epochs,
        "num_train": a.num_train, "num_eval": a.num_eval, "batch_size": a.batch_size,
        "optimizer": a.optimizer, "lr": a.lr, "kernel_space": a.kernel_space,
    }
    multitask.main(a.out, config, progress=a.progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
