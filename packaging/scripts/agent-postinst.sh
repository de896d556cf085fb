#!/bin/sh
# gpuaas-agent post-install. deb: "configure [old-version]"; rpm: 1
# (install) or 2 (upgrade). Creates the state and runtime directories, then
# enables the unit on first install or restarts it on upgrade (tenant
# containers keep running: the unit has KillMode=process).
set -e
unit=gpuaas-agent.service
upgrade=no
case "$1" in
  configure) [ -n "$2" ] && upgrade=yes ;;
  1) ;;
  2) upgrade=yes ;;
  *) exit 0 ;;
esac

install -d -m 0700 -o root -g root /var/lib/gpuaas-agent
[ -d /etc/gpuaas ] || install -d -m 0750 -o root -g root /etc/gpuaas
chmod 0640 /etc/gpuaas/agent.yaml

if [ -d /run/systemd/system ]; then
  systemd-tmpfiles --create /usr/lib/tmpfiles.d/gpuaas-agent.conf || true
  systemctl daemon-reload
  if [ "$upgrade" = yes ]; then
    systemctl try-restart "$unit"
  else
    systemctl enable "$unit"
  fi
fi
