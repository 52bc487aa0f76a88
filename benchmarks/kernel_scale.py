"""Kernel work at scale: one MT-SGD step (K = 3, d = 2, float32) up to M = 100,000 particles.

For every M and both bandwidths (the median heuristic and a fixed one), one
jit-compiled ``mtsgd`` update with the default (automatic) row blocks is timed
in its own child process, which reports its time per step and its peak
resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). Beside each
result stands the machine's limit for the kernel sums, from its measured
float32 GEMM and ``exp`` rates at 28 flops and one ``exp`` per ordered pair::

    limit(M) = M^2 (28 / gemm_flops_per_s + 1 / exp_per_s)

and the ratio of the step to it. Cases are run round-robin (median over
repeats), and ``os.getloadavg()`` is recorded before and after each, since the
machine may be shared.

``--compare-root DIR`` also times the same step with another checkout's
``mtsgd_jax`` (e.g. the kernels before a change) at M <= 1,000, interleaved
with this one.

Outputs ``kernel_scale.json`` and ``kernel_scale.png`` in ``--out``::

    python benchmarks/kernel_scale.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOPS_PER_PAIR = 28
FIXED_H = 0.5

_WORKER = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
import jax
jax.config.update("jax_enable_x64", True)  # int64 pair counts (M > 46,341); particles stay float32
import jax.numpy as jnp
import numpy as np
import mtsgd_jax as mj
from mtsgd_jax import kernels
m, bandwidth, reps = {m}, {bandwidth!r}, {reps}
kern = kernels.rbf() if bandwidth == "median" else kernels.rbf({fixed_h})
x = jax.random.normal(jax.random.key(0), (m, 2), jnp.float32)
g = jax.random.normal(jax.random.key(1), (3, m, 2), jnp.float32)
tx = mj.mtsgd(3, kern)
state = tx.init(x)
t0 = time.perf_counter()
step = jax.jit(lambda g, s, x: tx.update(g, s, x)[0]).lower(g, state, x).compile()
compile_s = time.perf_counter() - t0
jax.block_until_ready(step(g, state, x))
times = []
for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(step(g, state, x))
    times.append(time.perf_counter() - t)
print("RESULT" + json.dumps(dict(run_s=times, compile_s=compile_s,
      peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
      block_size=kernels.auto_block_size(m, 2, 6) if hasattr(kernels, "auto_block_size") else None)))
"""


def measure_rates(seconds: float = 2.0) -> dict:
    """float32 GEMM flops/s (2048^2 matmul) and exp/s (sum of exp over 2^24 values), best of repeats."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    x = jax.random.uniform(jax.random.key(1), (1 << 24,), jnp.float32)
    gemm = jax.jit(lambda a: a @ a).lower(a).compile()
    expo = jax.jit(lambda x: jnp.sum(jnp.exp(-x))).lower(x).compile()

    def best(fn, arg):
        jax.block_until_ready(fn(arg))
        out, t_end = [], time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(out) < 3:
            t = time.perf_counter()
            jax.block_until_ready(fn(arg))
            out.append(time.perf_counter() - t)
        return min(out)

    return {"gemm_flops_per_s": 2 * 2048**3 / best(gemm, a), "exp_per_s": (1 << 24) / best(expo, x)}


def limit_s(m: int, rates: dict) -> float:
    """Seconds for M^2 ordered pairs at 28 GEMM-rate flops and one exp each."""
    return m * m * (FLOPS_PER_PAIR / rates["gemm_flops_per_s"] + 1.0 / rates["exp_per_s"])


def run_case(m: int, bandwidth: str, reps: int, root: str = ROOT, timeout: float = 1200) -> dict:
    """One case in a child process (its own peak memory); raises with the child's stderr on failure."""
    code = _WORKER.format(root=root, m=int(m), bandwidth=bandwidth, reps=int(reps), fixed_h=FIXED_H)
    load_before = os.getloadavg()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"M={m} {bandwidth}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT"):])
    out["loadavg_before"], out["loadavg_after"] = list(load_before), list(os.getloadavg())
    return out


def _reps(m: int) -> int:
    return 15 if m <= 1000 else (5 if m <= 5000 else (3 if m <= 20000 else 1))


