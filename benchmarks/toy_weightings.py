"""How often each MT-SGD weighting reaches the toy problem's joint high-density region.

For every ``weighting`` in ``mtsgd_jax.WEIGHTINGS`` and every step budget, runs
``optax.chain(mtsgd(3, weighting=w), optax.adam(3e-2))`` from S independent
initialisations ``clip(5 N(0, I), -10, 10)`` of 50 particles (all seeds in one
vmapped, jit-compiled program) and reports the share of particles that end
where EVERY target's density is at least 1% of its maximum: mean, min and the
fraction of seeds reaching 90%. Writes JSON to ``<out>/toy_weightings.json``.

Reproduce::

    python benchmarks/toy_weightings.py --seeds 64 --steps 1000 2000
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
import optax

import mtsgd_jax as mt
from mtsgd_jax import report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=64)
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 2000])
    p.add_argument("--num-particles", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--key", type=int, default=7, help="seeds are jax.random.split(key(KEY), SEEDS)")
    p.add_argument("--weightings", nargs="+", default=list(mt.WEIGHTINGS), choices=mt.WEIGHTINGS)
    p.add_argument("--solver", default="auto", help="QP backend of mtsgd ('auto': exact enumeration for K = 3)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)

    prob = mt.toy_problem()
    keys = jax.random.split(jax.random.key(args.key), args.seeds)
    x0 = jax.vmap(lambda k: prob.init_particles(k, args.num_particles))(keys)
    rows = []
    print(f"{'weighting':12s} {'steps':>6s} {'mean':>6s} {'min':>6s} {'P(>=0.9)':>9s} {'time':>7s}")
    for weighting in args.weightings:
        opt = optax.chain(mt.mtsgd(3, weighting=weighting, solver=args.solver), optax.adam(args.lr))
        for steps in args.steps:
            t0 = time.perf_counter()
            final = jax.vmap(lambda x: mt.sample(prob.log_prob, opt, x, steps).particles)(x0)
            share = np.asarray(jax.vmap(prob.in_joint_region)(final)).mean(axis=1)
            dt = time.perf_counter() - t0
            row = {
                "weighting": weighting,
                "solver": args.solver,
                "steps": steps,
                "mean_share": float(share.mean()),
                "min_share": float(share.min()),
                "fraction_of_seeds_at_least_0.9": float(np.mean(share >= 0.9 - 1e-6)),
                "shares": share.round(4).tolist(),
                "wall_s_including_compile": dt,
            }
            rows.append(row)
            print(
                f"{weighting:12s} {steps:6d} {row['mean_share']:6.3f} {row['min_share']:6.2f} "
                f"{row['fraction_of_seeds_at_least_0.9']:9.2f} {dt:6.1f}s",
                flush=True,
            )
    path = report.write_json(
        os.path.join(args.out, "toy_weightings.json"), {"config": vars(args), "jax_version": jax.__version__, "results": rows}
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
