#!/usr/bin/env bash
# Set everything up in .venv and run the test suite with pytest-xdist workers, one per CPU core this
# process may use (at most 4: each worker holds its own compiled programs, 2-3 GiB); each test module
# stays on one worker, so its tests share its compiled programs. MTSGD_TEST_WORKERS=N overrides
# (0: no workers, everything in this process); extra arguments go to pytest.
source "$(dirname "$0")/_setup.sh" test
WORKERS="${MTSGD_TEST_WORKERS:-$("$VENV/bin/python" -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}"
# Most of the suite's time is XLA compiling many small programs. XLA's older CPU code generator
# (no fusion emitters) at LLVM -O0 compiles them about twice as fast; the programs are the same and
# the results agree up to rounding, which the tests' tolerances cover. MTSGD_TEST_XLA_FLAGS=""
# tests with XLA's default code generator instead (both pass).
TEST_XLA_FLAGS="${MTSGD_TEST_XLA_FLAGS---xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0}"
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$TEST_XLA_FLAGS"
# One compilation cache for the run, shared by the workers (and the processes some tests start):
# a program that several test modules build is compiled once (about 10% of the suite's time).
# A fresh directory per run, removed at exit, so every run is timed from nothing.
JAX_CACHE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/mtsgd-test-jax-cache.XXXXXX")"
trap 'rm -rf "$JAX_CACHE_DIR"' EXIT
export JAX_COMPILATION_CACHE_DIR="$JAX_CACHE_DIR" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
"$VENV/bin/python" -m pytest -n "$WORKERS" --dist loadfile "$@"
