"""Multi-device MT-SGD: per-step time with the particles split over 1, 2, 4, ... devices.

For every device count D (a 1-D mesh over the first D devices) it runs
``sample(prob.log_prob, optax.chain(mtsgd(3, axis_name="particles"), adam), x, N,
mesh=mesh)`` on the toy problem with M particles, AOT-compiled, and reports the
median time per step over R repeats, the compile time, and the largest
difference from the single-device particles (which should be float round-off).
Writes ``sharded.json`` and ``sharded.png`` into ``--out``.

On a machine without several accelerators, ``--host-devices 4`` splits the CPU
into 4 XLA devices (it sets ``XLA_FLAGS=--xla_force_host_platform_device_count``
before jax starts): this checks the recipe end to end, but the devices share
the same cores, so expect no speed-up there. On a multi-GPU/TPU host run it
without ``--host-devices``. Examples::

    python benchmarks/sharded.py --host-devices 4 --sizes 1024 4096 --steps 50
    python benchmarks/sharded.py --sizes 4096 16384 --block-size 2048   # on 4+ GPUs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host-devices", type=int, default=0, help="split the CPU into this many XLA devices (0: use the real devices)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="particle counts M (multiples of every device count)")
    p.add_argument("--steps", type=int, default=50, help="steps N per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--block-size", type=int, default=0, help="row-block size of the kernel interactions (0: unblocked)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.host_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.host_devices}").strip()
    import jax
    import numpy as np
    import optax
    from jax.sharding import Mesh

    import mtsgd_jax as mj
    from mtsgd_jax import report

    devices = jax.devices()
    counts = [d for d in (1, 2, 4, 8, 16, 32) if d <= len(devices)]
    prob = mj.toy_problem()
    block = args.block_size or None
    rows = []
    for m in args.sizes:
        x0 = prob.init_particles(jax.random.key(0), m)
        reference = None
        for d in counts:
            if m % d:
                continue
            mesh = Mesh(np.array(devices[:d]), ("particles",))
            opt = optax.chain(mj.mtsgd(3, axis_name="particles", block_size=block), optax.adam(3e-2))
            xs = mj.shard_particles(x0, mesh)
            start = time.perf_counter()
            out = jax.block_until_ready(mj.sample(prob.log_prob, opt, xs, args.steps, mesh=mesh).particles)
            first = time.perf_counter() - start
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(mj.sample(prob.log_prob, opt, xs, args.steps, mesh=mesh).particles)
                runs.append(time.perf_counter() - start)
            med = statistics.median(runs)
            if reference is None:
                reference = np.asarray(out)
            diff = float(np.max(np.abs(np.asarray(out) - reference)))
            rows.append({"M": m, "devices": d, "per_step_s": med / args.steps, "compile_s": first - med, "run_s": runs, "max_abs_diff_vs_1_device": diff})
            print(f"M={m:6d} devices={d:2d}  {1e3 * med / args.steps:9.3f} ms/step  compile {first - med:5.2f} s  max|diff| vs 1 device {diff:.2e}", flush=True)
    payload = {"config": vars(args), "machine": report.machine_info(), "results": rows}
    os.makedirs(args.out, exist_ok=True)
    path = report.write_json(os.path.join(args.out, "sharded.json"), payload)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for m in args.sizes:
        rs = [r for r in rows if r["M"] == m]
        ax.plot([r["devices"] for r in rs], [1e3 * r["per_step_s"] for r in rs], marker="o", label=f"M = {m}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("devices sharing the particles")
    ax.set_ylabel("ms per step (median)")
    ax.set_title(f"MT-SGD, toy problem, {payload['machine']['device_kind']}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    png = os.path.join(args.out, "sharded.png")
    try:
        report.write_figures([(lambda p: report.save_figure(fig, p, dpi=110), png)], results=[path])
    finally:
        plt.close(fig)
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
