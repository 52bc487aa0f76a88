"""``mtsgd zdt``: MT-SGD, MOO-SVGD, MGDA and linear scalarisation on ZDT3."""

from __future__ import annotations


from mtsgd_jax.cli._common import HelpFormatter, add_common, non_negative_int, positive_float, positive_int, set_requires, spec_checked_by

# Optional modules this subcommand imports (checked by mtsgd_jax.cli.main before it runs).
REQUIRES = ("matplotlib",)


_method = spec_checked_by("mtsgd_jax.experiments.zdt")


def register(sub) -> None:
    from mtsgd_jax.experiments.zdt import DEFAULT_METHODS

    p = sub.add_parser(
        "zdt",
        help="ZDT3 (30 variables): MT-SGD vs MOO-SVGD (theta / objective kernel), MGDA and linear scalarisation",
        description="Runs every method for every seed from the same uniform initial particles (Adam, particles "
        "projected onto [1e-6, 1 - 1e-6]^n after each step); writes zdt3_fronts.png, zdt3_hv.png and zdt3.json and "
        "prints hypervolume (reference (1.1, 1.1) and the published MOO-SVGD point (0.990, 6.546)), IGD, IGD+, GD, "
        "segments covered and wall time, mean ± std over seeds. A method is NAME or NAME:key=value,... with NAME in "
        "mtsgd, mtsgd_obj, moo_svgd, moo_svgd_obj, mgda, linear (= linear_scalarization); keys: any scalar option of "
        "the transformation, e.g. weighting=stein|normalized|score and solver=... (mtsgd), repulsion=FLOAT "
        "(moo_svgd), normalize_grads=0|1 (moo_svgd, mgda; normalize= is accepted too); and the experiment's "
        "space=theta|objectives, h=median|FLOAT (mtsgd, moo_svgd), T=FLOAT (target temperature), lr=FLOAT. "
        "See mtsgd_jax/experiments/zdt.py.",
        formatter_class=HelpFormatter,
    )
    add_common(p, "outputs/zdt3")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2, 3, 4], help="PRNG seeds of the initial particles")
    p.add_argument("--methods", type=_method, nargs="+", default=list(DEFAULT_METHODS), help="methods to run (see above)")
    p.add_argument("--steps", type=positive_int, default=10_000, help="iterations")
    p.add_argument("--num-particles", type=positive_int, default=50, help="particles M")
    p.add_argument("--num-variables", type=positive_int, default=30, help="ZDT3 variables n (>= 2)")
    p.add_argument("--lr", type=positive_float, default=5e-4, help="Adam learning rate")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="T: the targets are p_k ∝ exp(-f_k / T)")
    p.add_argument("--trace-every", type=positive_int, default=100, help="hypervolume / IGD curves every this many steps")
    set_requires(p, REQUIRES)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.steps % args.trace_every:
        raise SystemExit(f"mtsgd zdt: --steps ({args.steps}) must be a multiple of --trace-every ({args.trace_every}).")
    if args.num_variables < 2:
        raise SystemExit("mtsgd zdt: --num-variables must be >= 2.")
    if len(set(args.methods)) != len(args.methods):
        raise SystemExit(f"mtsgd zdt: --methods must be distinct, got {args.methods}.")
    from mtsgd_jax.experiments import zdt

    zdt.main(
        args.out,
        args.seeds,
        args.methods,
        num_particles=args.num_particles,
        num_variables=args.num_variables,
        steps=args.steps,
        lr=args.lr,
        temperature=args.temperature,
        trace_every=args.trace_every,
        progress=args.progress,
    )
    return 0
