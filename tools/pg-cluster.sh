#!/usr/bin/env bash
# A throwaway PostgreSQL for the tests that run several outboxd nodes on PostgreSQL: a primary
# and, with --standby, a synchronous standby, each a real server from the machine's packages,
# in a directory the caller gives, on free TCP ports on 127.0.0.1.
# No mocks: the failover tests SIGKILL the primary and promote the standby with the commands below.
#
# The promise the tests lean on is PostgreSQL's: with synchronous_commit = on and
# synchronous_standby_names naming the standby, COMMIT returns only after the standby flushed the
# commit's WAL. So both servers run with fsync = on and synchronous_commit = on, and
# `start --standby` returns only once pg_stat_replication shows the standby as 'sync' (before
# that, a commit might not wait for it). The standby runs with synchronous_standby_names empty:
# once promoted it is alone and must not wait for a standby it does not have. A cancelled wait
# for the standby (statement timeout, pg_cancel_backend, a dropped client) leaves the commit
# visible on the primary without being on the standby: PostgreSQL only warns. Tests must never
# cancel a commit and count it as confirmed.
#
# initdb and pg_basebackup run with --no-sync: their files are fresh, and the cluster has to
# survive killed processes, not a machine crash; the servers themselves fsync every commit.
# Authentication is trust on 127.0.0.1 only and there are no Unix sockets: this is for tests.
# As root, the servers run as the OS user postgres (runuser) and DIR is handed to it.
#
# `selftest` starts a primary and a standby in a temporary directory and checks the above:
# a commit reaches the standby, the standby is 'sync', a commit on the primary waits while the
# standby is stopped (and is cancelled), the restarted standby catches up, and after kill-primary
# and promote every confirmed row is on the promoted standby. About 10 s. .ci/run runs it.
#
# A test runs `tools/pg-cluster.sh start "$tmp" --standby` (with $tmp from mktemp -d), takes the
# URLs from its stdout or from $tmp/cluster.env, drives the servers with the commands below, and
# ends with `tools/pg-cluster.sh stop "$tmp"` and rm -rf "$tmp". `--help` lists the commands.
#
# Exit status: 0 done, 1 failed (the message says why), 2 bad usage, 3 `status` found a server
# that is not running.
set -euo pipefail

prog=tools/pg-cluster.sh
self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/$(basename "${BASH_SOURCE[0]}")"

