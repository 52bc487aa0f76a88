"""Per-step time of ``mtsgd_jax.sample`` on the three-target toy problem.

For every particle count M and every QP backend it times
``sample(prob.log_prob, optax.chain(mtsgd(3, solver=s), optax.adam(3e-2)), x0, N)``
(one jit-compiled ``lax.scan`` of N steps) and reports:

* ``per_step_s``: the median over R repeats of the wall time of a full
  ``sample`` call (``jax.block_until_ready`` on the result), divided by N.
  After the first (compiling) call of every variant at one M, the repeats are
  taken round-robin across variants, so slow drift of the machine affects
  every variant alike and the ratios below compare like with like.
* ``compile_s``: time of the FIRST call minus the median repeat time, i.e. the
  tracing + lowering + XLA compilation overhead of the first call (measured
  this way because the compiled function inside ``sample`` is private).
  ``compile_events_s`` is the same overhead as reported by JAX itself (the sum
  of the ``/jax/core/compile/*`` durations from ``jax.monitoring`` during the
  first call); the two should roughly agree.
* ``ratio_to_projected_gradient``: per-step time over that of the default
  ``"projected_gradient"`` backend at the same M (same run).
* ``ratio_to_floor``: per-step time over that of the ``floor`` variant at the
  same M.

Two reference variants run through the same ``sample`` loop (same target
gradients, same Adam update, same scan):

* ``floor``: an optax transformation written here that only forms the K
  per-target SVGD directions (``stein_terms_flat`` + ``directions_from_terms``,
  RBF kernel with the median bandwidth, as ``mtsgd``'s default) and returns
  ``-mean_k Phi_k``: no Gram matrix U, no QP. This is the least any K-target
  SVGD-style sampler can cost per step.
* ``no_qp``: ``mtsgd`` with a solver callable that returns uniform weights: it
  pays for U and the QP wrapper (rescaling, simplex projection) but not the
  solver iterations, so ``solver - no_qp`` is what the QP iterations cost.

Results go to ``<out>/sample_step.json`` (every raw repeat time, medians,
compile times, ratios, machine information) and ``<out>/sample_step.png``
(per-step time vs M, log-log, one line per variant).

Reproduce (from the repository root, with the package installed, e.g.
``pip install -e .[examples]``)::

    python benchmarks/bench_sample.py
    python benchmarks/bench_sample.py --sizes 5 50 100 200 --solvers projected_gradient frank_wolfe --steps 500 --repeats 3

The defaults (M in 5, 50, 100; all K = 3 backends; N = 1000; R = 5) take
about 40 s on an idle 2-core CPU, about a minute on a loaded one. Timings on
a shared or loaded machine are noisy: the JSON records the load average
before and after, and every raw repeat.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

import matplotlib

matplotlib.use("Agg")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import mtsgd_jax  # noqa: E402
from mtsgd_jax import mtsgd, sample, toy_problem  # noqa: E402
from mtsgd_jax import report  # noqa: E402
from mtsgd_jax.report import machine_info  # noqa: E402
from mtsgd_jax.stein import directions_from_terms, stein_terms_flat  # noqa: E402

K = 3  # targets of the toy problem
LR = 3e-2
REFERENCE = "projected_gradient"
FLOOR = "floor"
NO_QP = "no_qp"
DEFAULT_SOLVERS = tuple(s for s in mtsgd_jax.SOLVERS if s != "closed_form")  # closed_form needs K <= 2
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def mean_svgd_directions(kernel=None) -> optax.GradientTransformationExtraArgs:
    """The floor: ``-mean_k Phi_k`` from the K per-target SVGD directions, without U or a QP.

    ``update(grads, state, params)`` takes per-target loss gradients (K, M, d)
    and the particles (M, d), like :func:`mtsgd_jax.mtsgd`.
    """
    kernel = kernel or mtsgd_jax.rbf()

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(grads, state, params=None, **extra_args):
        del extra_args
        terms = stein_terms_flat(params, -grads.astype(params.dtype), kernel)
        phi = directions_from_terms(terms)  # (K, M, d)
        return -jnp.mean(phi, axis=0), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def uniform_weights(u, init, maxiter, tol):
    """A 'QP solver' that does no work: uniform weights (the ``no_qp`` variant)."""
    del init, maxiter, tol
    return jnp.full((u.shape[0],), 1.0 / u.shape[0], u.dtype)


def build_optimizers(solvers):
    """One optimiser object per variant, built once so compiled programs are reused."""
    opts = {s: optax.chain(mtsgd(K, solver=s), optax.adam(LR)) for s in solvers}
    opts[NO_QP] = optax.chain(mtsgd(K, solver=uniform_weights), optax.adam(LR))
    opts[FLOOR] = optax.chain(mean_svgd_directions(), optax.adam(LR))
    return opts


class CompileEvents:
    """Sums JAX's own compile-phase durations (``jax.monitoring``) while active."""

    def __init__(self):
        self.durations = collections.defaultdict(float)
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if self.active and event.startswith("/jax/core/compile/"):
            self.durations[event] += float(duration)

    def __enter__(self):
        self.durations.clear()
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False

    @property
    def total(self):
        return sum(self.durations.values())


