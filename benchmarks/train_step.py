"""Compiled multi-task train steps of particle networks, against the same networks in PyTorch.

Cases (synthetic data of the real shapes):

* ``lenet``: multi-head LeNet, 36x36x1 inputs, batch 256, M = 5 networks, K = 2 tasks;
* ``sarcos``: the SARCOS MLP 21-256-256-256-7, batch 512, M = 5, K = 7;
* ``resnet``: multi-head ResNet-18 (``"imagenet"`` stem), 64x64x3 CelebA-sized
  inputs, K = 40, a small batch and M (``--resnet-batch``, ``--resnet-m``) so
  that it fits this machine's time; batch norm, so the vmapped flax path.

Variants, each ONE jit-compiled :meth:`mtsgd_jax.training.Trainer.step`
(forward pass, per-task gradients, the method's update, Adam):
``mtsgd`` (parameter-space kernel), ``mtsgd_function`` (function-space
kernel), ``mtsgd_split`` (the published recipe's split kernels: latent
features for the encoder, head outputs for each head), ``moo_svgd``, ``mgda``,
``linear_scalarization``; ``mtsgd_plain``: the same MT-SGD step with
``Trainer(fast=False)`` (the flax module vmapped over the networks);
``mtsgd_update``: the MT-SGD transformation alone on given gradients (U, the
QP, the combined direction). Not run unless named in ``--variants``:
``mtsgd_function_separate`` and ``mtsgd_split_separate``, the function / split
steps with the whole-network feature pullback as its own VJP after the K
per-task ones (the trainer's feature cache without ``method_state``; the step
batches that pullback with the per-task cotangents instead). ``torch``: the same networks in
PyTorch, for each network one forward and K backward passes
(``torch.autograd.grad`` per task loss, graph retained), no optimiser.

Method: compile every variant first (compile time recorded apart), one
untimed warm-up call each, then R rounds; every round runs every variant of
every case once, in turn (interleaved), and the medians over rounds are
reported. A variant whose warm-up call took less than 50 ms (the update
alone) runs ``ceil(50 ms / warm-up)`` calls back to back in each round and
counts their mean (``calls_per_round`` in the JSON). ``ms_per_step`` is that median; ``gflops_per_s`` divides the counted
network flops by it: ``M * N * (1 + 2K) * F`` (one forward and K backward
passes of about twice the forward's flops; linear scalarisation: one
backward), with ``F`` the forward flops of one network on one example from
XLA's cost analysis. ``ratio_to_torch`` is the variant's median over the
torch median of the same case and run; ``ratio_to_torch_by_round``: the median
(and range) over rounds of the variant's time over torch's time in the same
round, steadier when the machine's load comes in bursts. ``loadavg_before`` / ``loadavg_after``:
``os.getloadavg()`` around the timed rounds (other processes compete for the
cores; the interleaving makes the ratios fair, not the absolute times).

Threads: both libraries use ``--threads`` threads (default 1): XLA through
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=T``
(set before jax is imported; with T > 1 only the intra-op count is set) and
PyTorch through ``torch.set_num_threads(T)`` and ``torch.set_num_interop_threads(1)``.

Memory: both libraries allocate their large temporaries afresh on every step,
and on Linux each new 4 KiB page costs a page fault (LeNet's compiled step has
about 300 MiB of temporaries, ``xla_temp_mib``). ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >=
2.35, transparent huge pages in "madvise" or "always" mode) makes glibc back
them with 2 MiB pages instead, for both libraries alike; the JSON records the
variable (``glibc_tunables``)::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/train_step.py --cases lenet --rounds 3 \
        --out-name train_step_hugetlb

PyTorch is an optional extra, never installed by CI: ``pip install -e .[bench]``
(``torch==2.13.0``). Without it the JAX variants still run and the torch
columns are empty.

Reproduce (repository root)::

    python benchmarks/train_step.py --rounds 5

Results: ``benchmarks/results/train_step.json`` (every round's times, medians,
compile times, flops, ratios, machine information and load) and
``benchmarks/results/train_step.png`` (``--out-name`` changes the stem).
``xla_temp_mib``: the temporaries XLA allocates for each call of the compiled
step (its memory analysis). ``ratio_to_parameter_kernel``: a kernel-on-features variant's median over the
``mtsgd`` median of the same case and run (``ratio_to_parameter_kernel_by_round``:
per round, as above).

The kernel-space comparison (LeNet; function and split steps against the
parameter step, with and without the batched feature VJP)::

    python benchmarks/train_step.py --cases lenet --rounds 7 --out-name train_step_kernel_space \
        --variants mtsgd,mtsgd_function,mtsgd_split,mtsgd_function_separate,mtsgd_split_separate
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time


def _set_threads(threads: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if threads == 1:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    else:
        flags += f" intra_op_parallelism_threads={threads}"
    os.environ["XLA_FLAGS"] = flags.strip()


MIN_ROUND_S = 0.05  # variants faster than this run several calls per round (see the docstring)
VARIANTS = (
    "mtsgd", "mtsgd_function", "mtsgd_split", "moo_svgd", "mgda", "linear_scalarization", "mtsgd_plain", "mtsgd_update"
)
EXTRA_VARIANTS = ("mtsgd_function_separate", "mtsgd_split_separate")
RESNET_VARIANTS = ("mtsgd", "linear_scalarization")
KERNEL_SPACES = {"mtsgd_function": "function", "mtsgd_split": "split"}


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="threads for XLA and PyTorch alike (default 1)")
    ap.add_argument("--cases", default="lenet,sarcos,resnet", help="comma-separated subset of lenet,sarcos,resnet")
    ap.add_argument(
        "--variants", default=None,
        help=f"comma-separated variants of the LeNet and SARCOS cases (default {','.join(VARIANTS)}; "
        f"also {','.join(EXTRA_VARIANTS)}); the ResNet case runs {','.join(RESNET_VARIANTS)} of them",
    )
    ap.add_argument("--out-name", default="train_step", help="stem of the JSON and PNG written under --out")
    ap.add_argument("--resnet-batch", type=int, default=4)
    ap.add_argument("--resnet-m", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return ap.parse_args(argv)


ARGS = _parse(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None:
    _set_threads(ARGS.threads)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mtsgd_jax.models import MultiHeadLeNet, MultiHeadResNet18, SarcosMLP  # noqa: E402
from mtsgd_jax.report import format_table, machine_info, median, save_figure, write_json  # noqa: E402
from mtsgd_jax.training import ArrayDataset, Task, Trainer, TrainState, build_method  # noqa: E402



def _task(case: str, n: int, rng) -> tuple[Task, np.ndarray, np.ndarray]:
    if case == "lenet":
        x = rng.normal(size=(n, 36, 36, 1)).astype(np.float32)
        y = rng.integers(0, 10, size=(n, 2)).astype(np.int32)
        model, kind, classes, bn = MultiHeadLeNet(), "classification", 10, False
    elif case == "sarcos":
        x = rng.normal(size=(n, 21)).astype(np.float32)
        y = rng.normal(size=(n, 7)).astype(np.float32)
        model, kind, classes, bn = SarcosMLP(), "regression", None, False
    else:
        x = rng.normal(size=(n, 64, 64, 3)).astype(np.float32)
        y = rng.integers(0, 2, size=(n, 40)).astype(np.int32)
        model, kind, classes, bn = MultiHeadResNet18(num_tasks=40, num_classes=2, stem="imagenet"), "classification", 2, True
    task = Task(
        name=case, model=model, kind=kind, task_names=tuple(f"t{i}" for i in range(y.shape[1])), num_classes=classes,
        train_data=ArrayDataset(x, y), eval_data=ArrayDataset(x, y), sample_input=np.zeros((1, *x.shape[1:]), np.float32),
        batch_norm=bn,
    )
    return task, x, y


def _forward_flops(task: Task) -> float:
    """Flops of ONE network's forward pass on ONE example (XLA cost analysis)."""
    kwargs = task.init_kwargs()
    variables = jax.eval_shape(lambda k: task.model.init(k, task.sample_input, **kwargs), jax.random.key(0))

    def fwd(v, x):
        return task.model.apply(v, x, **kwargs)

    cost = jax.jit(fwd).lower(variables, jnp.asarray(task.sample_input)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _separate_feature_vjp_step(trainer: Trainer):
    """:meth:`Trainer.step` with the feature pullback as its own VJP: the feature cache of
    ``_forward_and_grads`` without ``method_state`` (no cotangent guessed, nothing batched)."""

    def step(state, x, y):
        values, grads, new_model_state, cache = trainer._forward_and_grads(state.params, state.model_state, x, y)
        updates, opt_state = trainer.tx.update(
            grads, state.opt_state, state.params, losses=values, inputs=x, model_state=state.model_state,
            feature_cache=cache,
        )
        return TrainState(optax.apply_updates(state.params, updates), new_model_state, opt_state), values

    return jax.jit(step)


def _jax_variants(case, task, x, y, m, names):
    """name -> (compiled callable of no arguments, compile seconds, backward passes)."""
    out = {}
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    for name in names:
        method_name, space, fast = name, "parameter", True
        base = name.removesuffix("_separate")
        if base in KERNEL_SPACES:
            method_name, space = "mtsgd", KERNEL_SPACES[base]
        elif name in ("mtsgd_plain", "mtsgd_update"):
            method_name, fast = "mtsgd", name != "mtsgd_plain"
        method = build_method(task, method_name, m, kernel_space=space)
        trainer = Trainer(task, method, optax.adam(1e-3), batch_size=len(x), fast=fast)
        state = trainer.init(0)
        step = _separate_feature_vjp_step(trainer) if name.endswith("_separate") else trainer.step
        start = time.perf_counter()
        if name == "mtsgd_update":
            values, grads, _ = jax.jit(trainer._losses_and_grads)(state.params, state.model_state, xj, yj)
            opt = method.transform.init(state.params)
            upd = jax.jit(lambda g, s, p, v: method.transform.update(g, s, p, losses=v)[0])
            compiled = upd.lower(grads, opt, state.params, values).compile()
            fn = (lambda c=compiled, a=(grads, opt, state.params, values): c(*a))
            passes = 0
        else:
            compiled = step.lower(state, xj, yj).compile()
            fn = (lambda c=compiled, a=(state, xj, yj): c(*a))
            passes = 1 if method.scalarization is not None else task.num_tasks
        out[name] = (fn, time.perf_counter() - start, passes)
        TEMP_MIB[case, name] = _temp_mib(compiled)
    return out


TEMP_MIB: dict = {}  # (case, variant) -> MiB of temporaries XLA allocates per call of the compiled step


def _temp_mib(compiled) -> float | None:
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # noqa: BLE001 - a backend without memory analysis
        return None


def _torch_step(case, x, y, m, threads):
    """A callable doing one forward and K backward passes of M torch networks, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    import torch.nn as tnn
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    k = y.shape[1]

    class LeNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = tnn.Conv2d(1, 10, 5), tnn.Conv2d(10, 20, 5)
            self.fc, self.heads = tnn.Linear(720, 50), tnn.Linear(50, k * 10)

        def forward(self, t):
            t = F.relu(F.max_pool2d(self.c1(t), 2))
            t = F.relu(F.max_pool2d(self.c2(t), 2))
            return self.heads(F.relu(self.fc(t.flatten(1)))).view(-1, k, 10)

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = tnn.BatchNorm2d(cout)
            self.c2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = tnn.BatchNorm2d(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout))

        def forward(self, t):
            o = self.b2(self.c2(F.relu(self.b1(self.c1(t)))))
            return F.relu(o + (t if self.short is None else self.short(t)))

    class ResNet18(tnn.Module):
        def __init__(self):
            super().__init__()
            self.stem = tnn.Sequential(tnn.Conv2d(3, 64, 7, 2, 3, bias=False), tnn.BatchNorm2d(64), tnn.ReLU(),
                                       tnn.MaxPool2d(3, 2, 1))
            layers, cin = [], 64
            for i, w in enumerate((64, 128, 256, 512)):
                layers += [Block(cin, w, 1 if i == 0 else 2), Block(w, w, 1)]
                cin = w
            self.layers = tnn.Sequential(*layers)
            self.heads = tnn.Linear(512, k * 2)

        def forward(self, t):
            t = self.layers(self.stem(t)).mean(dim=(2, 3))
            return self.heads(t).view(-1, k, 2)

    if case == "lenet":
        nets, xt = [LeNet() for _ in range(m)], torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    elif case == "sarcos":
        nets = [tnn.Sequential(tnn.Linear(21, 256), tnn.ReLU(), tnn.Linear(256, 256), tnn.ReLU(), tnn.Linear(256, 256),
                               tnn.ReLU(), tnn.Linear(256, 7)) for _ in range(m)]
        xt = torch.from_numpy(x)
    else:
        nets, xt = [ResNet18().train() for _ in range(m)], torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y)

    def step():
        for net in nets:
            out = net(xt)
            if case == "sarcos":
                losses = ((out - yt) ** 2).mean(0)
            else:
                losses = torch.stack([F.cross_entropy(out[:, t], yt[:, t].long()) for t in range(k)])
            params = list(net.parameters())
            for t in range(k):
                torch.autograd.grad(losses[t], params, retain_graph=t < k - 1)

    return step


def main(args) -> dict:
    rng = np.random.default_rng(0)
    setup = {"lenet": (256, 5), "sarcos": (512, 5), "resnet": (args.resnet_batch, args.resnet_m)}
    cases = [c for c in args.cases.split(",") if c]
    chosen = VARIANTS if args.variants is None else tuple(v for v in args.variants.split(",") if v)
    unknown = sorted(set(chosen) - set(VARIANTS) - set(EXTRA_VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {VARIANTS + EXTRA_VARIANTS}")
    runs, info = {}, {}
    for case in cases:
        n, m = setup[case]
        task, x, y = _task(case, n, rng)
        names = tuple(v for v in chosen if v in RESNET_VARIANTS) if case == "resnet" else chosen
        fl = _forward_flops(task)
        variants = _jax_variants(case, task, x, y, m, names)
        torch_step = _torch_step(case, x, y, m, args.threads)
        if torch_step is not None:
            start = time.perf_counter()
            torch_step()
            variants["torch"] = (torch_step, time.perf_counter() - start, task.num_tasks)
        for name, (fn, comp, passes) in list(variants.items()):
            start = time.perf_counter()
            jax.block_until_ready(fn())  # warm-up
            # a variant faster than MIN_ROUND_S (the update alone) runs several times per round, so that
            # one round is not one call of a few ms, which a single stall of the machine can multiply
            reps = max(1, math.ceil(MIN_ROUND_S / max(time.perf_counter() - start, 1e-6)))
            variants[name] = (fn, comp, passes, reps)
        runs[case] = variants
        info[case] = {"batch": n, "num_particles": m, "num_tasks": task.num_tasks, "forward_flops_per_example": fl}
        print(f"{case}: compiled {', '.join(variants)}", flush=True)
    if "torch" not in next(iter(runs.values())):
        print("PyTorch not installed: torch columns are empty. Install the extra: pip install -e .[bench]", flush=True)
    times = {c: {v: [] for v in runs[c]} for c in cases}
    load_before = list(os.getloadavg())
    for r in range(args.rounds):
        for case in cases:
            for name, (fn, _, _, reps) in runs[case].items():
                start = time.perf_counter()
                for _ in range(reps):
                    out = fn()
                jax.block_until_ready(out)
                times[case][name].append((time.perf_counter() - start) / reps)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    load_after = list(os.getloadavg())
    results = {}
    for case in cases:
        ci = info[case]
        torch_ms = 1e3 * median(times[case]["torch"]) if "torch" in times[case] else None
        rows = {}
        for name, (fn, comp, passes, reps) in runs[case].items():
            ms = 1e3 * median(times[case][name])
            flops = ci["num_particles"] * ci["batch"] * (1 + 2 * passes) * ci["forward_flops_per_example"] if passes else None
            rows[name] = {
                "ms_per_step": ms,
                "round_ms": [1e3 * t for t in times[case][name]],
                "calls_per_round": reps,
                "compile_s": comp if name != "torch" else None,
                "xla_temp_mib": TEMP_MIB.get((case, name)),
                "counted_gflop": None if flops is None else flops / 1e9,
                "gflops_per_s": None if flops is None else flops / 1e9 / (ms / 1e3),
                "ratio_to_torch": None if torch_ms is None else ms / torch_ms,
                "ratio_to_torch_by_round": _by_round(times[case], name, "torch"),
            }
        base_ms = rows["mtsgd"]["ms_per_step"] if "mtsgd" in rows else None
        if "mtsgd_update" in rows and base_ms:
            rows["mtsgd_update"]["fraction_of_mtsgd_step"] = rows["mtsgd_update"]["ms_per_step"] / base_ms
        for name in rows:
            if name.removesuffix("_separate") in KERNEL_SPACES and base_ms:
                rows[name]["ratio_to_parameter_kernel"] = rows[name]["ms_per_step"] / base_ms
                rows[name]["ratio_to_parameter_kernel_by_round"] = _by_round(times[case], name, "mtsgd")
        if "mtsgd_plain" in rows and base_ms:
            rows["mtsgd_plain"]["ratio_to_fast"] = rows["mtsgd_plain"]["ms_per_step"] / base_ms
        results[case] = {**ci, "variants": rows}
    payload = {
        "benchmark": "train_step",
        "command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:]),
        "threads": args.threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "rounds": args.rounds,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "torch_version": _torch_version(),
        "machine": machine_info(),
        "cases": results,
    }
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, f"{args.out_name}.json"), payload)
    table = []
    for case, res in results.items():
        for name, row in res["variants"].items():
            by_round = row["ratio_to_torch_by_round"]
            table.append([f"{case}/{name}", row["ms_per_step"], row["gflops_per_s"] if row["gflops_per_s"] else "-",
                          row["ratio_to_torch"] if row["ratio_to_torch"] else "-",
                          by_round["median"] if by_round else "-",
                          row.get("ratio_to_parameter_kernel") or "-", row["compile_s"] or "-"])
    print(format_table(["case/variant", "ms/step", "GFLOP/s", "/torch", "/torch by round", "/mtsgd", "compile s"], table))
    print(f"load before {load_before}, after {load_after}")
    _plot(results, os.path.join(args.out, f"{args.out_name}.png"))
    return payload


def _by_round(case_times: dict, name: str, ref: str) -> dict | None:
    """Median, min and max over rounds of ``name``'s time over ``ref``'s time in the SAME round.

    The two ran seconds apart, so a burst of load on the machine that slows one
    round slows both; the ratio of the two medians can pair rounds far apart."""
    if ref not in case_times or name == ref:
        return None
    ratios = [a / b for a, b in zip(case_times[name], case_times[ref])]
    return {"median": median(ratios), "min": min(ratios), "max": max(ratios)}


def _torch_version():
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (case, res) in zip(axes[0], results.items()):
        names = list(res["variants"])
        ms = [res["variants"][n]["ms_per_step"] for n in names]
        colors = ["tab:orange" if n == "torch" else "tab:gray" if n == "mtsgd_plain" else "tab:blue" for n in names]
        ax.barh(names, ms, color=colors)
        ax.set_xscale("log")
        ax.set_xlabel("ms per step (median of interleaved rounds)")
        ax.set_title(f"{case}: N={res['batch']}, M={res['num_particles']}, K={res['num_tasks']}")
        ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main(ARGS)
