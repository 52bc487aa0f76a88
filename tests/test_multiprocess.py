"""Particles over 2 processes joined by jax.distributed (CPU collectives), 2 host devices each.

Starts tests/_multiprocess_worker.py three times: once as one process with 4
host devices, then as 2 processes with 2 devices each on 127.0.0.1. The
multi-process run of ``sample(mesh=...)`` over the 4 global devices must equal
the single-process one, and the median bandwidth must be the same value
sharded, blocked and unblocked.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_multiprocess_worker.py")
TIMEOUT_S = 240


def _env(devices):
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f)
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(out):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, "multi", out, str(i), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(2),
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:  # on a timeout or failure nothing is left behind
            if p.poll() is None:
                p.kill()
                p.communicate()
    return [p.returncode for p in procs], logs


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    single = str(tmp_path / "single.npz")
    proc = subprocess.run(
        [sys.executable, WORKER, "single", single], capture_output=True, text=True, env=_env(4), timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "median identity ok" in proc.stdout

    multi = str(tmp_path / "multi.npz")
    codes, logs = _run_two_processes(multi)
    assert codes == [0, 0], "\n---\n".join(log[-3000:] for log in logs)

    a, b = np.load(single), np.load(multi)
    # the median bandwidth: integer counts psum-ed across processes, the same value everywhere
    assert np.all(b["h_sharded"] == a["h_plain"][0]) and np.all(a["h_sharded"] == a["h_plain"][0])
    # same program on the same 4 shards; only the order of cross-device sums may differ
    for key in ("particles", "trace_particles", "weights", "ksd"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-10, atol=1e-12, err_msg=key)
    # and both equal the unsharded run
    np.testing.assert_allclose(a["particles"], a["unsharded_particles"], rtol=1e-9, atol=1e-10)
