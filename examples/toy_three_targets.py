"""MT-SGD on the three-target toy problem: particles that are likely under every target.

The toy problem (docs/algorithm.md §7, :func:`mtsgd_jax.toy_problem`) has three
targets in 2-D, each a two-component Gaussian mixture. Each target's main
component (weight 0.7) sits in a different corner, but their minor components
(weight 0.3) overlap near the origin: that is the only region where all three
densities are high at once. MT-SGD moves one set of particles along the single
Stein direction that lowers every target's KL divergence together, so the
particles, which start widely spread (``5 N(0, I)``), gather in that shared
region rather than splitting between the corners.

The script runs ``optax.chain(mtsgd(3), optax.adam(3e-2))`` for 1000 steps on 50
particles with :func:`mtsgd_jax.sample` (recording a trace every 10 steps) and
writes, under ``--out`` (default ``outputs``):

* ``toy_three_targets.png``: one panel per snapshot (steps 0, 250, 500, 1000)
  with each target's density contours in its own colour, the dashed outline
  of the joint high-density region (every target's density is at least 1% of
  its maximum) and the particles as black dots; then the per-target squared
  kernel Stein discrepancy diag(U) (log scale) and the MT-SGD weights w* per
  step.
* ``toy_three_targets.json``: the share of particles in the joint region at
  those snapshots, the final weights and KSD, the wall time, and the full
  trace (share, weights and KSD every ``--trace-every`` steps).

Run it (10-20 s on a 2-core CPU; the sampling itself takes a few seconds, most
of them jit compilation)::

    python examples/toy_three_targets.py --out outputs
    python examples/toy_three_targets.py --solver frank_wolfe --num-particles 100
    python examples/toy_three_targets.py --weighting normalized --seed 3

or ``scripts/demo.sh``, which installs the package first.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import matplotlib

matplotlib.use("Agg")  # no display needed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

import mtsgd_jax  # noqa: E402
from mtsgd_jax import mtsgd, sample, toy_problem  # noqa: E402

TARGET_COLOURS = ("tab:blue", "tab:orange", "tab:green")
LIMIT = 7.0  # plots cover [-LIMIT, LIMIT]^2
JOINT_FRACTION = 0.01  # "high density": at least 1% of the target's maximum density
NUM_SNAPSHOT_PANELS = 4  # steps 0, N/4, N/2, N


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="outputs", help="output directory")
    p.add_argument("--num-particles", type=int, default=50, help="number of particles M")
    p.add_argument("--steps", type=int, default=1000, help="number of optimiser steps (a multiple of 4 * trace-every)")
    p.add_argument("--lr", type=float, default=3e-2, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the initial particles")
    p.add_argument("--solver", default="auto", choices=("auto",) + mtsgd_jax.SOLVERS, help="QP backend for the weights ('auto': exact enumeration for K = 3)")
    p.add_argument(
        "--weighting",
        default="stein",
        choices=mtsgd_jax.WEIGHTINGS,
        help="how the K directions are weighted (see mtsgd's docstring and the README)",
    )
    p.add_argument(
        "--trace-every",
        type=int,
        default=10,
        help="record particles, weights and KSD every this many steps (the snapshot panels use steps 0, N/4, N/2, N)",
    )
    args = p.parse_args(argv)
    if args.num_particles < 2:
        p.error("--num-particles must be at least 2")
    if args.trace_every < 1 or args.steps < 1 or args.steps % (NUM_SNAPSHOT_PANELS * args.trace_every):
        p.error(f"--steps ({args.steps}) must be a positive multiple of 4 * --trace-every ({args.trace_every})")
    if args.solver == "closed_form":
        p.error("--solver closed_form only handles K <= 2 targets; the toy problem has K = 3")
    return args


def density_grids(prob, n=200):
    """Normalised densities p_k on an n x n grid over [-LIMIT, LIMIT]^2: (xs, ys, (K, n, n))."""
    g = np.linspace(-LIMIT, LIMIT, n)
    xx, yy = np.meshgrid(g, g)
    pts = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)
    dens = np.exp(np.asarray(jax.vmap(prob.log_prob)(pts)))  # (n*n, K)
    joint = np.asarray(prob.in_joint_region(pts, JOINT_FRACTION), float)
    return xx, yy, dens.T.reshape(-1, n, n), joint.reshape(n, n)


def plot(prob, trace, snapshot_idx, joint_share, path, title):
    steps = np.asarray(trace.step)
    particles = np.asarray(trace.particles)
    ksd = np.asarray(trace.ksd)
    weights = np.asarray(trace.weights)
    xx, yy, dens, joint = density_grids(prob)
    k = dens.shape[0]

    fig = plt.figure(figsize=(4.0 * NUM_SNAPSHOT_PANELS + 4.6, 4.6), layout="constrained")
    grid = fig.add_gridspec(2, NUM_SNAPSHOT_PANELS + 1, width_ratios=[1] * NUM_SNAPSHOT_PANELS + [1.15])
    for col, t in enumerate(snapshot_idx):
        ax = fig.add_subplot(grid[:, col])
        for j in range(k):
            peak = dens[j].max()
            ax.contour(xx, yy, dens[j], levels=peak * np.array([0.05, 0.3, 0.7]), colors=TARGET_COLOURS[j], linewidths=1.0, alpha=0.8)
        ax.contour(xx, yy, joint, levels=[0.5], colors="k", linestyles="--", linewidths=1.0)
        x = particles[t]
        ax.scatter(x[:, 0], x[:, 1], s=14, c="k", edgecolors="w", linewidths=0.4, zorder=3)
        ax.set_xlim(-LIMIT, LIMIT)
        ax.set_ylim(-LIMIT, LIMIT)
        ax.set_aspect("equal")
        ax.set_title(f"step {steps[t]}: {100 * joint_share[t]:.0f}% in joint region", fontsize=10)
        ax.set_xlabel(r"$\theta_1$")
        if col == 0:
            ax.set_ylabel(r"$\theta_2$")
        out = np.sum(np.any(np.abs(x) > LIMIT, axis=1))
        if out:
            ax.text(0.02, 0.02, f"{out} particle(s) outside the axes", transform=ax.transAxes, fontsize=8)

    # Diagnostics: snapshot 0 is the initial state (no step taken yet: KSD 0, uniform weights).
    s = steps[1:]
    marker = "o" if len(s) <= 20 else None
    ax_ksd = fig.add_subplot(grid[0, -1])
    ax_w = fig.add_subplot(grid[1, -1], sharex=ax_ksd)
    for j in range(k):
        ax_ksd.plot(s, ksd[1:, j], color=TARGET_COLOURS[j], marker=marker, ms=4)
        ax_w.plot(s, weights[1:, j], color=TARGET_COLOURS[j], marker=marker, ms=4)
    ax_ksd.set_yscale("log")
    ax_ksd.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_ksd.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax_ksd.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_ksd.set_ylabel(r"KSD$^2$ = diag(U)")
    ax_ksd.set_title("per-target diagnostics", fontsize=10)
    ax_ksd.tick_params(labelbottom=False)
    ax_ksd.grid(True, which="both", alpha=0.3)
    ax_w.set_ylabel(r"MT-SGD weight $w^*_k$")
    ax_w.set_ylim(-0.05, 1.05)
    ax_w.set_xlabel("step")
    ax_w.grid(True, alpha=0.3)

    handles = [Line2D([], [], color=c, label=f"target {j + 1}") for j, c in enumerate(TARGET_COLOURS[:k])]
    handles += [
        Line2D([], [], color="k", ls="--", label=f"joint region (all $p_k \\geq$ {JOINT_FRACTION:g} max)"),
        Line2D([], [], color="k", marker="o", ls="", ms=4, label="particles"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    prob = toy_problem()
    k = len(prob.log_probs)

    x0 = prob.init_particles(jax.random.key(args.seed), args.num_particles)
    optimizer = optax.chain(mtsgd(k, solver=args.solver, weighting=args.weighting), optax.adam(args.lr))

    start = time.perf_counter()
    result = sample(prob.log_prob, optimizer, x0, args.steps, trace_every=args.trace_every, progress_bar=True)
    jax.block_until_ready(result)
    wall = time.perf_counter() - start  # includes jit compilation

    trace = result.trace
    stein_state = mtsgd_jax.find_stein_state(result.opt_state)
    steps = [int(s) for s in np.asarray(trace.step)]
    share = [float(jnp.mean(prob.in_joint_region(xt, JOINT_FRACTION))) for xt in trace.particles]
    panel_steps = [i * args.steps // NUM_SNAPSHOT_PANELS for i in (0, 1, 2, NUM_SNAPSHOT_PANELS)]
    snapshot_idx = [steps.index(s) for s in panel_steps]

    png = os.path.join(args.out, "toy_three_targets.png")
    title = (
        f"MT-SGD on three targets: M = {args.num_particles}, Adam lr {args.lr:g}, "
        f"QP solver {args.solver}, weighting {args.weighting}"
    )
    plot(prob, trace, snapshot_idx, share, png, title)

    summary = {
        "config": {
            "num_particles": args.num_particles,
            "steps": args.steps,
            "lr": args.lr,
            "seed": args.seed,
            "solver": args.solver,
            "weighting": args.weighting,
            "trace_every": args.trace_every,
            "joint_region_fraction": JOINT_FRACTION,
        },
        "share_in_joint_region": {str(steps[i]): share[i] for i in snapshot_idx},
        "final_weights": np.asarray(stein_state.weights).tolist(),
        "final_ksd": np.asarray(stein_state.ksd).tolist(),
        "wall_time_s": wall,
        "wall_time_note": "one sample() call including jit compilation",
        "trace": {
            "step": steps,
            "share_in_joint_region": share,
            "weights": np.asarray(trace.weights).tolist(),
            "ksd": np.asarray(trace.ksd).tolist(),
        },
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
    }
    js = os.path.join(args.out, "toy_three_targets.json")
    with open(js, "w") as f:
        json.dump(summary, f, indent=2)

    shares = ", ".join(f"{share[i]:.0%} at step {steps[i]}" for i in snapshot_idx)
    print(f"share of particles in the joint high-density region: {shares}")
    print(f"final weights {np.round(summary['final_weights'], 3).tolist()}, final KSD^2 {np.round(summary['final_ksd'], 4).tolist()}")
    print(f"sampling wall time {wall:.2f} s (including compilation)")
    print(f"wrote {png} and {js}")


if __name__ == "__main__":
    main()
