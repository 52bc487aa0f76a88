"""MT-SGD against MOO-SVGD on the three-target toy problem.

Both start from the same particles (``5 N(0, I)``, 50 of them) and use Adam
3e-2 (docs/algorithm.md §7). MT-SGD runs 1000 steps and MOO-SVGD 2000 (the
paper's figure: MT-SGD converged in 1000 steps, MOO-SVGD in 2000). Every
``trace_every`` steps the experiment records the particles and computes two
convergence measures for both methods:

* the share of particles in the joint high-density region (every target's
  density at least 1% of its maximum), the region MT-SGD is meant to find;
* diag(U), the squared kernel Stein discrepancy of the particle set against
  each target (RBF kernel, median bandwidth), computed the same way for both.

Outputs (in ``out``): ``toy_comparison.png`` (snapshots of MT-SGD at steps
0/250/500/1000 and of MOO-SVGD at 0/500/1000/2000 over the target densities,
then the two measures against steps, mean and range over seeds) and
``toy_comparison.json`` (the curves per seed, final shares, wall times).
Command line: ``mtsgd toy --help``.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtsgd_jax import report
from mtsgd_jax.problems import toy_problem
from mtsgd_jax.sampling import sample
from mtsgd_jax.stein import kernel_stein_discrepancy
from mtsgd_jax.targets import log_prob_value_and_loss_grads
from mtsgd_jax.transforms import moo_svgd, mtsgd

__all__ = ["run_toy_comparison", "plot_toy_comparison", "main"]

JOINT_FRACTION = 0.01
LIMIT = 7.0
COLOURS = ("tab:blue", "tab:orange", "tab:green")


def _measures(prob, particles):
    """(T, M, 2) snapshots -> share in the joint region (T,) and diag(U) (T, K)."""

    def one(x):
        share = jnp.mean(prob.in_joint_region(x, JOINT_FRACTION).astype(x.dtype))
        _, loss_grads = log_prob_value_and_loss_grads(prob.log_prob, x)
        return share, kernel_stein_discrepancy(x, -loss_grads)

    return jax.jit(jax.vmap(one))(particles)


def run_toy_comparison(
    seeds: Sequence[int] = (0, 1, 2),
    *,
    num_particles: int = 50,
    mtsgd_steps: int = 1000,
    moo_svgd_steps: int = 2000,
    lr: float = 3e-2,
    trace_every: int = 10,
    weighting: str = "stein",
    progress: bool = True,
) -> dict:
    """Run both methods for every seed; returns per-seed traces and measures (numpy arrays)."""
    prob = toy_problem()
    methods = {
        "mtsgd": (optax.chain(mtsgd(3, weighting=weighting), optax.adam(lr)), mtsgd_steps),
        "moo_svgd": (optax.chain(moo_svgd(3), optax.adam(lr)), moo_svgd_steps),
    }
    out = {name: {"steps": None, "particles": [], "share": [], "ksd": [], "wall_s": []} for name in methods}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seeds) * len(methods), desc="toy comparison", unit="run")
    for seed in seeds:
        x0 = prob.init_particles(jax.random.key(seed), num_particles)
        for name, (opt, steps) in methods.items():
            start = time.perf_counter()
            res = sample(prob.log_prob, opt, x0, steps, trace_every=trace_every)
            jax.block_until_ready(res)
            wall = time.perf_counter() - start
            share, ksd = _measures(prob, res.trace.particles)
            rec = out[name]
            rec["steps"] = np.asarray(res.trace.step)
            rec["particles"].append(np.asarray(res.trace.particles))
            rec["share"].append(np.asarray(share))
            rec["ksd"].append(np.asarray(ksd))
            rec["wall_s"].append(wall)
            if bar is not None:
                bar.set_postfix_str(f"seed {seed} {name}: final share {float(share[-1]):.2f}")
                bar.update(1)
    if bar is not None:
        bar.close()
    for rec in out.values():
        for key in ("particles", "share", "ksd"):
            rec[key] = np.stack(rec[key])
    return {"seeds": list(seeds), "weighting": weighting, "num_particles": num_particles, "lr": lr, "methods": out}


def _density_grid(prob, n=160):
    g = np.linspace(-LIMIT, LIMIT, n)
    xx, yy = np.meshgrid(g, g)
    pts = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)
    dens = np.exp(np.asarray(jax.vmap(prob.log_prob)(pts))).T.reshape(-1, n, n)
    joint = np.asarray(prob.in_joint_region(pts, JOINT_FRACTION), float).reshape(n, n)
    return xx, yy, dens, joint


def plot_toy_comparison(result: dict, path: str, snapshots: dict | None = None) -> str:
    """The comparison figure (see the module docstring); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prob = toy_problem()
    xx, yy, dens, joint = _density_grid(prob)
    methods = result["methods"]
    if snapshots is None:  # steps 0, N/4, N/2 and N of each method's own run
        snapshots = {name: [int(round(f * rec["steps"][-1])) for f in (0.0, 0.25, 0.5, 1.0)] for name, rec in methods.items()}
    labels = {"mtsgd": "MT-SGD", "moo_svgd": "MOO-SVGD"}
    fig = plt.figure(figsize=(17, 8.2), layout="constrained")
    grid = fig.add_gridspec(2, 6, width_ratios=[1, 1, 1, 1, 1.5, 1.5])
    for row, (name, rec) in enumerate(methods.items()):
        steps = list(rec["steps"])
        for col, s in enumerate(snapshots[name]):
            ax = fig.add_subplot(grid[row, col])
            for j in range(dens.shape[0]):
                peak = dens[j].max()
                ax.contour(xx, yy, dens[j], levels=peak * np.array([0.05, 0.3, 0.7]), colors=COLOURS[j], linewidths=0.9, alpha=0.8)
            ax.contour(xx, yy, joint, levels=[0.5], colors="k", linestyles="--", linewidths=0.9)
            idx = steps.index(min(steps, key=lambda t: abs(t - s)))
            x = rec["particles"][0, idx]
            ax.scatter(x[:, 0], x[:, 1], s=9, c="k", zorder=3)
            ax.set_xlim(-LIMIT, LIMIT)
            ax.set_ylim(-LIMIT, LIMIT)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{labels.get(name, name)}, step {steps[idx]}\n{rec['share'][0, idx]:.0%} in the joint region", fontsize=9)
    ax_share = fig.add_subplot(grid[:, 4])
    ax_ksd = fig.add_subplot(grid[:, 5])
    styles = {"mtsgd": "C0", "moo_svgd": "C3"}
    for name, rec in methods.items():
        c = styles.get(name, "C2")
        t = rec["steps"]
        ax_share.plot(t, rec["share"].mean(0), color=c, lw=2, label=labels.get(name, name))
        ax_share.fill_between(t, rec["share"].min(0), rec["share"].max(0), color=c, alpha=0.15)
        for j in range(rec["ksd"].shape[-1]):
            ax_ksd.plot(t, rec["ksd"][:, :, j].mean(0), color=c, lw=1.4, ls=("-", "--", ":")[j % 3], label=f"{labels.get(name, name)}, target {j + 1}")
    ax_share.set_xlabel("step")
    ax_share.set_ylabel("share of particles in the joint high-density region")
    ax_share.set_ylim(-0.02, 1.02)
    ax_share.grid(alpha=0.3)
    ax_share.legend(fontsize=8, loc="lower right")
    ax_share.set_title(f"mean and [min, max] over {len(result['seeds'])} seeds", fontsize=9)
    ax_ksd.set_yscale("log")
    ax_ksd.set_xlabel("step")
    ax_ksd.set_ylabel("diag(U): squared KSD per target (mean over seeds)")
    ax_ksd.grid(alpha=0.3, which="both")
    ax_ksd.legend(fontsize=7)
    fig.suptitle(
        f"Three-target toy problem: MT-SGD (weighting={result['weighting']!r}) vs MOO-SVGD, "
        f"M = {result['num_particles']}, Adam {result['lr']:g}; dashed black: joint region (every density >= 1% of its max)",
        fontsize=10,
    )
    try:
        report.save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)
    return path


