#!/bin/sh
# gpuaas-controlplane post-install. deb: "configure [old-version]"; rpm: 1
# (install) or 2 (upgrade). Creates the service user and state directory,
# then enables the unit on first install or restarts it on upgrade.
set -e
unit=gpuaas-controlplane.service
upgrade=no
case "$1" in
  configure) [ -n "$2" ] && upgrade=yes ;;
  1) ;;
  2) upgrade=yes ;;
  *) exit 0 ;;
esac

if ! getent passwd gpuaas >/dev/null; then
  if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers /usr/lib/sysusers.d/gpuaas-controlplane.conf
  else
    useradd --system --user-group --no-create-home \
      --home-dir /var/lib/gpuaas-controlplane --shell /usr/sbin/nologin gpuaas
  fi
fi
install -d -m 0700 -o gpuaas -g gpuaas /var/lib/gpuaas-controlplane
install -d -m 0750 -o root -g gpuaas /etc/gpuaas
chown root:gpuaas /etc/gpuaas/controlplane.yaml
chmod 0640 /etc/gpuaas/controlplane.yaml

if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  if [ "$upgrade" = yes ]; then
    systemctl try-restart "$unit"
  else
    systemctl enable "$unit"
  fi
fi