usage() {
    cat <<EOF
usage: $prog COMMAND ...

  start DIR [--standby]     a primary (and a synchronous standby) in DIR, new or empty; prints
                            "primary URL" (and "standby URL") and writes DIR/cluster.env:
                            PRIMARY_URL, PRIMARY_DATA, PRIMARY_PORT (STANDBY_URL, STANDBY_DATA,
                            STANDBY_PORT), PG_BINDIR
  stop DIR [primary|standby]
                            stops both servers, or one (fast; immediate if fast hangs)
  restart DIR primary|standby
                            starts a server again on its port (stopping it first if it runs);
                            a standby: until the primary reports it 'sync' again
  status DIR                a line a server (running or stopped, pid, port, role) and the
                            primary's replication; exit 3 when a server is not running
  kill-primary DIR          SIGKILL every process of the primary at once, as in a crash
  promote DIR               promotes the standby (pg_ctl promote) and waits until it is done
  check                     prints where PostgreSQL's programs are and their version
  selftest                  starts, checks and removes a cluster in a temporary directory

URLs look like postgres://postgres@127.0.0.1:PORT/postgres (trust auth, no password).
"primary" and "standby" name the servers as started; after promote, status shows their roles.
stop leaves DIR in place (logs: DIR/primary.log, DIR/standby.log); remove it with rm -rf.
Needs PostgreSQL 12 or newer, found in \$PG_BINDIR, \`pg_config --bindir\`,
/usr/lib/postgresql/*/bin or PATH (on Debian 12: apt-get install postgresql-15).
EOF
}

# Seconds to wait for: a server to start, a standby to become 'sync', a fast shutdown before an
# immediate one, processes to go after SIGKILL, one psql command.
START_TIMEOUT_S=60
SYNC_TIMEOUT_S=30
STOP_FAST_TIMEOUT_S=15
GONE_TIMEOUT_S=10
PSQL_TIMEOUT_S=20
# Free ports to try when another program takes the one picked before the server binds it.
PORT_ATTEMPTS=8
# The standby's name: its cluster_name, hence the application_name it replicates under, which
# the primary's synchronous_standby_names names; also its replication slot on the primary.
STANDBY_NAME=standby

# Settings from the caller's environment must not change the cluster or which server psql
# reaches; a server that does not answer must not hang psql.
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGSERVICEFILE PGOPTIONS PGAPPNAME \
    PGTARGETSESSIONATTRS PGSSLMODE PGPASSWORD PGPASSFILE PGDATA PGTZ
export PGCONNECT_TIMEOUT=5

say() { echo "pg-cluster: $*" >&2; }
die() {
    say "$*"
    exit 1
}
usage_error() {
    say "$*"
    echo "run '$prog --help' for the usage" >&2
    exit 2
}

# --- PostgreSQL's programs -------------------------------------------------------------------

pg_tools=(initdb pg_ctl postgres pg_basebackup psql)
BIN=

has_tools() {
    local t
    for t in "${pg_tools[@]}"; do
        [[ -x $1/$t ]] || return 1
    done
}

# Sets BIN to a directory holding all of pg_tools, or fails saying how to install them.
find_bin() {
    local d t
    if [[ -n ${PG_BINDIR:-} ]]; then
        has_tools "$PG_BINDIR" || die "PG_BINDIR=$PG_BINDIR lacks one of: ${pg_tools[*]}"
        BIN=$PG_BINDIR
    else
        local candidates=()
        if command -v pg_config >/dev/null 2>&1 && d=$(pg_config --bindir 2>/dev/null); then
            candidates+=("$d")
        fi
        # The newest installed major version first.
        while IFS= read -r d; do
            candidates+=("$d")
        done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV)
        for t in initdb pg_ctl postgres; do
            if d=$(command -v "$t" 2>/dev/null); then
                candidates+=("$(dirname "$(readlink -f "$d")")")
            fi
        done
        for d in "${candidates[@]}"; do
            if has_tools "$d"; then
                BIN=$d
                break
            fi
        done
        [[ -n $BIN ]] || die "PostgreSQL's programs (${pg_tools[*]}) were not found in" \
            "\$PG_BINDIR, \`pg_config --bindir\`, /usr/lib/postgresql/*/bin or PATH." \
            "Install them (Debian 12, as root: apt-get install postgresql-15) or set PG_BINDIR" \
            "to the directory that holds them."
    fi
    local version major
    version=$("$BIN/postgres" --version 2>/dev/null) || die "$BIN/postgres --version failed"
    major=$(sed -E 's/^[^0-9]*([0-9]+).*/\1/' <<<"$version")
    if ! [[ $major =~ ^[0-9]+$ ]] || ((major < 12)); then
        die "$BIN holds $version; this script needs PostgreSQL 12 or newer (standby.signal)"
    fi
    if ((EUID == 0)); then
        id -u postgres >/dev/null 2>&1 || die "as root, the servers run as the OS user postgres," \
            "which does not exist (Debian's postgresql-15 package creates it); or run as an" \
            "ordinary user"
        command -v runuser >/dev/null 2>&1 || die "as root, runuser (package util-linux) is needed"
    fi
}

# As root, the servers run as the owner of the cluster directory (postgres, given it by start):
# PostgreSQL refuses to run as root.
RUN_AS=
as_owner() {
    if [[ -n $RUN_AS ]]; then
        runuser -u "$RUN_AS" -- "$@"
    else
        "$@"
    fi
}

# One SQL command through psql, its rows unaligned and without headers.
sql() {
    local url=$1
    shift
    timeout "$PSQL_TIMEOUT_S" "$BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -d "$url" -c "$*"
}

url_of() { echo "postgres://postgres@127.0.0.1:$1/postgres"; }

# --- processes -------------------------------------------------------------------------------

# The pid of the postmaster serving DATA, if one runs. A postmaster works in its data directory,
# which tells a live one from a stale postmaster.pid whose pid now names another process (or a
# zombie nobody reaped).
postmaster_of() {
    local data=$1 pid
    [[ -r $data/postmaster.pid ]] || return 1
    read -r pid <"$data/postmaster.pid" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(readlink "/proc/$pid/cwd" 2>/dev/null) == "$data" ]] || return 1
    echo "$pid"
}

children_of() {
    local parent=$1 f line rest state ppid
    for f in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$f" || continue
        rest=${line##*) }
        read -r state ppid _ <<<"$rest"
        if [[ $ppid == "$parent" && $state != Z ]]; then
            f=${f#/proc/}
            echo "${f%/stat}"
        fi
    done
}

alive() {
    local line rest
    read -r line 2>/dev/null <"/proc/$1/stat" || return 1
    rest=${line##*) }
    [[ ${rest%% *} != Z ]]
}

# Waits until none of the given pids is alive.
wait_gone() {
    local deadline=$((SECONDS + GONE_TIMEOUT_S)) pid
    for pid in "$@"; do
        while alive "$pid"; do
            ((SECONDS < deadline)) || return 1
            sleep 0.05
        done
    done
}

# SIGKILL a postmaster and its children at once: stopped first, so that it forks no child
# between the listing and the kill.
kill_server() {
    local pid=$1 kids
    kill -STOP "$pid" 2>/dev/null || true
    mapfile -t kids < <(children_of "$pid")
    kill -KILL "$pid" "${kids[@]}" 2>/dev/null || true
    wait_gone "$pid" "${kids[@]}"
}

# --- servers ---------------------------------------------------------------------------------

# A free TCP port on 127.0.0.1: the kernel picks it (bind to port 0). Another program may take it
# before the server binds it; start_server then tries another.
free_port() {
    local port
    if command -v python3 >/dev/null 2>&1 &&
        port=$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' 2>/dev/null) && [[ $port =~ ^[0-9]+$ ]]; then
        echo "$port"
    else
        echo $((20000 + RANDOM % 12000))
    fi
}

# The settings this script owns live in DATA/pg-cluster.conf, which postgresql.conf includes.
write_conf() {
    local data=$1 name=$2 port=$3 sync_names=$4
    as_owner tee "$data/pg-cluster.conf" >/dev/null <<EOF
# Written by $prog; rewritten when the server is set up.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = ''
cluster_name = '$name'
fsync = on
synchronous_commit = on
full_page_writes = on
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
synchronous_standby_names = '$sync_names'
lc_messages = 'C'
log_line_prefix = '%m [%p] %q%a '
EOF
}

set_port() {
    local conf=$1/pg-cluster.conf
    as_owner sed -i -E "s/^port = [0-9]+$/port = $2/" "$conf"
}

log_size() {
    if [[ -f $1 ]]; then stat -c %s "$1"; else echo 0; fi
}

show_log() {
    local log=$1 from=$2
    [[ -f $log ]] || return 0
    say "last lines of $log:"
    tail -c "+$((from + 1))" "$log" | tail -n 20 | sed 's/^/    /' >&2
}

# Starts the server in DATA and prints its port. With PORT, on that port only; otherwise on a
# free port, another one each time the port turns out taken.
start_server() {
    local name=$1 data=$2 log=$3 fixed_port=${4:-} attempts=$PORT_ATTEMPTS attempt port from out
    [[ -n $fixed_port ]] && attempts=1
    for ((attempt = 1; attempt <= attempts; attempt++)); do
        if [[ -n $fixed_port ]]; then
            port=$fixed_port
        else
            port=$(free_port)
            set_port "$data" "$port"
        fi
        from=$(log_size "$log")
        if out=$(as_owner "$BIN/pg_ctl" start -D "$data" -l "$log" -w -t "$START_TIMEOUT_S" -s 2>&1); then
            echo "$port"
            return 0
        fi
        if [[ -z $fixed_port ]] && tail -c "+$((from + 1))" "$log" 2>/dev/null |
            grep -q -e 'Address already in use' -e 'could not create any TCP/IP sockets'; then
            say "$name: port $port was taken before the server bound it; trying another"
            continue
        fi
        say "$name: the server did not start on port $port: $out"
        show_log "$log" "$from"
        return 1
    done
    say "$name: no free port after $attempts attempts"
    return 1
}

stop_server() {
    local name=$1 data=$2 pid
    if ! pid=$(postmaster_of "$data"); then
        say "$name: not running"
        return 0
    fi
    if as_owner "$BIN/pg_ctl" stop -D "$data" -m fast -w -t "$STOP_FAST_TIMEOUT_S" -s >/dev/null 2>&1; then
        say "$name: stopped"
        return 0
    fi
    say "$name: no fast shutdown within ${STOP_FAST_TIMEOUT_S}s; immediate shutdown"
    if as_owner "$BIN/pg_ctl" stop -D "$data" -m immediate -w -t "$GONE_TIMEOUT_S" -s >/dev/null 2>&1; then
        say "$name: stopped (immediate)"
        return 0
    fi
    if pid=$(postmaster_of "$data"); then
        say "$name: immediate shutdown failed; SIGKILL"
        kill_server "$pid" || {
            say "$name: processes of pid $pid still alive after SIGKILL"
            return 1
        }
    fi
    say "$name: stopped (killed)"
}

# Waits until the primary at URL reports the standby as synchronous: from then on a commit
# returns only after the standby flushed it.
wait_sync() {
    local url=$1 deadline=$((SECONDS + SYNC_TIMEOUT_S)) state=''
    while ((SECONDS < deadline)); do
        state=$(sql "$url" "SELECT sync_state FROM pg_stat_replication
                            WHERE application_name = '$STANDBY_NAME'" 2>/dev/null) || state=
        [[ $state == sync ]] && return 0
        sleep 0.1
    done
    say "the standby was not 'sync' within ${SYNC_TIMEOUT_S}s (sync_state: '${state:-no row}')"
    return 1
}

# --- the cluster directory -------------------------------------------------------------------

DIR=
PRIMARY_URL='' PRIMARY_DATA='' PRIMARY_PORT='' STANDBY_URL='' STANDBY_DATA='' STANDBY_PORT=

# DIR goes into PostgreSQL's settings and cluster.env unquoted.
check_dir_name() {
    [[ $1 =~ ^[A-Za-z0-9._/+-]+$ ]] ||
        usage_error "DIR '$1' may hold only letters, digits and . _ / + -"
}

write_env() {
    local tmp=$DIR/.cluster.env.tmp
    {
        echo "PRIMARY_URL=$PRIMARY_URL"
        echo "PRIMARY_DATA=$PRIMARY_DATA"
        echo "PRIMARY_PORT=$PRIMARY_PORT"
        if [[ -n $STANDBY_DATA ]]; then
            echo "STANDBY_URL=$STANDBY_URL"
            echo "STANDBY_DATA=$STANDBY_DATA"
            echo "STANDBY_PORT=$STANDBY_PORT"
        fi
        echo "PG_BINDIR=$BIN"
    } >"$tmp"
    mv -f "$tmp" "$DIR/cluster.env"
}

# Reads DIR/cluster.env (without running it) and finds PostgreSQL's programs.
load_cluster() {
    check_dir_name "$1"
    [[ -d $1 ]] || die "$1: no such directory"
    DIR=$(cd "$1" && pwd -P)
    [[ -f $DIR/cluster.env ]] ||
        die "$DIR/cluster.env not found: no cluster was started there ($prog start $1)"
    local key value
    while IFS='=' read -r key value; do
        case $key in
            PRIMARY_URL | PRIMARY_DATA | PRIMARY_PORT | STANDBY_URL | STANDBY_DATA | STANDBY_PORT)
                printf -v "$key" '%s' "$value"
                ;;
            # The programs that made the cluster, while they are there.
            PG_BINDIR) [[ -n ${PG_BINDIR:-} ]] || ! has_tools "$value" || PG_BINDIR=$value ;;
        esac
    done <"$DIR/cluster.env"
    [[ -n $PRIMARY_DATA && -n $PRIMARY_PORT ]] || die "$DIR/cluster.env names no primary"
    find_bin
    if ((EUID == 0)); then
        RUN_AS=$(stat -c %U "$DIR")
    fi
    cd /
}

# The data directory of a server named on the command line.
node_data() {
    case $1 in
        primary) echo "$PRIMARY_DATA" ;;
        standby)
            [[ -n $STANDBY_DATA ]] || die "this cluster has no standby (started without --standby)"
            echo "$STANDBY_DATA"
            ;;
        *) usage_error "a server is primary or standby, not '$1'" ;;
    esac
}

# --- commands --------------------------------------------------------------------------------

started=()
start_done=0

start_cleanup() {
    ((start_done)) && return 0
    local data
    for data in "${started[@]}"; do
        stop_server "${data##*/}" "$data" || true
    done
    say "start failed; the servers it started are stopped; logs in $DIR"
}

cmd_start() {
    local dir='' standby=0 arg
    for arg in "$@"; do
        case $arg in
            --standby) standby=1 ;;
            -*) usage_error "start: unknown option $arg" ;;
            *)
                [[ -z $dir ]] || usage_error "start: one DIR only"
                dir=$arg
                ;;
        esac
    done
    [[ -n $dir ]] || usage_error "start: DIR is missing"
    check_dir_name "$dir"
    find_bin
    if [[ -e $dir && ! -d $dir ]]; then
        die "$dir exists and is not a directory"
    fi
    mkdir -p "$dir"
    [[ -z $(ls -A "$dir") ]] || die "$dir is not empty: start needs a new or empty directory" \
        "(remove it, or pick another, e.g. \$(mktemp -d))"
    DIR=$(cd "$dir" && pwd -P)
    check_dir_name "$DIR"
    cd /
    if ((EUID == 0)); then
        chown postgres:postgres "$DIR"
        chmod 700 "$DIR"
        runuser -u postgres -- test -w "$DIR" ||
            die "the OS user postgres cannot reach $DIR: a parent directory is closed to it" \
                "(as a mktemp -d directory is to all but root). Give start the temporary" \
                "directory itself, which it hands to postgres, or a directory under /tmp"
        RUN_AS=postgres
    fi
    trap start_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    local out sync_names=''
    ((standby)) && sync_names=$STANDBY_NAME
    PRIMARY_DATA=$DIR/primary
    say "initdb $PRIMARY_DATA ($("$BIN/postgres" --version))"
    out=$(as_owner "$BIN/initdb" -D "$PRIMARY_DATA" -U postgres -A trust -E UTF8 --locale=C \
        --no-sync 2>&1) || die "initdb failed: $out"
    as_owner tee "$PRIMARY_DATA/pg_hba.conf" >/dev/null <<EOF
# Written by $prog: trust on 127.0.0.1 only, for tests; there are no Unix sockets.
host    all             all             127.0.0.1/32            trust
host    replication     all             127.0.0.1/32            trust
EOF
    echo "include = 'pg-cluster.conf'" | as_owner tee -a "$PRIMARY_DATA/postgresql.conf" >/dev/null
    write_conf "$PRIMARY_DATA" primary 0 "$sync_names"
    started+=("$PRIMARY_DATA")
    PRIMARY_PORT=$(start_server primary "$PRIMARY_DATA" "$DIR/primary.log") || exit 1
    PRIMARY_URL=$(url_of "$PRIMARY_PORT")
    write_env
    say "primary: running on port $PRIMARY_PORT"

    if ((standby)); then
        STANDBY_DATA=$DIR/standby
        # -R writes standby.signal and primary_conninfo, -C -S a replication slot on the primary
        # that keeps the WAL a stopped standby still needs.
        out=$(as_owner "$BIN/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres \
            -D "$STANDBY_DATA" -R -X stream -c fast -C -S "$STANDBY_NAME" --no-sync 2>&1) ||
            die "pg_basebackup failed: $out"
        write_conf "$STANDBY_DATA" "$STANDBY_NAME" 0 ""
        started+=("$STANDBY_DATA")
        STANDBY_PORT=$(start_server standby "$STANDBY_DATA" "$DIR/standby.log") || exit 1
        STANDBY_URL=$(url_of "$STANDBY_PORT")
        write_env
        say "standby: running on port $STANDBY_PORT; waiting until it is 'sync'"
        wait_sync "$PRIMARY_URL" || {
            show_log "$DIR/standby.log" 0
            exit 1
        }
    fi
    start_done=1
    echo "primary $PRIMARY_URL"
    [[ -z $STANDBY_URL ]] || echo "standby $STANDBY_URL"
}

cmd_stop() {
    (($# >= 1 && $# <= 2)) || usage_error "stop: DIR [primary|standby]"
    load_cluster "$1"
    if (($# == 2)); then
        local data
        data=$(node_data "$2")
        stop_server "$2" "$data"
        return
    fi
    local rc=0
    stop_server primary "$PRIMARY_DATA" || rc=1
    if [[ -n $STANDBY_DATA ]]; then
        stop_server standby "$STANDBY_DATA" || rc=1
    fi
    return "$rc"
}

cmd_restart() {
    (($# == 2)) || usage_error "restart: DIR primary|standby"
    load_cluster "$1"
    local name=$2 data port
    data=$(node_data "$name")
    port=$PRIMARY_PORT
    [[ $name == primary ]] || port=$STANDBY_PORT
    stop_server "$name" "$data"
    # After kill-primary the pid file stays; its pid may still be a zombie not yet reaped, which
    # the postmaster would take for a server still running.
    if [[ -e $data/postmaster.pid ]] && ! postmaster_of "$data" >/dev/null; then
        as_owner rm -f "$data/postmaster.pid"
        say "$name: removed its stale postmaster.pid"
    fi
    start_server "$name" "$data" "$DIR/$name.log" "$port" >/dev/null || exit 1
    say "$name: running on port $port"
    if [[ $name == standby ]] && postmaster_of "$PRIMARY_DATA" >/dev/null &&
        [[ $(sql "$PRIMARY_URL" "SELECT pg_is_in_recovery()") == f ]]; then
        say "standby: waiting until it is 'sync'"
        wait_sync "$PRIMARY_URL"
    fi
}

cmd_status() {
    (($# == 1)) || usage_error "status: DIR"
    load_cluster "$1"
    local rc=0 name data port url pid role
    for name in primary standby; do
        data=$PRIMARY_DATA port=$PRIMARY_PORT url=$PRIMARY_URL
        if [[ $name == standby ]]; then
            [[ -n $STANDBY_DATA ]] || continue
            data=$STANDBY_DATA port=$STANDBY_PORT url=$STANDBY_URL
        fi
        if ! pid=$(postmaster_of "$data"); then
            echo "$name stopped port=$port url=$url"
            rc=3
            continue
        fi
        role=$(sql "$url" "SELECT CASE WHEN pg_is_in_recovery() THEN 'standby' ELSE 'primary' END" \
            2>/dev/null) || role=unknown
        echo "$name running pid=$pid port=$port role=$role url=$url"
        if [[ $role == primary ]]; then
            sql "$url" "SELECT 'replication ' || application_name || ' state=' || state ||
                               ' sync_state=' || sync_state
                        FROM pg_stat_replication ORDER BY application_name" 2>/dev/null || true
        fi
    done
    return "$rc"
}

cmd_kill_primary() {
    (($# == 1)) || usage_error "kill-primary: DIR"
    load_cluster "$1"
    local pid
    pid=$(postmaster_of "$PRIMARY_DATA") || die "the primary is not running"
    kill_server "$pid" || die "processes of the primary (postmaster $pid) still alive after SIGKILL"
    say "primary: killed (postmaster $pid and its children, SIGKILL)"
}

cmd_promote() {
    (($# == 1)) || usage_error "promote: DIR"
    load_cluster "$1"
    local data out
    data=$(node_data standby)
    postmaster_of "$data" >/dev/null || die "the standby is not running"
    out=$(as_owner "$BIN/pg_ctl" promote -D "$data" -w -t "$START_TIMEOUT_S" -s 2>&1) ||
        die "pg_ctl promote failed: $out"
    [[ $(sql "$STANDBY_URL" "SELECT pg_is_in_recovery()") == f ]] ||
        die "the standby still reports recovery after pg_ctl promote"
    say "standby: promoted; it takes writes at $STANDBY_URL"
}

cmd_check() {
    (($# == 0)) || usage_error "check takes no arguments"
    find_bin
    echo "bindir $BIN"
    echo "version $("$BIN/postgres" --version)"
}

# --- selftest --------------------------------------------------------------------------------

st_dir=
st_waiter=
st_failed=1

st() { echo "selftest: $*"; }
st_fail() {
    echo "selftest: FAILED: $*" >&2
    exit 1
}

st_cleanup() {
    local rc=$?
    if [[ -n $st_waiter ]] && alive "$st_waiter"; then
        kill "$st_waiter" 2>/dev/null || true
    fi
    if [[ -n $st_dir && -d $st_dir ]]; then
        if ((st_failed)); then
            local log
            for log in "$st_dir"/*.log; do
                [[ -f $log ]] && show_log "$log" 0
            done
        fi
        [[ -f $st_dir/cluster.env ]] && "$self" stop "$st_dir" 2>/dev/null
        rm -rf "$st_dir"
    fi
    ((st_failed)) && echo "selftest: FAILED" >&2
    return "$rc"
}

# Polls SQL at URL until it prints WANT, for up to 10 s.
st_wait_for() {
    local url=$1 want=$2 query=$3 got='' deadline=$((SECONDS + 10))
    while ((SECONDS < deadline)); do
        got=$(sql "$url" "$query" 2>/dev/null) || got=
        [[ $got == "$want" ]] && return 0
        sleep 0.05
    done
    st_fail "waited 10 s for '$query' to give '$want'; last: '$got'"
}

cmd_selftest() {
    (($# == 0)) || usage_error "selftest takes no arguments"
    local t0=$SECONDS out primary standby url got waiter_out pid
    find_bin
    trap st_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    st_dir=$(mktemp -d "${TMPDIR:-/tmp}/pg-cluster-selftest.XXXXXX")
    st "$("$BIN/postgres" --version) in $BIN; cluster in $st_dir"

    out=$("$self" start "$st_dir" --standby) || st_fail "start --standby failed"
    primary=$(sed -n 's/^primary //p' <<<"$out")
    standby=$(sed -n 's/^standby //p' <<<"$out")
    [[ $primary == postgres://* && $standby == postgres://* ]] ||
        st_fail "start printed no primary and standby URLs: $out"
    grep -q "^STANDBY_URL=$standby\$" "$st_dir/cluster.env" ||
        st_fail "cluster.env does not hold the standby's URL"
    st "primary $primary, standby $standby"

    for url in "$primary" "$standby"; do
        got=$(sql "$url" "SELECT current_setting('fsync') || ',' || current_setting('synchronous_commit')")
        [[ $got == on,on ]] || st_fail "$url: fsync,synchronous_commit = $got, not on,on"
    done
    got=$(sql "$primary" "SELECT application_name || ',' || state || ',' || sync_state FROM pg_stat_replication")
    [[ $got == "$STANDBY_NAME,streaming,sync" ]] || st_fail "pg_stat_replication: '$got'"
    st "ok: fsync and synchronous_commit on; pg_stat_replication: $got"

    sql "$primary" "CREATE TABLE selftest (id int PRIMARY KEY, note text)"
    sql "$primary" "INSERT INTO selftest VALUES (1, 'committed')"
    # synchronous_commit = on waits for the standby's flush, not its replay: poll the standby.
    st_wait_for "$standby" committed "SELECT note FROM selftest WHERE id = 1"
    st "ok: a row committed on the primary is on the standby"

    "$self" stop "$st_dir" standby
    waiter_out=$st_dir/waiter.out
    timeout 60 "$BIN/psql" -X -q -v ON_ERROR_STOP=1 \
        -d "$primary?application_name=pg-cluster-selftest-waiter" \
        -c "INSERT INTO selftest VALUES (2, 'waited')" >"$waiter_out" 2>&1 &
    st_waiter=$!
    # Its backend waits for the standby (wait event SyncRep), and the commit does not return.
    st_wait_for "$primary" SyncRep "SELECT wait_event FROM pg_stat_activity
                                    WHERE application_name = 'pg-cluster-selftest-waiter'"
    sleep 2
    alive "$st_waiter" || st_fail "the commit returned with the standby stopped: $(<"$waiter_out")"
    st "ok: with the standby stopped, a commit on the primary waits (SyncRep, no answer in 2 s)"
    pid=$(sql "$primary" "SELECT pid FROM pg_stat_activity
                          WHERE application_name = 'pg-cluster-selftest-waiter'")
    sql "$primary" "SELECT pg_cancel_backend($pid)" >/dev/null
    wait "$st_waiter" || st_fail "psql exited with $? after its wait was cancelled: $(<"$waiter_out")"
    st_waiter=
    # PostgreSQL's known hole: the cancelled commit stays committed on the primary.
    st "cancelled it; psql said: $(grep -m1 WARNING "$waiter_out" || echo '(no warning)')"

    "$self" restart "$st_dir" standby
    st_wait_for "$standby" 2 "SELECT count(*) FROM selftest"
    sql "$primary" "INSERT INTO selftest VALUES (3, 'confirmed')"
    st "ok: the restarted standby is 'sync' again and has caught up; a commit returns"

    "$self" kill-primary "$st_dir"
    if sql "$primary" "SELECT 1" >/dev/null 2>&1; then
        st_fail "the primary still answers after kill-primary"
    fi
    "$self" promote "$st_dir"
    got=$(sql "$standby" "SELECT string_agg(id::text, ',' ORDER BY id) FROM selftest")
    [[ $got == 1,2,3 ]] || st_fail "the promoted standby holds rows $got, not 1,2,3"
    sql "$standby" "INSERT INTO selftest VALUES (4, 'after failover')"
    st "ok: after kill-primary and promote, the standby holds every confirmed row and takes writes"

    "$self" status "$st_dir" >/dev/null && st_fail "status exited 0 with the primary killed"
    "$self" stop "$st_dir"
    out=$("$self" status "$st_dir") && st_fail "status exited 0 after stop"
    ! grep -q running <<<"$out" || st_fail "a server runs after stop: $out"
    st_failed=0
    st "passed in $((SECONDS - t0)) s"
}

# --- main ------------------------------------------------------------------------------------

(($# >= 1)) || {
    usage >&2
    exit 2
}
cmd=$1
shift
for arg in "$@"; do
    [[ $arg == -h || $arg == --help ]] && cmd=--help
done
case $cmd in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    restart) cmd_restart "$@" ;;
    status) cmd_status "$@" ;;
    kill-primary) cmd_kill_primary "$@" ;;
    promote) cmd_promote "$@" ;;
    check) cmd_check "$@" ;;
    selftest) cmd_selftest "$@" ;;
    -h | --help | help) usage ;;
    *) usage_error "unknown command '$cmd'" ;;
esac
