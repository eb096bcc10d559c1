#!/usr/bin/env bash
# Two outboxd builds against each other, in alternating runs (A B, then B A, ...), so a noisy
# machine's drift lands on both: saturation 1 -> 1 at 256 B and the p99 at a fixed rate.
#
# Usage: bench/alternate.sh OLD_OUTBOXD NEW_OUTBOXD [PAIRS] [RATE]   (defaults: 8 pairs, 5000)
# Needs target/release/outboxd-bench (cargo build --release -p outboxd-bench). Prints each
# build's median and quartiles, and the ratio new/old of the medians; keeps the runs' JSON in
# a temp dir it names.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
old=$(realpath "$1"); new=$(realpath "$2"); pairs=${3:-8}; rate=${4:-5000}
driver=target/release/outboxd-bench
[[ -x $driver ]] || { echo "alternate: build $driver first (cargo build --release -p outboxd-bench)" >&2; exit 2; }
out=$(mktemp -d)
for i in $(seq 1 "$pairs"); do
    if (( i % 2 )); then order="old new"; else order="new old"; fi
    for which in $order; do
        bin=$old; [[ $which == new ]] && bin=$new
        "$driver" --systems outboxd --workloads saturation,latency --sizes 256 --rates "$rate" \
            --reps 1 --outboxd-bin "$bin" --json "$out/$which-$i.json" > "$out/$which-$i.log" 2>&1
        echo "pair $i/$pairs: $which done"
    done
done
python3 - "$out" <<'PY'
import glob, json, statistics as st, sys
out = sys.argv[1]
def runs(which):
    sat, p99 = [], []
    for f in glob.glob(f"{out}/{which}-*.json"):
        for s in json.load(open(f))["summary"]:
            if s["workload"] == "saturation":
                sat.append(s["delivered_per_s"]["median"])
            elif s["workload"] == "latency":
                p99.append(s["p99_us"]["median"])
    return sat, p99
res = {w: runs(w) for w in ("old", "new")}
for w, (sat, p99) in res.items():
    q = lambda xs: " / ".join(f"{v:.0f}" for v in st.quantiles(xs, n=4))
    print(f"{w}: saturation msg/s (q1 / median / q3) {q(sat)}; p99 µs {q(p99)}")
o, n = res["old"], res["new"]
print(f"new/old: saturation {st.median(n[0]) / st.median(o[0]):.3f}, p99 {st.median(n[1]) / st.median(o[1]):.3f}")
print(f"runs kept in {out}")
PY
