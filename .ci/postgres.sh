#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432, for the tests that run MLflow on the
# database production uses (tests/pghelpers.py calls this when nothing answers; tests start it rather
# than skip). Starts an installed but stopped cluster; installs Debian's `postgresql` when it is
# missing and we are root with apt. A cluster this script installs trusts connections from
# 127.0.0.1 only (test machines; never a shared host), like the project's test machines do.
set -euo pipefail
HOST=127.0.0.1
PORT=5432

ready() { command -v pg_isready >/dev/null && pg_isready -q -h "$HOST" -p "$PORT"; }

if ready; then
  exit 0
fi
installed_here=0
if ! ls -d /etc/postgresql/*/main >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "error: PostgreSQL is not installed and cannot be installed here (not root or no apt-get);" \
         "install it and start it on $HOST:$PORT with trust auth for 127.0.0.1" >&2
    exit 1
  fi
  echo "installing postgresql (Debian) for the tracking tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  installed_here=1
fi
version=$(ls /etc/postgresql | sort -V | tail -n 1)
if [ "$installed_here" = 1 ]; then
  # Only a cluster created just now is changed: the tests connect as `postgres` over TCP without a password.
  sed -i '1i host all all 127.0.0.1/32 trust' "/etc/postgresql/$version/main/pg_hba.conf"
fi
pg_ctlcluster --skip-systemctl-redirect "$version" main start || true  # "already running" is fine
for _ in $(seq 1 60); do
  if ready; then
    exit 0
  fi
  sleep 0.5
done
echo "error: PostgreSQL $version did not answer on $HOST:$PORT within 30 s" >&2
exit 1