def timed_call(prob, opt, x0, steps):
    start = time.perf_counter()
    result = sample(prob.log_prob, opt, x0, steps)
    jax.block_until_ready(result)
    return time.perf_counter() - start, result


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def run(args):
    prob = toy_problem()
    opts = build_optimizers(args.solvers)
    variants = list(args.solvers) + [NO_QP, FLOOR]
    events = CompileEvents()
    results = {}
    for m in args.sizes:
        x0 = prob.init_particles(jax.random.key(args.seed), m)
        rows = {v: {"repeat_s": []} for v in variants}
        for v in variants:
            with events:
                first, res = timed_call(prob, opts[v], x0, args.steps)
            rows[v]["first_call_s"] = first
            rows[v]["compile_events_s"] = events.total
            rows[v]["compile_events"] = dict(events.durations)
            st = mtsgd_jax.find_stein_state(res.opt_state)
            rows[v]["final_weights"] = None if st is None else np.asarray(st.weights).tolist()
            rows[v]["final_particles_finite"] = bool(jnp.all(jnp.isfinite(res.particles)))
            print(f"  M={m:<4d} {v:<19s} first call {first:7.2f} s", flush=True)
        for _ in range(args.repeats):  # round-robin so drift hits every variant alike
            for v in variants:
                rows[v]["repeat_s"].append(timed_call(prob, opts[v], x0, args.steps)[0])
        for v in variants:
            r = rows[v]
            r["median_s"] = statistics.median(r["repeat_s"])
            r["per_step_s"] = r["median_s"] / args.steps
            r["per_step_min_s"] = min(r["repeat_s"]) / args.steps
            r["per_step_max_s"] = max(r["repeat_s"]) / args.steps
            r["compile_s"] = r["first_call_s"] - r["median_s"]
        for v in variants:
            r = rows[v]
            r["ratio_to_projected_gradient"] = r["per_step_s"] / rows[REFERENCE]["per_step_s"] if REFERENCE in rows else None
            r["ratio_to_floor"] = r["per_step_s"] / rows[FLOOR]["per_step_s"]
            # The same ratios from the fastest repeat: less sensitive to a busy machine.
            r["ratio_to_projected_gradient_from_min"] = (
                r["per_step_min_s"] / rows[REFERENCE]["per_step_min_s"] if REFERENCE in rows else None
            )
            r["ratio_to_floor_from_min"] = r["per_step_min_s"] / rows[FLOOR]["per_step_min_s"]
        results[str(m)] = rows
    return variants, results


def print_table(variants, results, steps):
    head = f"{'M':>4s}  {'variant':<19s} {'per-step median':>15s} {'[min, max]':>19s} {'compile':>8s} {'/proj_grad':>10s} {'/floor':>7s}"
    print(head)
    print("-" * len(head))
    for m, rows in results.items():
        for v in variants:
            r = rows[v]
            rp = r["ratio_to_projected_gradient"]
            print(
                f"{m:>4s}  {v:<19s} {1e6 * r['per_step_s']:12.1f} us "
                f"[{1e6 * r['per_step_min_s']:7.1f}, {1e6 * r['per_step_max_s']:7.1f}] "
                f"{r['compile_s']:7.2f}s {'' if rp is None else f'{rp:10.2f}'} {r['ratio_to_floor']:7.2f}"
            )
    print(f"(per-step = median over repeats of one {steps}-step sample() call / {steps}; compile = first call - median)")


