#!/usr/bin/env bash
# Install or upgrade llm-proxy as a systemd service on Debian 12+ / Ubuntu 24.04+.
#
#   sudo deploy/install.sh            # from a clone of the repository
#
# Safe to run again: it upgrades the package, refreshes the unit and restarts a running
# service, and never overwrites your configuration or secrets.
#
#   /opt/llm-proxy/venv                  virtualenv (root-owned: the service cannot modify its code)
#   /etc/llm-proxy/proxy.yaml            configuration (from config/production.yaml), root:llm-proxy 0640
#   /etc/llm-proxy/llm-proxy.env         secrets and URLs, root:root 0600
#   /var/lib/llm-proxy                   state: SQLite database, usage spool (systemd StateDirectory)
#   /etc/systemd/system/llm-proxy.service
#   /usr/local/sbin/llm-proxy-admin      runs `llm-proxy ...` as the service does (user, config, secrets)
#
# Environment:
#   LLM_PROXY_SOURCE   what pip installs (default: this repository; or a wheel, or a
#                      git+https://... URL)
set -euo pipefail

SERVICE=llm-proxy
SERVICE_USER=llm-proxy
PREFIX=/opt/llm-proxy
VENV="$PREFIX/venv"
CONF_DIR=/etc/llm-proxy
STATE_DIR=/var/lib/llm-proxy
UNIT_PATH=/etc/systemd/system/$SERVICE.service
ADMIN=/usr/local/sbin/llm-proxy-admin

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
SOURCE="${LLM_PROXY_SOURCE:-$REPO}"

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0)"
command -v apt-get >/dev/null || die "this script is for Debian/Ubuntu (apt-get not found); see deploy/README.md to install by hand"
[ -d /run/systemd/system ] || die "systemd is not running on this machine; use the container image instead (deploy/container)"
for f in "$HERE/systemd/llm-proxy.service" "$HERE/systemd/llm-proxy.env.example" "$REPO/config/production.yaml"; do
    [ -f "$f" ] || die "missing $f: run this script from a clone of the repository"
done

# ---- 1. Python ------------------------------------------------------------------------
say "installing Python (apt)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates >/dev/null
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "llm-proxy needs Python >= 3.11 (Debian 12, Ubuntu 24.04); this system has $(python3 -V 2>&1). Use the container image."

# ---- 2. service user --------------------------------------------------------------------
if ! getent passwd "$SERVICE_USER" >/dev/null; then
    say "creating system user $SERVICE_USER"
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "llm-proxy gateway" "$SERVICE_USER"
fi

# ---- 3. virtualenv and package --------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    install -d -m 0755 -o root -g root "$PREFIX"
    python3 -m venv "$VENV"
fi
say "installing llm-proxy from $SOURCE"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade "$SOURCE"
# The same version number from a newer checkout still replaces the installed code.
"$VENV/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps "$SOURCE"
"$VENV/bin/llm-proxy" --help >/dev/null

# ---- 4. configuration and secrets (never overwritten) -----------------------------------------
install -d -m 0750 -o root -g "$SERVICE_USER" "$CONF_DIR"
if [ ! -e "$CONF_DIR/proxy.yaml" ]; then
    say "installing $CONF_DIR/proxy.yaml"
    install -m 0640 -o root -g "$SERVICE_USER" "$REPO/config/production.yaml" "$CONF_DIR/proxy.yaml"
elif ! cmp -s "$REPO/config/production.yaml" "$CONF_DIR/proxy.yaml"; then
    install -m 0640 -o root -g "$SERVICE_USER" "$REPO/config/production.yaml" "$CONF_DIR/proxy.yaml.dist"
    say "kept your $CONF_DIR/proxy.yaml; the shipped version is in proxy.yaml.dist for comparison"
fi
if [ ! -e "$CONF_DIR/llm-proxy.env" ]; then
    say "installing $CONF_DIR/llm-proxy.env with a new master key"
    install -m 0600 -o root -g root "$HERE/systemd/llm-proxy.env.example" "$CONF_DIR/llm-proxy.env"
    master="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
    sed -i "s/^LLM_PROXY_MASTER_KEY=\$/LLM_PROXY_MASTER_KEY=$master/" "$CONF_DIR/llm-proxy.env"
fi
chown root:root "$CONF_DIR/llm-proxy.env"
chmod 0600 "$CONF_DIR/llm-proxy.env"

# systemd creates and owns the StateDirectory at start; creating it now lets
# llm-proxy-admin (keys create) run before the first start.
install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"

# ---- 5. admin wrapper, unit ---------------------------------------------------------------
cat > "$ADMIN.tmp" <<EOF
#!/bin/sh
# Run an llm-proxy command as the service runs: its user, configuration and secrets.
#   llm-proxy-admin keys create --name alice
#   llm-proxy-admin usage --by key --since 7d
#   llm-proxy-admin check-config
exec systemd-run --quiet --pipe --wait --collect --service-type=exec \\
    -p User=$SERVICE_USER -p Group=$SERVICE_USER -p UMask=0077 \\
    -p EnvironmentFile=$CONF_DIR/llm-proxy.env -p WorkingDirectory=$STATE_DIR \\
    -E LLM_PROXY_CONFIG=$CONF_DIR/proxy.yaml -E LLM_PROXY_LOG_LEVEL=WARNING \\
    $VENV/bin/llm-proxy "\$@"
EOF
install -m 0755 -o root -g root "$ADMIN.tmp" "$ADMIN"
rm -f "$ADMIN.tmp"

say "installing $UNIT_PATH"
install -m 0644 -o root -g root "$HERE/systemd/llm-proxy.service" "$UNIT_PATH"
systemctl daemon-reload
systemctl enable --quiet "$SERVICE.service"

# ---- 6. check, then (re)start a running service ----------------------------------------------
if ! "$ADMIN" check-config >/dev/null; then
    die "the configuration does not load; fix $CONF_DIR/proxy.yaml or $CONF_DIR/llm-proxy.env, then run: $ADMIN check-config"
fi
if systemctl is-active --quiet "$SERVICE.service"; then
    say "restarting $SERVICE (in-flight streams get server.shutdown_grace_s to finish)"
    systemctl restart "$SERVICE.service"
    systemctl is-active --quiet "$SERVICE.service" || die "$SERVICE did not come back; see: journalctl -u $SERVICE -e"
    say "done: $SERVICE upgraded and running"
else
    cat <<EOF
==> installed. Next:
    1. put provider keys (and PostgreSQL / Redis URLs for a scaled setup) in $CONF_DIR/llm-proxy.env
    2. $ADMIN check-config
    3. systemctl start $SERVICE && systemctl status $SERVICE
    4. $ADMIN keys create --name alice      # prints the client key once
    logs: journalctl -u $SERVICE -f
EOF
fi
