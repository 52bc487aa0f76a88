"""``mtsgd train``: train a particle set of networks on a multi-task problem with one method."""

from __future__ import annotations

import argparse
import sys

from mtsgd_jax.cli._common import positive_float, positive_int

# Kept literal (not imported from mtsgd_jax.training) so that ``mtsgd --help`` stays fast.
_TASKS = ("multi-digits", "multi-mnist", "multi-fashion", "multi-fashion-mnist", "sarcos", "celeba")
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
        "batch 64). 'single_task' trains K independent sets of M networks, set k on task k only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", default="multi-digits", choices=_TASKS, help="problem (multi-digits needs no data files)")
    p.add_argument("--method", default="mtsgd", choices=_METHODS, help="training method")
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
    p.add_argument("--kernel-space", default="parameter", choices=("parameter", "function"),
                   help="mtsgd / moo_svgd kernel: on the parameters, or on each network's outputs on the batch")
    p.add_argument("--weighting", default="stein", choices=("stein", "normalized", "score"), help="MT-SGD's weighting")
    p.add_argument("--eval-every", type=positive_int, default=1, help="evaluate every this many epochs")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run ``mtsgd train``; returns the exit status (2 for missing or malformed data)."""
    from mtsgd_jax.data import DataFormatError
    from mtsgd_jax.experiments import _report
    from mtsgd_jax.training import make_task, summary_table, train

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
    trainer, result = train(
        task,
        args.method,
        num_particles=args.num_particles,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        seed=args.seed,
        kernel_space=args.kernel_space,
        out_dir=args.out,
        resume=args.resume,
        progress=args.progress,
        eval_every=args.eval_every,
        method_options={"weighting": args.weighting} if args.method == "mtsgd" else None,
        log=lambda line: print(line, flush=True),
    )
    secs = [rec["seconds"] for rec in result.history]
    payload = {
        "config": {**trainer.config(), "seed": args.seed, "optimizer": args.optimizer or task.defaults.optimizer,
                   "lr": args.lr if args.lr is not None else task.defaults.lr, "epochs": len(result.history)},
        "metrics": result.metrics,
        "epoch_seconds": secs,
    }
    _report.write_json(f"{args.out}/summary.json", payload)
    print()
    print(summary_table(task, result.metrics))
    print(f"\n{len(result.history)} epochs; metrics log {args.out}/metrics.jsonl, checkpoints {args.out}/checkpoints")
    return 0
