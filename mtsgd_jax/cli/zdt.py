"""``mtsgd zdt``: MT-SGD, MOO-SVGD, MGDA and linear scalarisation on ZDT3."""

from __future__ import annotations


from mtsgd_jax.cli._common import HelpFormatter, add_common, non_negative_int, positive_float, positive_int, set_requires, spec_checked_by

# Optional modules this subcommand imports (checked by mtsgd_jax.cli.main before it runs).
REQUIRES = ("matplotlib",)


_method = spec_checked_by("mtsgd_jax.experiments.zdt")


def register(sub) -> None:
    from mtsgd_jax.experiments.zdt import CONFIGS

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
        "space=theta|objectives, h=median|FLOAT (mtsgd, moo_svgd), T=FLOAT (target temperature), lr=FLOAT, "
        "normalize_grads=0|1 (mtsgd: unit per-particle target gradients times 1/T), T_end=FLOAT (temperature annealed "
        "geometrically from T to T_end), momentum=FLOAT (optax.trace before Adam), box=FLOAT (project onto "
        "[box, 1 - box] instead of [1e-6, 1 - 1e-6]). --config picks a named set of methods and seeds: "
        + "; ".join(f"{name}: {c.description}" for name, c in CONFIGS.items())
        + ". See mtsgd_jax/experiments/zdt.py.",
        formatter_class=HelpFormatter,
    )
    add_common(p, "outputs/zdt3")
    p.add_argument("--config", choices=list(CONFIGS), default="default", help="named methods and seeds (see above)")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=None, help="PRNG seeds of the initial particles (default: the config's)")
    p.add_argument("--methods", type=_method, nargs="+", default=None, help="methods to run (see above; default: the config's)")
    p.add_argument("--steps", type=positive_int, default=10_000, help="iterations")
    p.add_argument("--num-particles", type=positive_int, default=50, help="particles M")
    p.add_argument("--num-variables", type=positive_int, default=30, help="ZDT3 variables n (>= 2)")
    p.add_argument("--lr", type=positive_float, default=5e-4, help="Adam learning rate")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="T: the targets are p_k ∝ exp(-f_k / T)")
    p.add_argument("--trace-every", type=positive_int, default=100, help="hypervolume / IGD curves every this many steps")
    set_requires(p, REQUIRES)
    p.set_defaults(func=run)


def _command(args, seeds, methods) -> str:
    """The ``mtsgd zdt`` command line that reproduces this run."""
    import shlex

    from mtsgd_jax.experiments.zdt import CONFIGS

    parts = ["mtsgd", "zdt", "--config", args.config, "--out", args.out]
    config = CONFIGS[args.config]
    if tuple(seeds) != tuple(config.seeds):
        parts += ["--seeds", *map(str, seeds)]
    if tuple(methods) != tuple(config.methods):
        parts += ["--methods", *methods]
    for flag, value, default in (
        ("--steps", args.steps, 10_000),
        ("--num-particles", args.num_particles, 50),
        ("--num-variables", args.num_variables, 30),
        ("--lr", args.lr, 5e-4),
        ("--temperature", args.temperature, 1.0),
        ("--trace-every", args.trace_every, 100),
    ):
        if value != default:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> int:
    from mtsgd_jax.experiments.zdt import CONFIGS

    config = CONFIGS[args.config]
    seeds = list(config.seeds) if args.seeds is None else args.seeds
    methods = list(config.methods) if args.methods is None else args.methods
    if args.steps % args.trace_every:
        raise SystemExit(f"mtsgd zdt: --steps ({args.steps}) must be a multiple of --trace-every ({args.trace_every}).")
    if args.num_variables < 2:
        raise SystemExit("mtsgd zdt: --num-variables must be >= 2.")
    if len(set(methods)) != len(methods):
        raise SystemExit(f"mtsgd zdt: --methods must be distinct, got {methods}.")
    from mtsgd_jax.experiments import zdt

    zdt.main(
        args.out,
        seeds,
        methods,
        num_particles=args.num_particles,
        num_variables=args.num_variables,
        steps=args.steps,
        lr=args.lr,
        temperature=args.temperature,
        trace_every=args.trace_every,
        progress=args.progress,
        command=_command(args, seeds, methods),
    )
    return 0