def plot(variants, results, path, info, steps):
    sizes = [int(m) for m in results]
    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    styles = {FLOOR: dict(color="k", ls="--", marker="s"), NO_QP: dict(color="0.5", ls=":", marker="^")}
    for i, v in enumerate(variants):
        st = styles.get(v, dict(color=f"C{i}", ls="-", marker="o"))
        med = np.array([results[str(m)][v]["per_step_s"] for m in sizes]) * 1e6
        lo = np.array([results[str(m)][v]["per_step_min_s"] for m in sizes]) * 1e6
        hi = np.array([results[str(m)][v]["per_step_max_s"] for m in sizes]) * 1e6
        label = {FLOOR: "floor: K SVGD directions only", NO_QP: "MT-SGD with uniform weights (no QP)"}.get(v, f"MT-SGD, {v}")
        ax.errorbar(sizes, med, yerr=[med - lo, hi - med], label=label, capsize=3, ms=5, **st)
        ratio = [results[str(m)][v]["ratio_to_floor"] for m in sizes]
        ax_r.plot(sizes, ratio, ms=5, **st)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("particles M")
    ax.set_ylabel("time per step (us), median [min, max]")
    ax.set_title(f"sample() per-step time, toy problem K = 3, N = {steps}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax_r.set_xscale("log")
    ax_r.set_yscale("log")
    ax_r.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax_r.set_xlabel("particles M")
    ax_r.set_ylabel("per-step time / floor")
    ax_r.axhline(1.0, color="k", lw=0.8)
    ax_r.set_title("overhead over the floor", fontsize=10)
    ax_r.grid(True, which="both", alpha=0.3)
    for a in (ax, ax_r):
        a.set_xticks(sizes)
        a.set_xticklabels([str(m) for m in sizes])
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"{info['backend']} ({info['cpu_count']} CPUs), jax {info['jax_version']}, {info['date']}", fontsize=9)
    try:
        report.save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[5, 50, 100], help="particle counts M")
    p.add_argument("--solvers", nargs="+", default=list(DEFAULT_SOLVERS), choices=DEFAULT_SOLVERS, help="QP backends")
    p.add_argument("--steps", type=int, default=1000, help="steps N per sample() call")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats R per variant (after the compiling call)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the initial particles")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    args = p.parse_args(argv)
    if min(args.sizes) < 2 or args.steps < 1 or args.repeats < 1:
        p.error("need every size >= 2, --steps >= 1 and --repeats >= 1")
    args.solvers = list(dict.fromkeys(args.solvers))
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    info = machine_info()
    info["loadavg_before"] = loadavg()
    print(f"jax {info['jax_version']} on {info['devices']}, {info['cpu_count']} CPUs, load {info['loadavg_before']}")
    start = time.perf_counter()
    variants, results = run(args)
    info["loadavg_after"] = loadavg()
    info["benchmark_wall_s"] = time.perf_counter() - start
    print_table(variants, results, args.steps)

    payload = {
        "description": "Per-step wall time of mtsgd_jax.sample on toy_problem() (K = 3, d = 2), "
        "optax.chain(<variant>, optax.adam(3e-2)); see benchmarks/bench_sample.py.",
        "config": {"sizes": args.sizes, "solvers": args.solvers, "steps": args.steps, "repeats": args.repeats, "seed": args.seed, "lr": LR},
        "definitions": {
            "per_step_s": "median over repeats of one sample() call (block_until_ready) / steps",
            "compile_s": "first call - median repeat (tracing + lowering + compilation)",
            "ratio_*_from_min": "the same ratios computed from the fastest repeat of each variant",
            "compile_events_s": "sum of jax.monitoring /jax/core/compile/* durations during the first call",
            FLOOR: "-mean_k Phi_k from stein_terms_flat + directions_from_terms: no U, no QP",
            NO_QP: "mtsgd with a solver returning uniform weights: U and QP wrapper, no solver iterations",
        },
        "variants": variants,
        "machine": info,
        "results": results,
    }
    js = report.write_json(os.path.join(args.out, "sample_step.json"), payload)
    print(f"total {info['benchmark_wall_s']:.0f} s; wrote {js}")
    png = os.path.join(args.out, "sample_step.png")
    report.write_figures([(lambda p: plot(variants, results, p, info, args.steps), png)], results=[js])
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
