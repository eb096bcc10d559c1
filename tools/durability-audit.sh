#!/usr/bin/env bash
# Durability-ordering audit: runs the broker under strace during a publish load and proves that
# every `ok` and `msg` frame it wrote followed an fdatasync covering the publish (durability =
# "fsync": zero violations). Then runs the same load with durability = "relaxed" and requires
# the audit to find violations there, which shows the audit can see them.
#
# With big payloads (--payload-bytes) it checks sled's blob files (blobs/<lsn>, records over a
# quarter of a sled segment, which sled never fsyncs) in three passes:
#   - "fsync" on a data dir the broker creates: it must write no blob file at all (its segments
#     are sized so that no record needs one);
#   - "fsync" on a data dir created with sled's old 512 KiB segments (OUTBOXD_FAULT_SEGMENT_BYTES,
#     the layout of data dirs from before, which the broker still serves): blob files appear,
#     and the blob rule must check at least one and find no violation: each blob file and the
#     blobs directory fsynced before any frame that went out after a log sync that could hold a
#     pointer to the blob (store::blobs);
#   - "relaxed" on 512 KiB segments: the blob rule must find violations; when no sync of sled's
#     log came during the load (a relaxed broker syncs none), it must find the one of a
#     constructed case instead.
# A pass that asks for the blob audit fails when the audit checked no blob file.
#
# Usage: tools/durability-audit.sh [--payload-bytes BYTES] [--ack-delay-ms MS] [MESSAGES]
#   MESSAGES       publishes per pass (default 2000)
#   BYTES          pad each payload to this many bytes of JSON (default: a few bytes, no
#                  padding); 16384 with 300 messages makes blob files on 512 KiB segments.
#                  Also read from OUTBOXD_AUDIT_PAYLOAD_BYTES.
#   MS             the subscriber acks each message this late (default 0, or 5 with BYTES), so
#                  a backlog builds up: full tree leaves, hence blob files that outlive sled's
#                  own periodic log fsync. Also read from OUTBOXD_AUDIT_ACK_DELAY_MS.
# Needs strace and python3. Builds the broker (cargo build --release) unless OUTBOXD_BIN names
# a binary. AUDIT_KEEP=1 keeps the traces and data dirs (the temp dir is named at the start).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() {
    echo "usage: tools/durability-audit.sh [--payload-bytes BYTES] [--ack-delay-ms MS] [MESSAGES]" >&2
    exit 2
}
n=2000
payload=${OUTBOXD_AUDIT_PAYLOAD_BYTES:-}
ack_delay=${OUTBOXD_AUDIT_ACK_DELAY_MS:-}
while (($#)); do
    case $1 in
        --payload-bytes) (($# >= 2)) || usage; payload=$2; shift 2 ;;
        --payload-bytes=*) payload=${1#*=}; shift ;;
        --ack-delay-ms) (($# >= 2)) || usage; ack_delay=$2; shift 2 ;;
        --ack-delay-ms=*) ack_delay=${1#*=}; shift ;;
        -h | --help) usage ;;
        -*) usage ;;
        *) n=$1; shift ;;
    esac
done
[[ $n =~ ^[0-9]+$ ]] || usage
load_args=()
if [[ -n $payload ]]; then
    [[ $payload =~ ^[0-9]+$ ]] || usage
    load_args=(--payload-bytes "$payload")
    ack_delay=${ack_delay:-5}
fi
if [[ -n $ack_delay ]]; then
    [[ $ack_delay =~ ^[0-9]+([.][0-9]+)?$ ]] || usage
    load_args+=(--ack-delay-ms "$ack_delay")
fi
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
trap '[[ -n ${AUDIT_KEEP:-} ]] || rm -rf "$work"' EXIT
[[ -z ${AUDIT_KEEP:-} ]] || echo "audit: keeping the traces in $work"

# Socket reads and writes (the frames), syncs, and what the audit needs to know which file
# each fd names: opens, dups and closes, unlinks, writes to files, and thread creation (threads
# share one fd table). `?` skips calls this architecture does not have.
traced=read,recvfrom,write,writev,sendto,sendmsg,pwrite64,pwritev,fsync,fdatasync,accept4,close
traced+=,openat,?open,?creat,dup,?dup2,dup3,fcntl,?unlink,unlinkat,?rename,?renameat,?renameat2
traced+=,clone,clone3,?fork,?vfork

run() { # mode [layout] -> exit status of the check
    local mode=$1 layout=${2:-default}
    local dir=$work/$mode-$layout
    mkdir -p "$dir"
    # Body log segments of 8 KiB (with the checkpoint every 50 ms): segments fill, are emptied
    # by the acks and are written over as spares during the load, so the audit sees the renames.
    local env=(OUTBOXD_FAULT_BODY_SEGMENT_BYTES=8192)
    if [[ $layout == 512k ]]; then
        # The layout from before: bodies inline in sled's leaves (as before the body log) and
        # sled's old segment size, so leaves of big messages become blob files and the blob
        # rule has something to check.
        env=(OUTBOXD_FAULT_SEGMENT_BYTES=524288 OUTBOXD_FAULT_INLINE_BODIES=1)
    fi
    env ${env[@]+"${env[@]}"} OUTBOXD_STORAGE__DURABILITY=$mode OUTBOXD_SERVER__ADMIN_LISTEN=127.0.0.1:0 \
        strace -f -ttt -T -xx -s 1000000 -o "$dir/trace" \
        -e trace="$traced" \
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
    python3 tools/strace_audit.py load "$addr" "$n" "${load_args[@]}" || {
        kill -KILL "$broker" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        return 1
    }
    # Stop the broker itself (strace exits with it), so its last writes are in the trace.
    kill -TERM "$broker"
    local rc=0
    wait "$pid" || rc=$?
    if ((rc != 0)); then
        echo "durability-audit: the broker exited with status $rc" >&2
    fi
    check_args=()
    if [[ -n $payload ]]; then
        if [[ $layout == 512k ]]; then
            check_args=(--expect-blobs)
        else
            check_args=(--expect-no-blobs)
        fi
    fi
    [[ $mode == relaxed ]] && check_args+=(--expect-violations)
    if [[ $layout == 512k ]]; then
        echo "durability = \"$mode\", data dir with sled's 512 KiB segments (blob files):"
    else
        echo "durability = \"$mode\":"
    fi
    python3 tools/strace_audit.py check "$dir/trace" ${check_args[@]+"${check_args[@]}"}
}

# Every pass runs even when an earlier one fails, so one run shows every result.
status=0
run fsync || status=1
if [[ -n $payload ]]; then
    run fsync 512k || status=1
    run relaxed 512k || status=1
else
    run relaxed || status=1
fi
if ((status != 0)); then
    echo "durability-audit: FAILED" >&2
    exit 1
fi
echo "durability-audit: passed"
