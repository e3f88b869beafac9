#!/usr/bin/env bash
# Run every check: setup, lint (ruff), types (mypy), then the test suite.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k window
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -q "$@"