def run(sizes, rounds: int, compare_root: str | None, compare_max_m: int = 1000) -> dict:
    from mtsgd_jax import report

    rates = measure_rates()
    results: dict = {}
    for r in range(rounds):  # round-robin: a slow phase of a shared machine hits every case alike
        for m in sizes:
            if r > 0 and m > 20000:
                continue
            for bw in ("median", "fixed"):
                variants = [("new", ROOT)]
                if compare_root and m <= compare_max_m:
                    variants.append(("old", compare_root))
                for label, root in variants:
                    res = run_case(m, bw, _reps(m), root)
                    slot = results.setdefault(str(m), {}).setdefault(f"{bw}_{label}", {"run_s": [], "peak_rss_mib": 0.0, "loadavg": []})
                    slot["run_s"] += res["run_s"]
                    slot["peak_rss_mib"] = max(slot["peak_rss_mib"], res["peak_rss_mib"])
                    slot["loadavg"].append([res["loadavg_before"], res["loadavg_after"]])
                    slot["compile_s"] = res["compile_s"]
                    slot["block_size"] = res["block_size"]
                    print(f"round {r} M={m} {bw} {label}: {report.median(res['run_s']):.4g} s/step, "
                          f"peak {res['peak_rss_mib']:.0f} MiB, load {res['loadavg_after'][0]:.1f}", flush=True)
    summary = {}
    for m, cases in results.items():
        lim = limit_s(int(m), rates)
        row = {"limit_s": lim}
        for key, slot in cases.items():
            slot["median_s"] = report.median(slot["run_s"])
            slot["ratio_to_limit"] = slot["median_s"] / lim
        if "median_new" in cases and "fixed_new" in cases:
            row["median/fixed"] = cases["median_new"]["median_s"] / cases["fixed_new"]["median_s"]
        for bw in ("median", "fixed"):
            if f"{bw}_old" in cases:
                row[f"{bw} new/old"] = cases[f"{bw}_new"]["median_s"] / cases[f"{bw}_old"]["median_s"]
        summary[m] = row
    return {
        "config": {"sizes": list(sizes), "K": 3, "d": 2, "dtype": "float32", "fixed_bandwidth": FIXED_H,
                   "flops_per_pair": FLOPS_PER_PAIR, "rounds": rounds, "compare_root": compare_root},
        "rates": rates,
        "results": results,
        "summary": summary,
        "machine": report.machine_info(),
        "loadavg_end": list(os.getloadavg()),
    }


def table(payload: dict) -> str:
    from mtsgd_jax import report

    rates = payload["rates"]
    rows = []
    for m, cases in payload["results"].items():
        s = payload["summary"][m]
        med, fix = cases.get("median_new", {}), cases.get("fixed_new", {})
        rows.append([
            m,
            f"{med.get('median_s', float('nan')):.4g}",
            f"{fix.get('median_s', float('nan')):.4g}",
            f"{s['limit_s']:.3g}",
            f"{med.get('ratio_to_limit', float('nan')):.2f}",
            f"{fix.get('ratio_to_limit', float('nan')):.2f}",
            f"{s.get('median/fixed', float('nan')):.2f}",
            f"{max(med.get('peak_rss_mib', 0), fix.get('peak_rss_mib', 0)):.0f}",
            f"{s.get('median new/old', float('nan')):.2f}" if "median new/old" in s else "-",
            f"{s.get('fixed new/old', float('nan')):.2f}" if "fixed new/old" in s else "-",
        ])
    head = (f"float32 GEMM {rates['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s, exp {rates['exp_per_s'] / 1e9:.2f} G/s; "
            f"limit = M^2 ({FLOPS_PER_PAIR} / GEMM + 1 / exp)\n")
    return head + report.format_table(
        ["M", "median s/step", "fixed s/step", "limit s", "median/limit", "fixed/limit", "median/fixed", "peak MiB",
         "median new/old", "fixed new/old"], rows)


def plot(payload: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtsgd_jax import report

    sizes = [int(m) for m in payload["results"]]
    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    for key, style in (("median_new", dict(color="C0", marker="o")), ("fixed_new", dict(color="C1", marker="s")),
                       ("median_old", dict(color="C0", ls=":", marker=".")), ("fixed_old", dict(color="C1", ls=":", marker="."))):
        pts = [(m, payload["results"][str(m)][key]["median_s"]) for m in sizes if key in payload["results"][str(m)]]
        if pts:
            ax.plot(*zip(*pts), label=key.replace("_new", "").replace("_old", " (before)"), **style)
    ax.plot(sizes, [payload["summary"][str(m)]["limit_s"] for m in sizes], "k--", label="limit (28 flops + 1 exp / pair)")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("particles M"), ax.set_ylabel("seconds per MT-SGD step (K = 3, d = 2, float32)")
    ax.grid(True, which="both", alpha=0.3), ax.legend(fontsize=8)
    for key, style in (("median_new", dict(color="C0", marker="o")), ("fixed_new", dict(color="C1", marker="s"))):
        ax_r.plot(sizes, [payload["results"][str(m)][key]["ratio_to_limit"] for m in sizes], label=key[:-4] + " / limit", **style)
    ax_r.plot(sizes, [payload["summary"][str(m)].get("median/fixed", np.nan) for m in sizes], "k-.", label="median / fixed")
    ax_r.axhline(1.5, color="0.6", lw=0.8, ls=":"), ax_r.axhline(3.0, color="0.6", lw=0.8, ls="--")
    ax_r.set_xscale("log"), ax_r.set_xlabel("particles M"), ax_r.set_ylabel("ratio")
    ax_r.grid(True, which="both", alpha=0.3), ax_r.legend(fontsize=8)
    return report.save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,5000,20000,100000", help="comma-separated particle counts M")
    parser.add_argument("--rounds", type=int, default=2, help="round-robin repeats (M > 20,000 runs once)")
    parser.add_argument("--compare-root", default=None, help="another checkout's root to time at M <= 1,000")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    from mtsgd_jax import report

    payload = run([int(s) for s in args.sizes.split(",")], args.rounds, args.compare_root)
    os.makedirs(args.out, exist_ok=True)
    json_path = report.write_json(os.path.join(args.out, "kernel_scale.json"), payload)
    report.write_figures([(lambda p: plot(payload, p), os.path.join(args.out, "kernel_scale.png"))], results=[json_path])
    print(table(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
