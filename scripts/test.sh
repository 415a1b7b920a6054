#!/usr/bin/env bash
# Install everything the test suite needs (venv, packages, Debian's chromium, PostgreSQL and
# Redis running) and run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# promtool checks deploy/prometheus's alert rules; Debian ships it only with the server.
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# nginx checks config/nginx-cluster.example.conf (nginx -t); the server itself is not wanted.
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || need_apt+=(nginx)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing Debian packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null
    if [[ " ${need_apt[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        # Only promtool is wanted: on a systemd host the package started a server on :9090.
        $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
    if [[ " ${need_apt[*]} " == *" nginx "* ]]; then
        # Only `nginx -t` is wanted: stop the server the package may have started.
        if [ -d /run/systemd/system ]; then
            $SUDO systemctl disable --now nginx >/dev/null 2>&1 || true
        else
            $SUDO /usr/sbin/nginx -s quit >/dev/null 2>&1 || true
        fi
    fi
fi

# The PostgreSQL tests use the server on 127.0.0.1:5432; start it if it is installed but down.
if command -v pg_ctlcluster >/dev/null 2>&1 && ! pg_isready -h 127.0.0.1 -q 2>/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
fi

# The multi-instance limit tests use Redis on 127.0.0.1:6379; start it if installed but down.
if command -v redis-server >/dev/null 2>&1 && ! (redis-cli -h 127.0.0.1 ping >/dev/null 2>&1); then
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,dev]'

export CHATGATEWAY_TEST_OUTPUT="${CHATGATEWAY_TEST_OUTPUT:-$PWD/test-output}"
exec .venv/bin/python -m pytest "$@"
