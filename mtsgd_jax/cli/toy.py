"""``mtsgd toy``: MT-SGD vs MOO-SVGD on the three-target toy problem."""

from __future__ import annotations

from mtsgd_jax.cli._common import HelpFormatter, add_common, non_negative_int, positive_float, positive_int, set_requires
from mtsgd_jax.transforms import WEIGHTINGS

# Optional modules this subcommand imports (checked by mtsgd_jax.cli.main before it runs).
REQUIRES = ("matplotlib",)


def register(sub) -> None:
    p = sub.add_parser(
        "toy",
        help="MT-SGD vs MOO-SVGD on the three-target toy problem (snapshots + convergence curves)",
        description="Runs MT-SGD (1000 steps) and MOO-SVGD (2000 steps) from the same particles on the three-target "
        "toy problem for every seed; writes toy_comparison.png and toy_comparison.json and prints a summary.",
        formatter_class=HelpFormatter,
    )
    add_common(p, "outputs/toy")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2], help="PRNG seeds of the initial particles")
    p.add_argument("--num-particles", type=positive_int, default=50, help="particles M")
    p.add_argument("--mtsgd-steps", type=positive_int, default=1000, help="MT-SGD steps")
    p.add_argument("--moo-svgd-steps", type=positive_int, default=2000, help="MOO-SVGD steps")
    p.add_argument("--lr", type=positive_float, default=3e-2, help="Adam learning rate")
    p.add_argument("--weighting", default="stein", choices=WEIGHTINGS, help="MT-SGD's weighting")
    p.add_argument("--trace-every", type=positive_int, default=10, help="record every this many steps")
    set_requires(p, REQUIRES)
    p.set_defaults(func=run)


def run(args) -> int:
    for name in ("mtsgd_steps", "moo_svgd_steps"):
        if getattr(args, name) % (4 * args.trace_every):
            raise SystemExit(f"mtsgd toy: --{name.replace('_', '-')} must be a multiple of 4 * --trace-every ({4 * args.trace_every}).")
    from mtsgd_jax.experiments import toy_comparison

    toy_comparison.main(
        args.out,
        args.seeds,
        num_particles=args.num_particles,
        mtsgd_steps=args.mtsgd_steps,
        moo_svgd_steps=args.moo_svgd_steps,
        lr=args.lr,
        weighting=args.weighting,
        trace_every=args.trace_every,
        progress=args.progress,
    )
    return 0
