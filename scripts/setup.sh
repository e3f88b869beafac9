#!/usr/bin/env bash
# Set up a development/run environment on a fresh machine:
#   - Debian packages the tests use (when run as root and apt is available)
#   - a virtualenv in .venv with syncrep installed (editable) plus dev tools
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# NBD tests and bench (tests/test_nbd_e2e.py, bench/bench_nbd.py): qemu-img (qemu-utils),
# nbdinfo/nbdcopy (libnbd-bin), fio with its nbd ioengine, nbd-client (kernel /dev/nbdX;
# its test skips where the nbd module is unavailable, e.g. in containers).
# etcd-server: the coordinator's etcd store and election tests (tests/etcd_fixture.py
# starts its own etcd processes; the package's systemd unit is not used).
APT_PACKAGES=(iproute2 iptables qemu-utils libnbd-bin fio nbd-client etcd-server)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    # Another apt/dpkg process (unattended-upgrades, a parallel setup) may hold the
    # locks: wait for them up to APT_LOCK_TIMEOUT_S instead of failing at once.
    # DPkg::Lock::Timeout covers the dpkg frontend lock; `apt-get update` takes the
    # lists lock, which that option does not cover, so it is retried within the same bound.
    lock_timeout_s=${APT_LOCK_TIMEOUT_S:-600}
    deadline=$(( $(date +%s) + lock_timeout_s ))
    until apt-get -o DPkg::Lock::Timeout="$lock_timeout_s" update -qq; do
      if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "setup: apt-get update kept failing for ${lock_timeout_s}s (is another apt process holding its lock?)" >&2
        exit 1
      fi
      echo "setup: apt-get update failed (lock held?), retrying in 5 s" >&2
      sleep 5
    done
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$lock_timeout_s" \
      install -y -qq "${missing[@]}" >/dev/null
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating virtualenv .venv with $($PY --version)"
  $PY -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
echo "setup: installing syncrep and its dev dependencies into .venv"
# PYTHONWARNINGS reaches the isolated build backend: setuptools' generic notice
# about editable installs is not actionable here and would bury real errors.
PYTHONWARNINGS=ignore::UserWarning .venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | grep -v -E '^(WARNING|DEPRECATION)' || true
.venv/bin/python -c 'import syncrep.pb.syncrep_pb2, grpc, pyroaring, google_crc32c' \
  || { echo "setup: installation failed" >&2; exit 1; }
echo "setup: done. Run .venv/bin/syncrep --help"
