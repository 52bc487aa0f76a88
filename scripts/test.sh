#!/usr/bin/env bash
# Set everything up in .venv and run the test suite with pytest-xdist workers, one per CPU core this
# process may use (at most 4: each worker holds its own compiled programs, 2-3 GiB); each test module
# stays on one worker, so its tests share its compiled programs. MTSGD_TEST_WORKERS=N overrides
# (0: no workers, everything in this process); extra arguments go to pytest.
source "$(dirname "$0")/_setup.sh" test
WORKERS="${MTSGD_TEST_WORKERS:-$("$VENV/bin/python" -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}"
"$VENV/bin/python" -m pytest -n "$WORKERS" --dist loadfile "$@"
