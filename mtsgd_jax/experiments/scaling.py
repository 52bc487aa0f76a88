"""Particle-count scaling: MT-SGD (one QP per step) against MOO-SVGD (one QP per particle).

For every particle count M and every method, the toy problem's N-step run
(K = 3, d = 2, Adam 3e-2) is compiled ahead of time as ONE ``lax.scan`` (via
:func:`mtsgd_jax.sample`), so compile time is measured on its own, then timed
R times. Repeats rotate through the methods (round-robin), so slow drift of a
shared machine hits every method alike, and every ratio compares medians taken
in the same run.

Methods (``METHODS``):

* ``mtsgd`` -- :func:`~mtsgd_jax.mtsgd` with its default solver (``"auto"``:
  exact enumeration for K = 3); ``mtsgd[<backend>]`` with another QP backend;
* ``moo_svgd`` -- :func:`~mtsgd_jax.moo_svgd` (M QPs per step, vmapped,
  parameter-space RBF kernel with the median bandwidth, like mtsgd);
* ``mgda`` -- :func:`~mtsgd_jax.mgda` (M QPs, no kernel);
* ``floor`` -- :func:`svgd_floor`: only the K per-target SVGD directions
  (same kernel and bandwidth rule), averaged: no U, no QP. What any K-target
  SVGD-style sampler must pay.

Any other spec of the transformations' registry is accepted too
(:func:`~mtsgd_jax.transforms.make_transform`), e.g.
``linear_scalarization`` or ``mtsgd:solver=osqp,warm_start=0``
(``mtsgd[<backend>]`` is ``mtsgd:solver=<backend>``).

Two further measurements:

* :func:`network_case` -- per-step cost of each transformation at network size
  (d = 139,015, the SARCOS MLP; M = 5; K = 7) on fixed random gradients;
* :func:`large_m_case` -- MT-SGD with the blocked kernel path at M = 20,000
  (d = 2, K = 3) in a child process, reporting time per step and peak memory.

Outputs: ``scaling.json`` (every raw time, medians, compile times, ratios,
machine) and ``scaling.png`` (log-log time per N steps against M, and the
ratios). Command line: ``mtsgd scaling --help`` or
``python benchmarks/scaling.py --help``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtsgd_jax import kernels as _kernels
from mtsgd_jax import stein as _stein
from mtsgd_jax import report
from mtsgd_jax.particles import flatten_particles, flatten_target_grads, unflatten_particles
from mtsgd_jax.problems import toy_problem
from mtsgd_jax.sampling import sample
from mtsgd_jax.transforms import make_transform, parse_spec, transform_options

__all__ = [
    "METHODS",
    "DEFAULT_SIZES",
    "svgd_floor",
    "make_transformation",
    "run_scaling",
    "network_case",
    "large_m_case",
    "plot_scaling",
    "main",
]

K_TOY = 3
LR = 3e-2
DEFAULT_SIZES = (5, 10, 25, 50, 100, 200, 500, 1000)
METHODS = (
    "mtsgd",
    "mtsgd[projected_gradient]",
    "mtsgd[frank_wolfe]",
    "mtsgd[osqp]",
    "moo_svgd",
    "mgda",
    "floor",
)


def svgd_floor(kernel: _kernels.RadialKernel | None = None, *, block_size: int | None = None) -> optax.GradientTransformationExtraArgs:
    """The floor of the benchmark: ``-(1/K) sum_k Phi_k`` from the K SVGD directions; no U, no QP.

    Same interface as :func:`~mtsgd_jax.mtsgd` (loss gradients with leaves
    (K, M, ...), particles as ``params``); it does exactly the kernel work that
    MT-SGD's K directions need and nothing else.
    """
    kernel = kernel or _kernels.rbf()

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(grads, state, params=None, **extra_args):
        del extra_args
        x, spec = flatten_particles(params)
        terms = _stein.stein_terms_flat(x, -flatten_target_grads(grads, dtype=x.dtype), kernel, block_size=block_size)
        phi = _stein.directions_from_terms(terms)
        return unflatten_particles(-jnp.mean(phi, axis=0), spec), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_transformation(method: str, num_targets: int, *, block_size: int | None = None):
    """The transformation a benchmark method stands for (see the module docstring).

    Args:
      method: ``"floor"``, ``"mtsgd[<backend>]"``, or a spec of the registry
        (``"mtsgd"``, ``"moo_svgd:repulsion=0.5"``, ...).
      num_targets: K.
      block_size: row-block size of the kernel interactions, for the methods
        that have them (``mtsgd``, ``moo_svgd``, ``floor``); overrides the
        spec's.

    Raises:
      ValueError: for an unknown method or option (the message lists the
        valid ones), or a value the transformation refuses.
    """
    if method == "floor":
        return svgd_floor(block_size=block_size)
    if method.startswith("mtsgd[") and method.endswith("]"):
        method = f"mtsgd:solver={method[6:-1]}"
    try:
        spec = parse_spec(method)
    except ValueError as err:
        if "unknown method" not in str(err):
            raise
        raise ValueError(f"{err} Benchmark methods: {METHODS}, or a spec of any of those.") from None
    if spec.name == "pareto_mtl":
        raise ValueError(f"{method!r}: pareto_mtl needs the loss values (losses=), which the benchmark's sample() loop does not pass.")
    if block_size is not None and "block_size" in transform_options(spec.name):
        return make_transform(spec, num_targets, block_size=block_size)
    return make_transform(spec, num_targets)


def _toy_runner(prob, opt, steps):
    def run(x0, s0):
        res = sample(prob.log_prob, opt, x0, steps, opt_state=s0)
        return res.particles, res.opt_state

    return run


def run_scaling(
    sizes: Sequence[int] = DEFAULT_SIZES,
    methods: Sequence[str] = METHODS,
    *,
    steps: int = 1000,
    repeats: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Time ``steps`` toy-problem steps for every (M, method); returns the results dict.

    ``results[str(M)][method]`` holds ``compile_s``, ``run_s`` (every repeat),
    ``median_s`` (seconds for the whole N-step run), ``per_step_s`` and
    ``final_finite``; ``ratios[str(M)]`` holds ``mtsgd/moo_svgd`` and
    ``mtsgd/floor`` (medians of the same run).
    """
    prob = toy_problem()
    total = len(sizes) * len(methods)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total * (1 + repeats), desc="scaling", unit="run")
    results, ratios = {}, {}
    for m in sizes:
        x0 = prob.init_particles(jax.random.key(seed), m)
        compiled, rows = {}, {}
        for method in methods:
            opt = optax.chain(make_transformation(method, K_TOY), optax.adam(LR))
            s0 = opt.init(x0)
            start = time.perf_counter()
            fn = jax.jit(_toy_runner(prob, opt, steps)).lower(x0, s0).compile()
            compile_s = time.perf_counter() - start
            out = jax.block_until_ready(fn(x0, s0))  # warm-up run, not timed
            compiled[method] = (fn, s0)
            rows[method] = {"compile_s": compile_s, "run_s": [], "final_finite": bool(jnp.all(jnp.isfinite(out[0])))}
            if bar is not None:
                bar.set_postfix_str(f"M={m} {method} compiled")
                bar.update(1)
        for _ in range(repeats):
            for method in methods:
                fn, s0 = compiled[method]
                start = time.perf_counter()
                jax.block_until_ready(fn(x0, s0))
                rows[method]["run_s"].append(time.perf_counter() - start)
                if bar is not None:
                    bar.set_postfix_str(f"M={m} {method}")
                    bar.update(1)
        for row in rows.values():
            row["median_s"] = report.median(row["run_s"])
            row["per_step_s"] = row["median_s"] / steps
        r = {}
        if "mtsgd" in rows and "moo_svgd" in rows:
            r["mtsgd/moo_svgd"] = rows["mtsgd"]["median_s"] / rows["moo_svgd"]["median_s"]
        if "mtsgd" in rows and "floor" in rows:
            r["mtsgd/floor"] = rows["mtsgd"]["median_s"] / rows["floor"]["median_s"]
        results[str(m)], ratios[str(m)] = rows, r
    if bar is not None:
        bar.close()
    return {"results": results, "ratios": ratios}


