#!/usr/bin/env bash
# Real packet loss for the torture run: the broker runs in its own network namespace behind a
# veth pair, and nftables drops a share of the packets in both directions (`numgen random`).
# TCP retransmits what is dropped, so this tests the broker and the clients against a lossy
# network rather than a proxy that cuts connections (this kernel has no netem).
#
# Usage: tools/netns-loss.sh [LOSS_PERCENT] [-- extra outboxd-torture arguments]
#   default loss 5 %; e.g. tools/netns-loss.sh 10 -- --duration 300 --seed 7
# Needs root, `ip` and `nft` (installed from Debian's packages when missing). Where it cannot
# run (not root, no network namespaces), it says so and exits 0 without testing anything.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

loss=${1:-5}
shift || true
[[ ${1:-} == -- ]] && shift
ns=outboxd-loss
host_if=obxl0
ns_if=obxl1
host_ip=10.77.0.1
ns_ip=10.77.0.2

skip() {
    echo "netns-loss: SKIPPED: $*" >&2
    exit 0
}
[[ $(id -u) == 0 ]] || skip "needs root to create a network namespace"
command -v ip >/dev/null || skip "the ip command is missing (Debian package iproute2)"
if ! command -v nft >/dev/null; then
    apt-get update -qq && apt-get install -y -qq nftables >/dev/null || skip "cannot install nftables"
fi

cleanup() {
    ip netns del "$ns" 2>/dev/null || true
    ip link del "$host_if" 2>/dev/null || true
}
cleanup
trap cleanup EXIT
ip netns add "$ns" || skip "this machine does not allow network namespaces"
ip link add "$host_if" type veth peer name "$ns_if"
ip link set "$ns_if" netns "$ns"
ip addr add "$host_ip/24" dev "$host_if"
ip link set "$host_if" up
ip netns exec "$ns" ip addr add "$ns_ip/24" dev "$ns_if"
ip netns exec "$ns" ip link set "$ns_if" up
ip netns exec "$ns" ip link set lo up
# Drop LOSS % of the packets entering and leaving the namespace's veth (not its loopback).
ip netns exec "$ns" nft -f - <<NFT
table inet outboxd_loss {
    chain input {
        type filter hook input priority 0;
        iifname "$ns_if" numgen random mod 100 < $loss drop
    }
    chain output {
        type filter hook output priority 0;
        oifname "$ns_if" numgen random mod 100 < $loss drop
    }
}
NFT
echo "netns-loss: broker in namespace $ns at $ns_ip, dropping $loss % of packets each way"

bin=${OUTBOXD_BIN_DIR:-target/debug}
if [[ ! -x $bin/outboxd-torture ]]; then
    cargo build --locked --bins >&2
fi
"$bin/outboxd-torture" --broker "$(realpath "$bin/outboxd")" --netns "$ns" --listen "$ns_ip:0" "$@"
