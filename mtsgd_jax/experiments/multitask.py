"""Multi-task learning on Multi-Digits: MT-SGD against the baselines, several seeds.

Every method of :data:`mtsgd_jax.training.METHODS` trains an ensemble of M
multi-head LeNets (single-task: K sets of M, set k on task k only) on
Multi-Digits (two scikit-learn digits on a 36 x 36 canvas, tasks = the two
labels; no download), with the same data, optimiser, batch size and epochs,
for every seed (seeds change the initialisation and the mini-batch order).
Per method the step is compiled once and reused across seeds.

Reported per method, mean and standard deviation over seeds, on the test
pairs: per-task accuracy (mean over particles, and of the ensemble = mean of
the particles' probabilities), ensemble accuracy averaged over tasks, Brier
score and ECE (10 bins) of the ensemble (averaged over tasks), and seconds per
training epoch (epochs after the first of each run: the first includes
compilation for the first seed).

Outputs (in ``out``): ``multitask.json`` (configuration, per-seed results,
the summary, machine), ``multitask_reliability.png`` (reliability diagrams of
every method's ensemble for the first seed, both tasks pooled; MT-SGD first)
and the markdown table, also printed. ``python examples/multi_digits.py`` runs
the default configuration.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import numpy as np

from mtsgd_jax import report
from mtsgd_jax.training import METHODS, Trainer, build_method, make_optimizer, make_task

__all__ = [
    "DEFAULT_CONFIG",
    "run_multitask",
    "step_timing",
    "summarize",
    "markdown_table",
    "plot_reliability",
    "main",
]

# Sized so that all 6 methods x 3 seeds take about 15 minutes on a 2-core CPU.
DEFAULT_CONFIG = {
    "task": "multi-digits",
    "methods": list(METHODS),
    "seeds": [0, 1, 2],
    "num_particles": 5,
    "epochs": 3,
    "num_train": 1024,
    "num_eval": 500,
    "batch_size": 32,
    "optimizer": "adam",
    "lr": 1e-3,
    "kernel_space": "parameter",
    "data_seed": 0,
}

LABELS = {
    "mtsgd": "MT-SGD",
    "moo_svgd": "MOO-SVGD",
    "mgda": "MGDA",
    "linear_scalarization": "Linear scal.",
    "pareto_mtl": "Pareto MTL",
    "single_task": "Single task",
}


def _ensemble_pooled(trainer: Trainer, outputs: dict) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble probabilities of every task's serving particles, tasks pooled: (K N, C) and labels (K N,)."""
    probs, y = outputs["probs"], outputs["targets"]
    method = trainer.method
    ps, ls = [], []
    for t in range(y.shape[1]):
        parts = np.arange(method.num_particles) if method.assignment is None else np.flatnonzero(method.assignment == t)
        ps.append(probs[parts, :, t, :].mean(axis=0))
        ls.append(y[:, t])
    return np.concatenate(ps).astype(np.float64), np.concatenate(ls).astype(np.int64)


