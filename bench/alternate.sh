#!/usr/bin/env bash
# Two outboxd builds against each other, in alternating runs (A B, then B A, ...), so a noisy
# machine's drift lands on both: saturation 1 -> 1 at 256 B (with the bytes written per message,
# the broker's CPU and its CPU per delivered message) and the p50 and p99 at a fixed rate.
#
# Usage: bench/alternate.sh OLD_OUTBOXD NEW_OUTBOXD [PAIRS] [RATE]   (defaults: 8 pairs, 5000)
# SIZE=16384 measures another payload size (default 256); WORKLOADS=saturation leaves out the
# fixed-rate run (default saturation,latency).
# Needs target/release/outboxd-bench (cargo build --release -p outboxd-bench); OLD_DRIVER and
# NEW_DRIVER name two builds of it instead, for a change to the client too. Prints each
# build's median and quartiles, and the ratio new/old of the medians; keeps the runs' JSON in
# a temp dir it names.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
old=$(realpath "$1"); new=$(realpath "$2"); pairs=${3:-8}; rate=${4:-5000}
size=${SIZE:-256}; workloads=${WORKLOADS:-saturation,latency}
driver=target/release/outboxd-bench
old_driver=${OLD_DRIVER:-$driver}; new_driver=${NEW_DRIVER:-$driver}
for d in "$old_driver" "$new_driver"; do
    [[ -x $d ]] || { echo "alternate: build $d first (cargo build --release -p outboxd-bench)" >&2; exit 2; }
done
out=$(mktemp -d)
for i in $(seq 1 "$pairs"); do
    if (( i % 2 )); then order="old new"; else order="new old"; fi
    for which in $order; do
        bin=$old; d=$old_driver; [[ $which == new ]] && { bin=$new; d=$new_driver; }
        "$d" --systems outboxd --workloads "$workloads" --sizes "$size" --rates "$rate" \
            --reps 1 --outboxd-bin "$bin" --json "$out/$which-$i.json" > "$out/$which-$i.log" 2>&1
        echo "pair $i/$pairs: $which done"
    done
done
python3 - "$out" <<'PY'
import glob, json, statistics as st, sys
out = sys.argv[1]
def runs(which):
    m = {"sat": [], "bytes": [], "cpu": [], "cpu_us": [], "p50": [], "p99": []}
    for f in glob.glob(f"{out}/{which}-*.json"):
        for s in json.load(open(f))["summary"]:
            if s["workload"] == "saturation":
                m["sat"].append(s["delivered_per_s"]["median"])
                if s.get("write_bytes_per_delivery"):
                    m["bytes"].append(s["write_bytes_per_delivery"]["median"])
                if s.get("cpu_pct"):
                    m["cpu"].append(s["cpu_pct"]["median"])
                    # A core's µs per second over messages per second: µs per message.
                    m["cpu_us"].append(s["cpu_pct"]["median"] * 1e4 / s["delivered_per_s"]["median"])
            elif s["workload"] == "latency":
                m["p50"].append(s["p50_us"]["median"])
                m["p99"].append(s["p99_us"]["median"])
    return m
res = {w: runs(w) for w in ("old", "new")}
names = {"sat": "saturation msg/s", "bytes": "bytes written/msg (saturation)",
         "cpu": "broker CPU % (saturation)", "cpu_us": "broker CPU µs per message (saturation)",
         "p50": f"p50 µs at the rate", "p99": "p99 µs at the rate"}
for w, m in res.items():
    q = lambda xs: " / ".join(f"{v:.3g}" if v < 100 else f"{v:.0f}" for v in st.quantiles(xs, n=4)) if len(xs) > 1 else "-"
    print(f"{w}: " + "; ".join(f"{names[k]} (q1 / median / q3) {q(v)}" for k, v in m.items()))
o, n = res["old"], res["new"]
print("new/old: " + ", ".join(f"{k} {st.median(n[k]) / st.median(o[k]):.3f}" for k in o if o[k] and n[k]))
print(f"runs kept in {out}")
PY
