#!/usr/bin/env bash
# Set everything up in .venv and run the test suite.
source "$(dirname "$0")/_setup.sh" test
"$VENV/bin/python" -m pytest "$@"