def run_multitask(
    config: dict | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    key_impl: str | None = None,
) -> dict:
    """Train every method for every seed; returns per-seed results and, per method, pooled ensemble outputs.

    ``config`` overrides :data:`DEFAULT_CONFIG` keys. The result holds
    ``config``, ``runs[method][i]`` (seed, final metrics, seconds per epoch)
    and ``reliability[method] = (probs (K N, C), labels (K N,))`` for the first seed.
    """
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    unknown = set(cfg) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown configuration keys {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}.")
    if cfg["epochs"] < 2:
        raise ValueError("epochs must be >= 2 (seconds per epoch exclude each run's first epoch).")
    task = make_task(cfg["task"], num_train=cfg["num_train"], num_eval=cfg["num_eval"], data_seed=cfg["data_seed"])
    runs, reliability, compile_like = {}, {}, {}
    for name in cfg["methods"]:
        method = build_method(task, name, cfg["num_particles"], kernel_space=cfg["kernel_space"])
        trainer = Trainer(task, method, make_optimizer(cfg["optimizer"], cfg["lr"]), batch_size=cfg["batch_size"], key_impl=key_impl)
        runs[name] = []
        for i, seed in enumerate(cfg["seeds"]):
            t0 = time.perf_counter()
            res = trainer.fit(
                cfg["epochs"], seed=seed, progress=progress, eval_every=cfg["epochs"], checkpoint=False, return_outputs=(i == 0)
            )
            wall = time.perf_counter() - t0
            secs = [rec["seconds"] for rec in res.history]
            runs[name].append(
                {
                    "seed": seed,
                    "metrics": res.metrics,
                    "epoch_seconds": secs,
                    "seconds_per_epoch": float(np.mean(secs[1:])),
                    "train_loss": res.history[-1]["train_loss"],
                    "wall_seconds": wall,
                }
            )
            if i == 0:
                reliability[name] = _ensemble_pooled(trainer, res.outputs)
                compile_like[name] = secs[0] - float(np.mean(secs[1:]))
            if log is not None:
                m = res.metrics
                log(
                    f"{name:22s} seed {seed}: ensemble acc {m['ensemble_accuracy']:.4f}  particle acc "
                    f"{m['mean_particle_accuracy']:.4f}  brier {m['brier']:.4f}  ece {m['ece']:.4f}  "
                    f"{np.mean(secs[1:]):.2f} s/epoch  ({wall:.0f} s)"
                )
    return {
        "config": cfg,
        "task_names": list(task.task_names),
        "networks": {n: build_method(task, n, cfg["num_particles"]).num_particles for n in cfg["methods"]},
        "runs": runs,
        "first_epoch_extra_seconds": compile_like,
        "reliability": reliability,
    }


def step_timing(config: dict | None = None, *, repeats: int = 15, key_impl: str | None = None) -> dict:
    """Seconds per compiled train step of every method, measured round-robin (robust on a shared machine).

    Each method's jitted step is compiled first (compile seconds recorded apart); then ``repeats``
    rounds time one step of every method in turn on the same batch, so slow drift of the machine's
    load hits every method alike. Returns ``{method: {"median_s", "min_s", "compile_s", "times"}}``.
    """
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    task = make_task(cfg["task"], num_train=cfg["num_train"], num_eval=cfg["num_eval"], data_seed=cfg["data_seed"])
    x, y = next(task.train_data.batches(cfg["batch_size"], seed=0, epoch=0, drop_last=True))
    runners = {}
    out = {}
    for name in cfg["methods"]:
        method = build_method(task, name, cfg["num_particles"], kernel_space=cfg["kernel_space"])
        tr = Trainer(task, method, make_optimizer(cfg["optimizer"], cfg["lr"]), batch_size=cfg["batch_size"], key_impl=key_impl)
        state = tr.init(0)
        t0 = time.perf_counter()
        compiled = tr.step.lower(state, x, y).compile()
        out[name] = {"compile_s": time.perf_counter() - t0, "times": []}
        jax_block(compiled(state, x, y))
        runners[name] = (compiled, state)
    for _ in range(repeats):
        for name, (compiled, state) in runners.items():
            t0 = time.perf_counter()
            jax_block(compiled(state, x, y))
            out[name]["times"].append(time.perf_counter() - t0)
    for name, d in out.items():
        d["median_s"] = float(np.median(d["times"]))
        d["min_s"] = float(np.min(d["times"]))
    return out


def jax_block(tree):
    import jax

    return jax.block_until_ready(tree)


def _ms(values) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "values": a.tolist()}


def summarize(result: dict) -> dict:
    """Mean and standard deviation over seeds of the reported quantities, per method."""
    out = {}
    for name, runs in result["runs"].items():
        s = {}
        for t in result["task_names"]:
            s[f"particle_accuracy/{t}"] = _ms([r["metrics"]["tasks"][t]["mean_particle_accuracy"] for r in runs])
            s[f"ensemble_accuracy/{t}"] = _ms([r["metrics"]["tasks"][t]["ensemble_accuracy"] for r in runs])
        for key in ("mean_particle_accuracy", "ensemble_accuracy", "brier", "ece", "nll"):
            s[key] = _ms([r["metrics"][key] for r in runs])
        s["seconds_per_epoch"] = _ms([r["seconds_per_epoch"] for r in runs])
        out[name] = s
    return out


