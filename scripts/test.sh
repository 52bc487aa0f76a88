#!/usr/bin/env bash
# Set everything up in .venv and run the test suite, one pytest worker per CPU core (pytest-xdist;
# each test module stays on one worker, so its compiled programs are shared by its tests).
# MTSGD_TEST_WORKERS=0 runs in this process; extra arguments go to pytest.
source "$(dirname "$0")/_setup.sh" test
"$VENV/bin/python" -m pytest -n "${MTSGD_TEST_WORKERS:-auto}" --dist loadfile "$@"
