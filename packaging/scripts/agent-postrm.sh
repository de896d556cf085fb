#!/bin/sh
# gpuaas-agent post-remove. The journal (leases, audit outbox) is kept on
# remove and deleted only on purge (deb "purge"; rpm -e keeps it).
set -e
case "$1" in
  purge) rm -rf /var/lib/gpuaas-agent ;;
esac
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