def summary_rows(result: dict) -> list[list]:
    rows = []
    for name, rec in result["methods"].items():
        share = rec["share"][:, -1]
        ksd = rec["ksd"][:, -1].mean(0)
        rows.append(
            [
                name,
                str(int(rec["steps"][-1])),
                f"{share.mean():.2f} [{share.min():.2f}, {share.max():.2f}]",
                " ".join(f"{v:.3g}" for v in ksd),
                f"{np.median(rec['wall_s']):.2f}",
            ]
        )
    return rows


def main(
    out: str,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    num_particles: int = 50,
    mtsgd_steps: int = 1000,
    moo_svgd_steps: int = 2000,
    lr: float = 3e-2,
    weighting: str = "stein",
    trace_every: int = 10,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
) -> dict:
    """Run, write ``toy_comparison.json``, print a summary table, then plot ``toy_comparison.png`` into ``out``.

    Raises:
      mtsgd_jax.experiments.report.PlotError: the figure failed; the JSON is written and kept.
    """
    os.makedirs(out, exist_ok=True)
    result = run_toy_comparison(
        seeds,
        num_particles=num_particles,
        mtsgd_steps=mtsgd_steps,
        moo_svgd_steps=moo_svgd_steps,
        lr=lr,
        trace_every=trace_every,
        weighting=weighting,
        progress=progress,
    )
    snaps = {
        "mtsgd": [0, mtsgd_steps // 4, mtsgd_steps // 2, mtsgd_steps],
        "moo_svgd": [0, moo_svgd_steps // 4, moo_svgd_steps // 2, moo_svgd_steps],
    }
    payload = {
        "config": {k: result[k] for k in ("seeds", "weighting", "num_particles", "lr")}
        | {"mtsgd_steps": mtsgd_steps, "moo_svgd_steps": moo_svgd_steps, "trace_every": trace_every, "joint_fraction": JOINT_FRACTION},
        "machine": report.machine_info(),
        "methods": {
            name: {
                "steps": rec["steps"],
                "share_in_joint_region": rec["share"],
                "ksd": rec["ksd"],
                "final_share_mean": float(rec["share"][:, -1].mean()),
                "wall_s_including_compile": rec["wall_s"],
            }
            for name, rec in result["methods"].items()
        },
    }
    # The results first: a failing figure must not lose them.
    js = report.write_json(os.path.join(out, "toy_comparison.json"), payload)
    print_fn(
        report.format_table(
            ["method", "steps", "final share in joint region, mean [min, max]", "final diag(U) (mean over seeds)", "wall s (median)"],
            summary_rows(result),
        )
    )
    print_fn(f"wrote {js}")
    (png,) = report.write_figures(
        [(lambda p: plot_toy_comparison(result, p, snaps), os.path.join(out, "toy_comparison.png"))], results=[js]
    )
    print_fn(f"wrote {png}")
    return payload
