"""``mtsgd scaling``: the particle-count scaling benchmark."""

from __future__ import annotations

import argparse

from mtsgd_jax.cli._common import HelpFormatter, add_common, non_negative_int, positive_int, set_requires

# Optional modules this subcommand imports (checked by mtsgd_jax.cli.main before it runs).
REQUIRES = ("matplotlib",)


def _method(text: str) -> str:
    from mtsgd_jax.experiments.scaling import K_TOY, make_transformation

    try:
        make_transformation(text, K_TOY)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def register(sub) -> None:
    from mtsgd_jax.experiments.scaling import DEFAULT_SIZES, METHODS

    p = sub.add_parser(
        "scaling",
        help="seconds per 1000 toy steps against the particle count: MT-SGD, MOO-SVGD, MGDA and the SVGD floor",
        description="Times N steps of the toy problem (K = 3, d = 2) for every particle count and method, each run "
        "one compiled lax.scan, compile time separate, medians of round-robin repeats. Also times a network-sized "
        "case (d = 139,015, M = 5, K = 7) and, with --large-m, a blocked run at large M. Writes scaling.json and "
        "scaling.png and prints the ratios mtsgd/moo_svgd and mtsgd/floor for every M.",
        formatter_class=HelpFormatter,
    )
    add_common(p, "outputs/scaling")
    p.add_argument("--sizes", type=positive_int, nargs="+", default=list(DEFAULT_SIZES), help="particle counts M")
    p.add_argument(
        "--methods", type=_method, nargs="+", default=list(METHODS),
        help="methods to time: floor, mtsgd[BACKEND], or a transformation spec NAME[:key=value,...] "
        "(e.g. linear_scalarization, mtsgd:solver=osqp)",
    )
    p.add_argument("--steps", type=positive_int, default=1000, help="steps N per timed run")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats per method and M (median reported)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="PRNG seed of the initial particles")
    p.add_argument(
        "--network", action=argparse.BooleanOptionalAction, default=True,
        help="also time the network-sized case (--no-network skips it)",
    )
    p.add_argument("--large-m", type=non_negative_int, default=0, help="also run MT-SGD at this M with the blocked kernel path (e.g. 20000); 0 = skip")
    p.add_argument("--block-size", type=positive_int, default=2048, help="row-block size for --large-m")
    set_requires(p, REQUIRES)
    p.set_defaults(func=run)


def run(args) -> int:
    from mtsgd_jax.experiments import scaling

    scaling.main(
        args.out,
        args.sizes,
        list(dict.fromkeys(args.methods)),
        steps=args.steps,
        repeats=args.repeats,
        seed=args.seed,
        network=args.network,
        large_m=args.large_m,
        block_size=args.block_size,
        progress=args.progress,
    )
    return 0
