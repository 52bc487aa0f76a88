"""``mtsgd train``: train a particle set of networks on a multi-task problem with one method."""

from __future__ import annotations

import argparse
import sys
import warnings

from mtsgd_jax.cli._common import non_negative_int, positive_float, positive_int, set_requires, spec_checked_by
from mtsgd_jax.transforms import WEIGHTINGS

# Kept literal (not imported from mtsgd_jax.training) so that ``mtsgd --help`` stays fast.
_TASKS = ("multi-digits", "multi-mnist", "multi-mnist-real", "multi-fashion", "multi-fashion-mnist", "sarcos", "celeba")
_METHODS = ("mtsgd", "moo_svgd", "mgda", "linear_scalarization", "pareto_mtl", "single_task")


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an ensemble of networks on a multi-task problem (MT-SGD or a baseline)",
        description="Trains M networks (a particle set) on a multi-task data set with one method, evaluating "
        "per-particle and ensemble accuracy, Brier score and ECE per task (MSE for SARCOS). Writes "
        "metrics.jsonl (one line per epoch), summary.json and orbax checkpoints (checkpoints/) to --out; "
        "--resume continues from the last checkpoint. Defaults of --epochs, --batch-size, --optimizer and "
        "--lr are the task's (Multi-*: SGD 1e-2, batch 256; SARCOS: Adam 1e-4, batch 512; CelebA: Adam 5e-4, "
        "batch 64). 'single_task' trains K independent sets of M networks, set k on task k only. "
        "--resume continues from the newest intact checkpoint (damaged ones are skipped with a warning) and "
        "refuses settings other than the checkpoint's (exit status 2, each difference listed) unless "
        "--allow-changed names them; --epochs may always change. --recipe published trains with the MT-SGD "
        "reference code's recipe (split function-space kernels, one warm-up epoch, SGD with momentum 0.9 at 1e-3).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", default="multi-digits", choices=_TASKS, help="problem (multi-digits needs no data files)")
    p.add_argument(
        "--method", type=_method, default="mtsgd", metavar="METHOD",
        help=f"training method: NAME or NAME:key=value,... with NAME in {{{', '.join(_METHODS)}}}; keys: the "
        "transformation's options (e.g. mtsgd:weighting=score,solver=enumerate; moo_svgd:repulsion=0.5; "
        "mgda:normalize_grads=1; pareto_mtl:warmup_steps=50), linear_scalarization:ls_weights=uniform|spread",
    )
    p.add_argument("--num-particles", type=positive_int, default=5, help="networks M per particle set")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs in all (default: the task's)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="training batch size (default: the task's)")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the task's)")
    p.add_argument("--optimizer", default=None, choices=("sgd", "momentum", "adam"), help="optimiser (default: the task's)")
    p.add_argument("--data-dir", default=None, help="folder of the data files (not needed for multi-digits)")
    p.add_argument("--num-train", type=positive_int, default=None, help="use only this many training examples")
    p.add_argument("--num-eval", type=positive_int, default=None, help="use only this many evaluation examples")
    p.add_argument("--out", default="outputs/train", help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and mini-batch order seed")
    p.add_argument("--kernel-space", default=None, choices=("parameter", "function", "split"),
                   help="mtsgd / moo_svgd kernel: on the parameters, or on each network's outputs on the batch; "
                   "'split' (mtsgd only): encoder MT-SGD with a kernel on latent features, per-head SVGD with a "
                   "kernel on each head's outputs (default: parameter, or the recipe's)")
    p.add_argument("--warmup-epochs", type=non_negative_int, default=None,
                   help="first epochs of linear scalarisation with per-network preferences (i/(M-1), 1-i/(M-1)) "
                   "before the method (default: 0, or the recipe's)")
    p.add_argument("--recipe", default=None, choices=("published",),
                   help="'published': the MT-SGD reference code's network recipe = --kernel-space split, "
                   "--warmup-epochs 1, --optimizer momentum (0.9) --lr 1e-3; "
                   "each can still be given explicitly")
    p.add_argument("--weighting", default=None, choices=WEIGHTINGS,
                   help="MT-SGD's weighting (default stein; the same as --method mtsgd:weighting=...)")
    p.add_argument("--eval-every", type=positive_int, default=1, help="evaluate every this many epochs")
    p.add_argument("--resume", action="store_true", help="continue from the last intact checkpoint in --out")
    p.add_argument("--allow-changed", type=_setting_names, default=(), metavar="SETTINGS",
                   help="with --resume: comma-separated settings that may differ from the checkpoint's "
                   "(e.g. lr,weighting); the requested values apply from the resumed epoch on")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    set_requires(p, requires)
    p.set_defaults(func=run)


def requires(args) -> tuple[str, ...]:
    """Optional modules ``mtsgd train`` imports for these arguments: orbax (checkpoints) and the task's loader's."""
    loader = {"multi-digits": ("sklearn",), "sarcos": ("scipy",), "celeba": ("PIL",)}.get(args.task, ())
    return ("orbax.checkpoint", *loader)


_method = spec_checked_by("mtsgd_jax.training.methods")


def _method_and_options(args) -> tuple[str, dict]:
    """``--method`` and ``--weighting`` -> (make_method name, options); ValueError if they disagree."""
    from mtsgd_jax.training.methods import parse_method

    name, options = parse_method(args.method)
    if name == "mtsgd" and args.weighting is not None:
        if options.setdefault("weighting", args.weighting) != args.weighting:
            raise ValueError(f"--weighting {args.weighting} contradicts --method {args.method}; give the weighting once.")
    return name, options


def _setting_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().replace("-", "_") for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated setting names (e.g. lr,weighting), got {text!r}")
    return names


def _show_damage_warnings(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    from mtsgd_jax.training.checkpoint import CheckpointDamagedWarning

    if issubclass(category, CheckpointDamagedWarning):
        print(f"mtsgd train: warning: {message}", file=sys.stderr, flush=True)
    else:
        _default(message, category, filename, lineno, file, line)


def run(args) -> int:
    """Run ``mtsgd train``; returns the exit status (2 for missing or malformed data, for a checkpoint
    that cannot be resumed: all damaged, or other settings than requested without --allow-changed)."""
    from mtsgd_jax.data import DataFormatError
    from mtsgd_jax import report
    from mtsgd_jax.training import make_task, summary_table, train
    from mtsgd_jax.training.checkpoint import CheckpointDamagedWarning, CheckpointError, StateMismatchError
    from mtsgd_jax.training.trainer import ResumeMismatchError

    try:
        method, method_options = _method_and_options(args)
    except ValueError as e:
        print(f"mtsgd train: {e}", file=sys.stderr)
        return 2
    try:
        task = make_task(args.task, args.data_dir, num_train=args.num_train, num_eval=args.num_eval)
    except FileNotFoundError as e:
        print(f"mtsgd train: data for task {args.task!r} not found:\n{e}", file=sys.stderr)
        return 2
    except DataFormatError as e:
        print(f"mtsgd train: data for task {args.task!r} is malformed:\n{e}", file=sys.stderr)
        return 2
    if args.batch_size is not None and args.batch_size > len(task.train_data):
        print(f"mtsgd train: --batch-size {args.batch_size} exceeds the {len(task.train_data)} training examples.", file=sys.stderr)
        return 2
    print(
        f"task {task.name}: {task.num_tasks} tasks, {len(task.train_data)} train / {len(task.eval_data)} "
        f"{task.eval_name} examples; method {args.method}, M = {args.num_particles}",
        flush=True,
    )
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_damage_warnings
            warnings.simplefilter("always", CheckpointDamagedWarning)
            trainer, result = train(
                task,
                method,
                num_particles=args.num_particles,
                epochs=args.epochs,
                batch_size=args.batch_size,
                optimizer=args.optimizer,
                lr=args.lr,
                seed=args.seed,
                kernel_space=args.kernel_space,
                warmup_epochs=args.warmup_epochs,
                recipe=args.recipe,
                out_dir=args.out,
                resume=args.resume,
                progress=args.progress,
                eval_every=args.eval_every,
                method_options=method_options,
                log=lambda line: print(line, flush=True),
                allow_changed=args.allow_changed if args.resume else (),
            )
    except ResumeMismatchError as e:
        rows = "\n".join(f"  {k}: saved {a!r}, requested {b!r}" for k, (a, b) in e.differences.items())
        print(
            f"mtsgd train: cannot --resume from {args.out}/checkpoints: it was written with other settings:\n{rows}\n"
            f"Request the saved values, or pass --allow-changed {','.join(e.differences)} to continue with the "
            "requested ones.",
            file=sys.stderr,
        )
        return 2
    except (CheckpointError, StateMismatchError) as e:
        print(f"mtsgd train: cannot --resume: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if str(e).startswith("kernel_space='split'") or "warmup_epochs=" in str(e):
            print(f"mtsgd train: {e}", file=sys.stderr)
            return 2
        if not str(e).startswith("allow_changed names unknown settings"):
            raise
        print(f"mtsgd train: --allow-changed: {e}", file=sys.stderr)
        return 2
    secs = [rec["seconds"] for rec in result.history]
    payload = {
        "config": result.config,
        "metrics": result.metrics,
        "epoch_seconds": secs,
    }
    report.write_json(f"{args.out}/summary.json", payload)
    print()
    print(summary_table(task, result.metrics))
    print(f"\n{len(result.history)} epochs; metrics log {args.out}/metrics.jsonl, checkpoints {args.out}/checkpoints")
    return 0
