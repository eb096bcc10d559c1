#!/usr/bin/env bash
# Runs the benchmark suite: outboxd against Mosquitto, NATS JetStream, Redis Streams and RabbitMQ,
# side by side.
#
#   bench/run.sh                 the full suite (about 15 to 20 minutes on 2 cores); writes
#                                bench/results/latest.json, bench/results/latency.svg and
#                                docs/benchmarks.md
#   bench/run.sh --smoke         about 25 s plus the build: saturation 1 -> 1 at 256 B, once per
#                                system (outboxd, mosquitto, nats, redis over TCP), debug build; writes
#                                nothing in the tree; exits non-zero unless every message arrived
#                                (the CI step). Where tools/pg-cluster.sh finds PostgreSQL, also
#                                outboxd-pg and outboxd-pg3 (about 15 s more: the cluster starts
#                                in 4 s, then one case each); elsewhere it says it leaves them out
#   bench/run.sh --pg            outboxd on PostgreSQL beside sled: outboxd, outboxd-pg (one broker,
#                                primary + synchronous standby) and outboxd-pg3 (three brokers on
#                                one database); saturation 1 -> 1 at 256 B, p99 at 1k and 5k msg/s,
#                                fan-out 1 -> 100, 5 repetitions (each may be replaced with the
#                                driver's own flag, e.g. --reps 3 --rates 2000); writes
#                                bench/results/pg.json and only the section "outboxd on PostgreSQL
#                                beside sled" of docs/benchmarks.md (its prose from
#                                bench/analysis-pg.md); about 15 minutes on 2 cores
#   bench/run.sh ARGS...         extra arguments go to the driver, e.g.
#                                --systems outboxd,nats --workloads saturation --reps 5
#                                (target/release/outboxd-bench --help lists them); --systems
#                                replaces the default list below
#
# Installs the peers from Debian's packages (mosquitto, nats-server, redis-server; rabbitmq-server,
# except for --smoke, which leaves RabbitMQ out; linux-perf to count fsync calls; postgresql for
# --pg) when they are missing and this runs as root with apt-get. Each case starts its broker
# itself, on 127.0.0.1 with a fresh temp data dir, and stops it afterwards (RabbitMQ as a plain
# process with its own epmd, cookie and node name, whatever the package's service does). The PostgreSQL systems run on one cluster per run (tools/pg-cluster.sh, which the
# driver stops at its end, on an error, and on SIGINT or SIGTERM), a fresh database per case.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

smoke=0
pg=0
own_systems=0
# The driver appends repeated list flags, so --pg's defaults go only where the caller gave none.
declare -A own=()
args=()
for a in "$@"; do
    case "$a" in
        --smoke) smoke=1 ;;
        --pg) pg=1 ;;
        --systems | --systems=*) own_systems=1; args+=("$a") ;;
        --workloads* | --sizes* | --rates* | --fanout* | --reps*) own[${a%%=*}]=1; args+=("$a") ;;
        *) args+=("$a") ;;
    esac
done
if (( smoke && pg )); then
    echo "bench: --smoke and --pg are two different runs; pick one" >&2
    exit 2
fi

target=${CARGO_TARGET_DIR:-target}

missing=()
if (( ! pg )); then
    command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
    command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    # The driver runs the start script itself (the one in /usr/sbin switches user).
    if (( ! smoke )) && [[ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]]; then
        missing+=(rabbitmq-server)
    fi
elif ! tools/pg-cluster.sh check >/dev/null 2>&1; then
    missing+=(postgresql)
fi
if (( ! smoke )) && ! command -v perf >/dev/null 2>&1; then
    missing+=(linux-perf)
fi
# The peers over TCP, then over their WebSocket listeners; the smoke run keeps to TCP and leaves
# RabbitMQ out (its node takes about 5 s to start).
if (( smoke )); then
    systems=outboxd,mosquitto,nats,redis
elif (( pg )); then
    systems=outboxd,outboxd-pg,outboxd-pg3
else
    systems=outboxd,mosquitto,nats,redis,rabbitmq,mosquitto-ws,nats-ws
fi
if (( ${#missing[@]} )); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "bench: installing ${missing[*]} from Debian's packages"
        apt-get update -qq
        # The packages' service start fails harmlessly where there is no init system; the
        # harness starts its own instances.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    elif (( smoke )); then
        echo "bench: ${missing[*]} missing and cannot be installed (needs root and apt-get): smoke runs outboxd only"
        systems=outboxd
    else
        echo "bench: ${missing[*]} missing; install them (apt-get install ${missing[*]}) or run as root" >&2
        exit 1
    fi
fi

# 10k idle connections: the broker and the load generator each hold one fd per connection.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The driver appends repeated --systems lists, so the default goes only when none was given.
system_args=()
if (( ! own_systems )); then
    system_args=(--systems "$systems")
fi

if (( smoke )) && (( ! own_systems )); then
    if tools/pg-cluster.sh check >/dev/null 2>&1; then
        system_args=(--systems "$systems,outboxd-pg,outboxd-pg3")
    else
        echo "bench: PostgreSQL not found (tools/pg-cluster.sh check): smoke leaves outboxd-pg and outboxd-pg3 out"
    fi
fi

if (( smoke )); then
    cargo build --locked --bin outboxd
    cargo build --locked -p outboxd-bench
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
    "$target/debug/outboxd-bench" --smoke \
        ${system_args[@]+"${system_args[@]}"} \
        --outboxd-bin "$target/debug/outboxd" \
        --json "$out/smoke.json" \
        --command "bench/run.sh --smoke" \
        ${args[@]+"${args[@]}"}
    exit 0
fi

cargo build --locked --release --bin outboxd
cargo build --locked --release -p outboxd-bench
mkdir -p bench/results
if (( pg )); then
    defaults=()
    [[ -n ${own[--workloads]:-} ]] || defaults+=(--workloads saturation,latency,fanout)
    [[ -n ${own[--sizes]:-} ]] || defaults+=(--sizes 256)
    [[ -n ${own[--rates]:-} ]] || defaults+=(--rates 1000,5000)
    [[ -n ${own[--fanout]:-} ]] || defaults+=(--fanout 100)
    [[ -n ${own[--reps]:-} ]] || defaults+=(--reps 5)
    exec "$target/release/outboxd-bench" \
        ${system_args[@]+"${system_args[@]}"} \
        ${defaults[@]+"${defaults[@]}"} \
        --outboxd-bin "$target/release/outboxd" \
        --json bench/results/pg.json \
        --markdown-section docs/benchmarks.md \
        --pg-analysis bench/analysis-pg.md \
        --command "bench/run.sh${*:+ $*}" \
        ${args[@]+"${args[@]}"}
fi
exec "$target/release/outboxd-bench" \
    ${system_args[@]+"${system_args[@]}"} \
    --outboxd-bin "$target/release/outboxd" \
    --json bench/results/latest.json \
    --svg bench/results/latency.svg \
    --markdown docs/benchmarks.md \
    --analysis bench/analysis.md \
    --command "bench/run.sh${*:+ $*}" \
    ${args[@]+"${args[@]}"}
