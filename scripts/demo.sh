#!/usr/bin/env bash
# Set everything up in .venv and run the main demo: MT-SGD on the three-target toy problem.
# Writes outputs/toy_three_targets.png.
source "$(dirname "$0")/_setup.sh" examples
"$VENV/bin/python" examples/toy_three_targets.py --out outputs "$@"
