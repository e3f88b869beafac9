#!/usr/bin/env bash
# Run every check: setup, lint (ruff), layers (import-linter), types (mypy), then the test suite.
# Every tool is called by its path in .venv/bin (or comes from the Debian packages
# scripts/setup.sh installs): nothing here relies on PATH holding the venv.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k window
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check .
echo "== import-linter (the layers of docs/LAYERS.md)"
.venv/bin/lint-imports
echo "== mypy"
.venv/bin/mypy
echo "== simulator (deploy/sim.py: seeded fault schedules on virtual time, every invariant checked)"
.venv/bin/python -m deploy.sim --seeds "${SIM_SEEDS:-10000}" --jobs "${SIM_JOBS:-2}"
echo "== simulator with mutual TLS identities (every call carries its host's certificate; every server authorizes)"
.venv/bin/python -m deploy.sim --seeds "${SIM_TLS_SEEDS:-1000}" --tls --jobs "${SIM_JOBS:-2}"
echo "== simulator, 3 coordinators on an in-memory etcd (deploy/simstore.py: stale leaders, store cuts and pauses), TLS identities"
.venv/bin/python -m deploy.sim --seeds "${SIM_HA_SEEDS:-500}" --coordinators 3 --tls --jobs "${SIM_JOBS:-2}"
echo "== pytest"
.venv/bin/python -m pytest -q "$@"