def _pm(d: dict, scale: float = 1.0, digits: int = 1) -> str:
    return f"{d['mean'] * scale:.{digits}f} ± {d['std'] * scale:.{digits}f}"


def markdown_table(
    summary: dict, task_names: Sequence[str], networks: dict | None = None, timing: dict | None = None
) -> str:
    """Markdown table: accuracies in %, Brier, ECE, seconds per epoch; mean ± std over seeds.

    With ``timing`` (:func:`step_timing`) a last column gives the round-robin median ms per step.
    """
    t1, t2 = task_names[0], task_names[-1]
    header = (
        f"| method | networks | particle acc {t1} | particle acc {t2} | ensemble acc {t1} | ensemble acc {t2} "
        "| ensemble acc (mean) | Brier | ECE | s / epoch |"
    ) + (" ms / step (round-robin median) |" if timing else "")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if timing else "")]
    for name, s in summary.items():
        lines.append(
            f"| {LABELS.get(name, name)} | {networks.get(name, '') if networks else ''} "
            f"| {_pm(s[f'particle_accuracy/{t1}'], 100)} | {_pm(s[f'particle_accuracy/{t2}'], 100)} "
            f"| {_pm(s[f'ensemble_accuracy/{t1}'], 100)} | {_pm(s[f'ensemble_accuracy/{t2}'], 100)} "
            f"| {_pm(s['ensemble_accuracy'], 100)} | {_pm(s['brier'], 1, 3)} | {_pm(s['ece'], 1, 3)} "
            f"| {_pm(s['seconds_per_epoch'], 1, 2)} |"
            + (f" {1000 * timing[name]['median_s']:.0f} |" if timing and name in timing else (" |" if timing else ""))
        )
    return "\n".join(lines)


def plot_reliability(reliability: dict, path: str, num_bins: int = 10) -> str:
    """One reliability diagram per method (ensemble, tasks pooled), MT-SGD first; saved as PNG."""
    from matplotlib.figure import Figure

    from mtsgd_jax.metrics.calibration import plot_reliability_diagram

    names = sorted(reliability, key=lambda n: (n != "mtsgd", list(LABELS).index(n) if n in LABELS else 99))
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for ax, name in zip(axes, names):
        probs, labels = reliability[name]
        plot_reliability_diagram(probs, labels, num_bins, ax=ax, title=f"{LABELS.get(name, name)} ensemble")
        ax.legend(loc="upper left", fontsize="x-small")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return report.save_figure(fig, path, dpi=80)


def main(
    out: str = "docs/results/multitask",
    config: dict | None = None,
    *,
    progress: bool = True,
    key_impl: str | None = None,
    timing_repeats: int = 15,
) -> dict:
    """Run :func:`run_multitask` (and :func:`step_timing` unless ``timing_repeats`` is 0), write
    ``multitask.json`` and ``multitask_reliability.png`` to ``out``, print the markdown table;
    returns the JSON payload."""
    start = time.perf_counter()
    result = run_multitask(config, progress=progress, key_impl=key_impl)
    timing = step_timing(config, repeats=timing_repeats, key_impl=key_impl) if timing_repeats else None
    summary = summarize(result)
    table = markdown_table(summary, result["task_names"], result["networks"], timing)
    png = os.path.join(out, "multitask_reliability.png")
    payload = {
        "config": result["config"],
        "task_names": result["task_names"],
        "networks": result["networks"],
        "summary": summary,
        "runs": result["runs"],
        "first_epoch_extra_seconds": result["first_epoch_extra_seconds"],
        "step_timing": timing,
        "markdown_table": table,
        "reliability_png": os.path.basename(png),
        "total_seconds": time.perf_counter() - start,
        "machine": report.machine_info(),
    }
    # The results first: a failing figure must not lose them.
    js = report.write_json(os.path.join(out, "multitask.json"), payload)
    print(table)
    print(f"\nwrote {js} ({payload['total_seconds']:.0f} s)")
    report.write_figures([(lambda p: plot_reliability(result["reliability"], p), png)], results=[js])
    print(f"wrote {png}")
    return payload
