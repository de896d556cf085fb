#!/bin/sh
# gpuaas-controlplane post-remove. State (the lease store and the audit log)
# is kept on remove and deleted only on purge (deb "purge"; rpm has none:
# rpm -e keeps /var/lib/gpuaas-controlplane). The service user is kept so
# file ownership stays meaningful if the package returns.
set -e
case "$1" in
  purge) rm -rf /var/lib/gpuaas-controlplane ;;
esac
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
