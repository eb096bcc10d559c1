#!/usr/bin/env bash
# Checks dist/outboxd.service with `systemd-analyze verify`: a misspelt or unknown setting, a
# bad value or a missing section fails the check. systemd only warns about most of these and
# still exits 0, so any line it prints about the unit counts as a failure.
#
# Usage: tools/check-systemd-unit.sh BINARY
#   BINARY is a built outboxd (e.g. target/debug/outboxd): verify insists that ExecStart names an
#   executable file, and the unit's /usr/local/bin/outboxd is not installed here. The unit is
#   checked as a copy whose ExecStart names BINARY; nothing is installed or started.
# Exit status: 0 clean, 1 systemd-analyze found something, 2 usage or systemd-analyze missing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
unit="$root/dist/outboxd.service"

if [[ $# -ne 1 || ! -x "$1" ]]; then
    echo "usage: $0 BINARY (an executable outboxd)" >&2
    exit 2
fi
binary="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-systemd-unit: systemd-analyze not found (Debian package: systemd)" >&2
    exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
grep -q '^ExecStart=/usr/local/bin/outboxd ' "$unit" || {
    echo "check-systemd-unit: $unit has no 'ExecStart=/usr/local/bin/outboxd ...' line" >&2
    exit 1
}
sed "s|^ExecStart=/usr/local/bin/outboxd |ExecStart=$binary |" "$unit" >"$tmp/outboxd.service"

# --man=no: the Documentation= pages are not installed on this machine.
rc=0
out="$(systemd-analyze verify --man=no "$tmp/outboxd.service" 2>&1)" || rc=$?
if [[ $rc -ne 0 || -n "$out" ]]; then
    echo "check-systemd-unit: systemd-analyze verify (exit $rc) on $unit:" >&2
    echo "${out//$tmp\//dist/}" >&2
    exit 1
fi
echo "check-systemd-unit: $unit verified clean ($(systemd-analyze --version | head -n1))"
