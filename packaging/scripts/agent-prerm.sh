#!/bin/sh
# gpuaas-agent pre-remove: on a real removal (deb "remove", rpm 0) stop and
# disable the unit; on an upgrade leave it running for postinst to restart.
set -e
case "$1" in
  remove|0) ;;
  *) exit 0 ;;
esac
if [ -d /run/systemd/system ]; then
  systemctl disable --now gpuaas-agent.service || true
fi