def network_case(
    methods: Sequence[str] = ("mtsgd", "moo_svgd", "mgda", "linear_scalarization", "floor"),
    *,
    dim: int = 139_015,
    num_particles: int = 5,
    num_targets: int = 7,
    steps: int = 20,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Per-step cost of each transformation + Adam at network size, on fixed random gradients.

    Every method runs ``steps`` updates in one compiled ``lax.scan`` (the
    gradients are fixed: this isolates the transformation's own cost from any
    model's backward passes).
    """
    kx, kg = jax.random.split(jax.random.key(seed))
    x0 = jax.random.normal(kx, (num_particles, dim), jnp.float32) * 0.05
    grads = jax.random.normal(kg, (num_targets, num_particles, dim), jnp.float32)
    out = {}
    for method in methods:
        opt = optax.chain(make_transformation(method, num_targets), optax.adam(1e-4))
        s0 = opt.init(x0)

        def run(x, s, g, opt=opt):
            def step(carry, _):
                x, s = carry
                upd, s = opt.update(g, s, x)
                return (optax.apply_updates(x, upd), s), None

            return jax.lax.scan(step, (x, s), None, length=steps)[0]

        # The gradients are an argument, not a closed-over constant, so XLA cannot fold them away.
        compile_s, runs, _ = report.time_compiled(run, (x0, s0, grads), repeats + 1)
        runs = runs[1:]  # the first call after compiling also pays one-off allocation
        out[method] = {"compile_s": compile_s, "run_s": runs, "per_step_s": report.median(runs) / steps}
    return {"dim": dim, "num_particles": num_particles, "num_targets": num_targets, "steps": steps, "methods": out}


def _large_m_worker(m: int, block_size: int, steps: int, method: str, seed: int) -> dict:
    prob = toy_problem()
    x0 = prob.init_particles(jax.random.key(seed), m).astype(jnp.float32)
    opt = optax.chain(make_transformation(method, K_TOY, block_size=block_size), optax.adam(LR))
    s0 = opt.init(x0)
    # The last timed run's particles are the ones checked: no extra, untimed run of the large case.
    compile_s, runs, (xs, _) = report.time_compiled(_toy_runner(prob, opt, steps), (x0, s0), 2)
    return {
        "num_particles": m,
        "block_size": block_size,
        "method": method,
        "steps": steps,
        "compile_s": compile_s,
        "run_s": runs,
        "per_step_s": min(runs) / steps,
        "finite": bool(jnp.all(jnp.isfinite(xs))),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "unblocked_matrices_mib": 4 * m * m * 4 / 2**20,
    }


def large_m_case(m: int = 20_000, block_size: int = 2048, steps: int = 2, method: str = "mtsgd", seed: int = 0) -> dict:
    """Run MT-SGD with the blocked kernel path at large M in a child process; time and peak memory.

    The child process makes the peak resident memory (``peak_rss_mib``) that of
    this case alone. ``unblocked_matrices_mib`` is what the four (M, M) float32
    kernel matrices of the unblocked path would take.
    """
    code = (
        "import json, sys; from mtsgd_jax.experiments.scaling import _large_m_worker; "
        f"print('RESULT' + json.dumps(_large_m_worker({int(m)}, {int(block_size)}, {int(steps)}, {method!r}, {int(seed)})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"large-M run failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT"):])


def plot_scaling(payload: dict, path: str) -> str:
    """Log-log seconds per N steps against M (one line per method) and the ratios; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    sizes = [int(m) for m in results]
    methods = list(next(iter(results.values())))
    steps = payload["config"]["steps"]
    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    style = {
        "mtsgd": dict(color="C0", lw=2.2, marker="o"),
        "moo_svgd": dict(color="C3", lw=2.2, marker="s"),
        "mgda": dict(color="C2", ls="-.", marker="v"),
        "floor": dict(color="k", ls="--", marker="x"),
    }
    for i, method in enumerate(methods):
        st = style.get(method, dict(color=f"C{4 + i % 5}", ls=":", marker="."))
        t = np.array([results[str(m)][method]["median_s"] for m in sizes])
        lo = np.array([min(results[str(m)][method]["run_s"]) for m in sizes])
        hi = np.array([max(results[str(m)][method]["run_s"]) for m in sizes])
        ax.errorbar(sizes, t, yerr=[t - lo, hi - t], label=method, capsize=2, ms=5, **st)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("particles M")
    ax.set_ylabel(f"seconds for {steps} steps (median, [min, max])")
    ax.set_title("toy problem (K = 3, d = 2), whole run in one compiled scan", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    for key, st in (("mtsgd/moo_svgd", style["moo_svgd"]), ("mtsgd/floor", style["floor"])):
        vals = [payload["ratios"][str(m)].get(key) for m in sizes]
        if all(v is not None for v in vals):
            ax_r.plot(sizes, vals, label=key, **st)
    ax_r.axhline(1.0, color="0.4", lw=0.8)
    ax_r.axhline(1.5, color="0.6", lw=0.8, ls=":")
    ax_r.set_xscale("log")
    ax_r.set_xlabel("particles M")
    ax_r.set_ylabel("ratio of medians (same run)")
    ax_r.set_title("MT-SGD relative to MOO-SVGD and to the floor", fontsize=10)
    ax_r.grid(True, which="both", alpha=0.3)
    ax_r.legend(fontsize=8)
    info = payload["machine"]
    fig.suptitle(f"{info['backend']} / {info['device_kind']} ({info['cpu_count']} CPUs), jax {info['jax_version']}, {info['date']}", fontsize=9)
    try:
        report.save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return path


def summary_table(payload: dict) -> str:
    """The per-M table printed at the end of a run (seconds per N steps and the two ratios)."""
    results = payload["results"]
    methods = list(next(iter(results.values())))
    header = ["M"] + [f"{m} (s)" for m in methods] + ["mtsgd/moo_svgd", "mtsgd/floor"]
    rows = []
    for m, row in results.items():
        r = payload["ratios"][m]
        rows.append(
            [m]
            + [f"{row[k]['median_s']:.4f}" for k in methods]
            + [f"{r['mtsgd/moo_svgd']:.2f}" if "mtsgd/moo_svgd" in r else "-", f"{r['mtsgd/floor']:.2f}" if "mtsgd/floor" in r else "-"]
        )
    return report.format_table(header, rows)


def main(
    out: str,
    sizes: Sequence[int] = DEFAULT_SIZES,
    methods: Sequence[str] = METHODS,
    *,
    steps: int = 1000,
    repeats: int = 3,
    seed: int = 0,
    network: bool = True,
    large_m: int = 0,
    block_size: int = 2048,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
) -> dict:
    """Run the whole benchmark, print a summary, write ``scaling.json`` then plot ``scaling.png`` into ``out``.

    Raises:
      mtsgd_jax.experiments.report.PlotError: the figure failed; the JSON is written and kept.
    """
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    payload = {
        "description": "Seconds for `steps` steps of mtsgd_jax.sample on toy_problem() (K = 3, d = 2) with "
        "optax.chain(<method>, optax.adam(3e-2)); every run one compiled lax.scan; medians over round-robin repeats.",
        "config": {"sizes": list(sizes), "methods": list(methods), "steps": steps, "repeats": repeats, "seed": seed},
        "machine": report.machine_info(),
    }
    payload.update(run_scaling(sizes, methods, steps=steps, repeats=repeats, seed=seed, progress=progress))
    print_fn(summary_table(payload))
    if network:
        net = network_case(seed=seed, repeats=repeats)
        payload["network_case"] = net
        print_fn(
            f"\nnetwork-sized case: d = {net['dim']}, M = {net['num_particles']}, K = {net['num_targets']} (per step, median)"
        )
        print_fn(
            report.format_table(
                ["method", "per step (ms)", "compile (s)"],
                [[k, f"{1e3 * v['per_step_s']:.2f}", f"{v['compile_s']:.2f}"] for k, v in net["methods"].items()],
            )
        )
    if large_m:
        big = large_m_case(large_m, block_size, seed=seed)
        payload["large_m_case"] = big
        print_fn(
            f"\nlarge M: M = {big['num_particles']}, block_size = {big['block_size']}: {big['per_step_s']:.2f} s per step, "
            f"peak RSS {big['peak_rss_mib']:.0f} MiB (the unblocked (M, M) matrices alone: {big['unblocked_matrices_mib']:.0f} MiB), "
            f"finite: {big['finite']}"
        )
    payload["machine"]["loadavg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    payload["wall_s"] = time.perf_counter() - start
    js = report.write_json(os.path.join(out, "scaling.json"), payload)
    print_fn(f"\nwrote {js} ({payload['wall_s']:.0f} s)")
    (png,) = report.write_figures([(lambda p: plot_scaling(payload, p), os.path.join(out, "scaling.png"))], results=[js])
    print_fn(f"wrote {png}")
    return payload
