#!/usr/bin/env bash
# Durability-ordering audit: runs the broker under strace during a publish load and proves that
# every `ok` and `msg` frame it wrote followed an fdatasync covering the publish (durability =
# "fsync": zero violations). Then runs the same load with durability = "relaxed" and requires
# the audit to find violations there, which shows the audit can see them.
#
# Usage: tools/durability-audit.sh [MESSAGES]   (default 2000; needs strace, python3)
# Builds the broker (cargo build --release) unless OUTBOXD_BIN names a binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

n=${1:-2000}
if ! command -v strace >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq strace >/dev/null
    else
        echo "durability-audit: strace is not installed (apt-get install strace)" >&2
        exit 1
    fi
fi
bin=${OUTBOXD_BIN:-}
if [[ -z $bin ]]; then
    cargo build --release --locked --bin outboxd >&2
    bin=target/release/outboxd
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run() { # mode -> exit status of the check
    local mode=$1 dir=$work/$1
    mkdir -p "$dir"
    OUTBOXD_STORAGE__DURABILITY=$mode OUTBOXD_SERVER__ADMIN_LISTEN=127.0.0.1:0 \
        strace -f -ttt -T -xx -s 1000000 -o "$dir/trace" \
        -e trace=read,recvfrom,write,writev,sendto,sendmsg,fdatasync,accept4,close \
        "$bin" serve --listen 127.0.0.1:0 --data "$dir/data" >"$dir/out" 2>"$dir/err" &
    local pid=$!
    local addr=""
    for _ in $(seq 1 200); do
        addr=$(sed -n 's#^outboxd ready: ws://\(.*\)/ws$#\1#p' "$dir/out")
        [[ -n $addr ]] && break
        sleep 0.1
    done
    if [[ -z $addr ]]; then
        echo "durability-audit: the broker did not start:" >&2
        cat "$dir/err" >&2
        kill "$pid" 2>/dev/null || true
        return 1
    fi
    local broker
    broker=$(pgrep -P "$pid" | head -n1)
    python3 tools/strace_audit.py load "$addr" "$n" || { kill -KILL "$broker" 2>/dev/null; return 1; }
    # Stop the broker itself (strace exits with it), so its last writes are in the trace.
    kill -TERM "$broker"
    local rc=0
    wait "$pid" || rc=$?
    if ((rc != 0)); then
        echo "durability-audit: the broker exited with status $rc" >&2
    fi
    echo "durability = \"$mode\":"
    if [[ $mode == fsync ]]; then
        python3 tools/strace_audit.py check "$dir/trace"
    else
        python3 tools/strace_audit.py check "$dir/trace" --expect-violations
    fi
}

run fsync
run relaxed
echo "durability-audit: passed"
