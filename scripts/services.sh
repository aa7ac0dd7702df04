#!/usr/bin/env bash
# Makes PostgreSQL (15+) and Redis (7+) reachable on any machine and prints, on stdout only,
#   export DATABASE_URL=...
#   export REDIS_URL=...
#   export REDIS_SERVER_BIN=...        absolute path of redis-server, for tests that spawn their own servers
# so callers can `eval "$(scripts/services.sh)"`. Everything else goes to stderr.
#
#   scripts/services.sh          use DATABASE_URL / REDIS_URL (or the defaults) if they answer; otherwise start
#                                private instances under .services/ (installing the servers if missing; the
#                                redis-server binary is installed even when REDIS_URL answers)
#   scripts/services.sh cluster  print only `export REDIS_CLUSTER_URLS=redis://127.0.0.1:P1,...,redis://...:P3`:
#                                REDIS_CLUSTER_URLS as given if its first node reports cluster_state:ok, else a
#                                private 3-master Redis Cluster under .services/redis-cluster/ (ports from 27001)
#   scripts/services.sh stop     stop the private instances and cluster nodes (never the machine's own services)
#   scripts/services.sh status   say what the private instances and cluster nodes are doing
#
# Running it again reuses the private instances and cluster; when they already answer it takes well under a
# second. A cluster that lost a node or its slots is recreated empty: it holds scratch data only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
STATE="$ROOT/.services"
DEFAULT_DATABASE_URL='postgres://postgres@127.0.0.1:5432/flashsale'
DEFAULT_REDIS_URL='redis://127.0.0.1:6379'
# Private instances prefer these ports: below Linux's ephemeral range, away from the usual 5432/6379.
PG_PORT_BASE=25432
REDIS_PORT_BASE=26379
CLUSTER_PORT_BASE=27001
CLUSTER_BUS_OFFSET=10000 # a cluster node also listens on its port + 10000 (the cluster bus)

# An unexpected failure under set -e would otherwise exit without a word.
set -E
trap 'log "error: unexpected failure (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

# stdout carries the export lines and nothing else: keep it on fd 3 and send every other output to stderr.
exec 3>&1 1>&2

log() { printf 'services: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
is_root() { [ "$(id -u)" -eq 0 ]; }

# Daemons started from here must not inherit fd 3 (the caller's $(...) pipe would never reach EOF and `eval`
# would hang) nor fd 9 (the lock would stay held by the daemon forever).
detached() { "$@"; } </dev/null 3>&- 9>&-

# Bounded wait for commands that could hang on an unreachable host.
with_timeout() {
  local secs=$1
  shift
  if have timeout; then timeout "$secs" "$@"; else "$@"; fi
}

# ---------------------------------------------------------------- URLs

# parse_url URL DEFAULT_PORT: sets U_SCHEME U_AUTH U_PATH U_QUERY U_HOST U_PORT.
parse_url() {
  local re='^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(/[^?#]*)?(\?[^#]*)?$' hostport
  [[ $1 =~ $re ]] || return 1
  U_SCHEME=${BASH_REMATCH[1]} U_AUTH=${BASH_REMATCH[2]} U_PATH=${BASH_REMATCH[3]} U_QUERY=${BASH_REMATCH[4]}
  hostport=${U_AUTH##*@}
  if [[ $hostport == \[* ]]; then # [::1]:5432
    U_HOST=${hostport%%]*}
    U_HOST=${U_HOST#\[}
    U_PORT=${hostport#*]}
    U_PORT=${U_PORT#:}
  else
    U_HOST=${hostport%%:*}
    U_PORT=
    if [[ $hostport == *:* ]]; then U_PORT=${hostport##*:}; fi
  fi
  [ -n "$U_PORT" ] || U_PORT=$2
  [ -n "$U_HOST" ] || U_HOST=127.0.0.1
}

# The same server and credentials, but the `postgres` database: the app's own database may not exist yet.
pg_admin_url() {
  parse_url "$1" 5432 || {
    printf '%s' "$1"
    return
  }
  printf '%s://%s/postgres%s' "$U_SCHEME" "$U_AUTH" "$U_QUERY"
}

# ---------------------------------------------------------------- probes

# shellcheck disable=SC2016 # $0 and $1 belong to the inner bash
tcp_open() { with_timeout 3 bash -c 'exec 4<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null; }

# A PostgreSQL client tool from PATH, else from a server installation (Debian keeps them beside the server).
pg_tool() {
  local d
  if have "$1"; then
    command -v "$1"
    return
  fi
  for d in ${PG_BIN:+"$PG_BIN"} /usr/lib/postgresql/*/bin /usr/pgsql-*/bin; do
    if [ -x "$d/$1" ]; then
      printf '%s\n' "$d/$1"
      return
    fi
  done
  return 1
}

# probe_pg URL: 0 = usable, 1 = nothing answers, 2 = a server answers but refuses a password-less login.
probe_pg() {
  local url=$1 isready psql out
  if isready=$(pg_tool pg_isready); then
    PGCONNECT_TIMEOUT=3 "$isready" -q -t 3 -d "$url" </dev/null >/dev/null 2>&1 || return 1
  else
    parse_url "$url" 5432 || return 1
    tcp_open "$U_HOST" "$U_PORT" || return 1
  fi
  # The app creates its database, so log in to `postgres` to test the credentials. Without psql, trust it.
  psql=$(pg_tool psql) || return 0
  out=$(PGCONNECT_TIMEOUT=3 "$psql" -X -w -A -t -q -d "$(pg_admin_url "$url")" -c 'select 1' </dev/null 2>&1) || {
    log "postgres at ${url%%\?*} answers but refuses the login: ${out%%$'\n'*}"
    return 2
  }
  return 0
}

# probe_redis URL: 0 = usable, 1 = nothing answers, 2 = a server answers but refuses PING (e.g. NOAUTH).
probe_redis() {
  local url=$1 out
  if have redis-cli; then
    out=$(with_timeout 3 redis-cli -u "$url" ping </dev/null 2>&1) || true
    out=${out##*$'\n'} # redis-cli warns first when the URL carries a password
    case $out in
    PONG) return 0 ;;
    '' | *'Could not connect'* | *'Connection refused'*) return 1 ;;
    *)
      if [[ $out == *'onnect'* ]]; then return 1; fi
      log "redis at $url answers but refuses PING: $out"
      return 2
      ;;
    esac
  fi
  parse_url "$url" 6379 || return 1
  # shellcheck disable=SC2016 # $0 and $1 belong to the inner bash
  out=$(with_timeout 3 bash -c 'exec 4<>"/dev/tcp/$0/$1" || exit 1; printf "PING\r\n" >&4; IFS= read -r l <&4; printf %s "$l"' \
    "$U_HOST" "$U_PORT" 2>/dev/null) || return 1
  case $out in
  +PONG*) return 0 ;;
  '') return 1 ;;
  *) return 2 ;;
  esac
}

port_busy() { tcp_open 127.0.0.1 "$1"; }

# pick_port PREFERRED BASE [OFFSET]: the preferred port if nothing listens there, else the first quiet port from
# BASE. With OFFSET, the port + OFFSET must be quiet too (a cluster node's bus port).
pick_port() {
  local p off=${3:-}
  if [ -n "$1" ] && ! port_busy "$1" && { [ -z "$off" ] || ! port_busy $(($1 + off)); }; then
    echo "$1"
    return
  fi
  for ((p = $2; p < $2 + 200; p++)); do
    if ! port_busy "$p" && { [ -z "$off" ] || ! port_busy $((p + off)); }; then
      echo "$p"
      return
    fi
  done
  die "no free port in $2..$(($2 + 199))"
}

# pid_is PID NAME: the process exists and is NAME (a pid file can outlive its process and the pid be reused).
pid_is() {
  local comm
  [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 1
  if [ -r "/proc/$1/comm" ]; then
    # A killed daemon stays a zombie until its reaper gets to it: that is gone too.
    case $(cat "/proc/$1/stat" 2>/dev/null) in *') Z '* | *') X '*) return 1 ;; esac
    comm=$(cat "/proc/$1/comm" 2>/dev/null) || return 1
  elif have ps; then
    comm=$(ps -o comm= -p "$1" 2>/dev/null) || return 1
  else
    return 0
  fi
  [[ $comm == *"$2"* ]]
}

wait_gone() { # PID SECONDS
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- installing

# Whether install_servers can work here: apt-get, and root or password-less sudo.
can_install() { have apt-get && { is_root || { have sudo && sudo -n true 2>/dev/null; }; }; }

# install_servers pg|redis...: one apt-get update, then one apt-get install of what is missing.
install_servers() {
  local sudo=() aptlog="$STATE/apt.log" pkgs=() what
  have apt-get || die "no apt-get here; install the PostgreSQL 15+ server (initdb, pg_ctl) and redis-server 7+ yourself"
  if ! is_root; then
    if have sudo && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      die "need root or password-less sudo to install $*; install PostgreSQL 15+ and Redis 7+ yourself"
    fi
  fi
  # The log file, not our stderr: package scripts may start daemons that would hold a caller's pipe open.
  log "apt-get update (log: $aptlog)"
  # One unreachable third-party repository fails `update` but need not stop the install: warn and go on.
  detached ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive \
    apt-get -o DPkg::Lock::Timeout=300 update >"$aptlog" 2>&1 || {
    tail -n 5 "$aptlog" >&2
    log "warning: apt-get update failed; trying the install anyway"
  }
  for what in "$@"; do
    case $what in
    pg) pkgs+=("$(apt_pg_package)") ;;
    redis) pkgs+=(redis-server) ;; # depends on redis-tools, which brings redis-cli
    redis-cli) pkgs+=(redis-tools) ;;
    esac
  done
  log "apt-get install ${pkgs[*]} (log: $aptlog)"
  detached ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive \
    apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "${pkgs[@]}" >>"$aptlog" 2>&1 || {
    tail -n 20 "$aptlog" >&2
    die "apt-get install ${pkgs[*]} failed"
  }
  hash -r
  if have initdb; then INITDB_DIR=$(dirname "$(command -v initdb)"); fi
}

# The newest PostgreSQL apt offers if it is 15 or later (Ubuntu 22.04's default is 14), else `postgresql`.
apt_pg_package() {
  local v
  for v in 18 17 16 15; do
    if apt-cache show --no-all-versions "postgresql-$v" >/dev/null 2>&1; then
      echo "postgresql-$v"
      return
    fi
  done
  echo postgresql
}

pg_major_of() { "$1/initdb" --version 2>/dev/null | sed -n 's/.*(PostgreSQL) \([0-9][0-9]*\).*/\1/p'; }

# find_pg_bin [MAJOR]: sets PG_BIN/PG_MAJOR to the directory holding initdb + pg_ctl, the newest one, or the
# given major version (an existing data directory only starts with the version that created it).
find_pg_bin() {
  local want=${1:-} d m
  PG_BIN='' PG_MAJOR=0
  for d in ${INITDB_DIR:+"$INITDB_DIR"} /usr/lib/postgresql/*/bin /usr/pgsql-*/bin \
    /opt/homebrew/opt/postgresql@*/bin /usr/local/opt/postgresql@*/bin; do
    if [ ! -x "$d/initdb" ] || [ ! -x "$d/pg_ctl" ]; then continue; fi
    m=$(pg_major_of "$d" || true)
    [ -n "$m" ] || continue
    if [ -n "$want" ]; then
      if [ "$m" = "$want" ]; then
        PG_BIN=$d PG_MAJOR=$m
        return 0
      fi
    elif [ "$m" -gt "$PG_MAJOR" ]; then
      PG_BIN=$d PG_MAJOR=$m
    fi
  done
  [ -n "$PG_BIN" ]
}
INITDB_DIR=
if have initdb; then INITDB_DIR=$(dirname "$(command -v initdb)"); fi

# ---------------------------------------------------------------- private PostgreSQL

# initdb refuses to run as root, so as root the server runs as the `postgres` system user.
as_pg() {
  if ! is_root; then
    "$@"
  elif have runuser; then
    (cd / && runuser -u postgres -- "$@")
  else
    (cd / && su -s /bin/sh postgres -c "$(printf '%q ' "$@")")
  fi
}

ensure_pg_user() {
  is_root || return 0
  id postgres >/dev/null 2>&1 && return 0
  log "creating the system user postgres (initdb refuses to run as root)"
  if have useradd; then
    if grep -q '^postgres:' /etc/group 2>/dev/null; then
      useradd --system -g postgres --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin postgres
    else
      useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin postgres
    fi
  elif have adduser; then
    adduser -S -D -H -h /nonexistent -s /sbin/nologin postgres # busybox
  else
    die "no useradd/adduser to create the postgres user"
  fi
}

PG_TMP_HOME="${TMPDIR:-/tmp}/flashsale-pg-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)"

# Where the private server lives: .services/pg, unless the postgres user cannot reach it (a checkout under a
# private home) or the path is too long for a unix socket (108 bytes); then a folder under /tmp named after
# this checkout.
choose_pg_home() {
  PG_HOME=$STATE/pg
  if [ -d "$PG_HOME/data" ]; then return; fi
  if [ -d "$PG_TMP_HOME/data" ]; then
    PG_HOME=$PG_TMP_HOME
    return
  fi
  [ "${1:-}" = create ] || return 0
  if [ $((${#PG_HOME} + 22)) -le 107 ]; then
    mkdir -p "$PG_HOME"
    if is_root; then
      chmod 0755 "$STATE"
      chown postgres "$PG_HOME"
      if as_pg test -w "$PG_HOME" 2>/dev/null; then return 0; fi
    else
      return 0
    fi
    rmdir "$PG_HOME" 2>/dev/null || true
  fi
  PG_HOME=$PG_TMP_HOME
  log "the postgres user cannot use $STATE/pg; using $PG_HOME"
  mkdir -p "$PG_HOME"
  chmod 0700 "$PG_HOME"
  if is_root; then chown postgres "$PG_HOME"; fi
}

# The private server's pid and port, read from its postmaster.pid (lines 1 and 4).
pg_pid() { sed -n 1p "$PG_HOME/data/postmaster.pid" 2>/dev/null || true; }
pg_running_port() { sed -n 4p "$PG_HOME/data/postmaster.pid" 2>/dev/null || true; }

pg_answers_on() { # PORT
  local isready
  if isready=$(pg_tool pg_isready); then
    "$isready" -q -t 3 -h 127.0.0.1 -p "$1" </dev/null >/dev/null 2>&1
  else
    tcp_open 127.0.0.1 "$1"
  fi
}

# Sets PG_PORT if the private server already runs; removes the pid file of one that is gone.
pg_reuse() {
  local pid port i
  [ -f "$PG_HOME/data/postmaster.pid" ] || return 1
  pid=$(pg_pid)
  if ! pid_is "$pid" postgres; then
    return 1 # pg_start clears what it left behind
  fi
  for ((i = 0; i < 100; i++)); do # it may still be starting
    port=$(pg_running_port)
    if [ -n "$port" ] && pg_answers_on "$port"; then
      PG_PORT=$port
      return 0
    fi
    sleep 0.1
  done
  die "private postgres (pid $pid) runs but does not answer; see $PG_HOME/postgres.log, or run: $0 stop"
}

# A server that died without shutting down leaves postmaster.pid and the socket's lock file; postgres refuses to
# start while the pid in them is alive, and a zombie or a reused pid looks alive to it.
pg_clear_stale() {
  local f pid
  for f in "$PG_HOME/data/postmaster.pid" "$PG_HOME"/.s.PGSQL.*.lock; do
    [ -f "$f" ] || continue
    pid=$(sed -n 1p "$f" 2>/dev/null || true)
    if ! pid_is "$pid" postgres; then
      log "removing stale $(basename "$f") (pid ${pid:-?} is no postgres of ours)"
      rm -f "$f"
      case $f in *.lock) rm -f "${f%.lock}" ;; esac
    fi
  done
}

pg_start() {
  local data=$PG_HOME/data port attempt
  pg_clear_stale
  if [ -f "$data/PG_VERSION" ]; then
    find_pg_bin "$(cat "$data/PG_VERSION")" ||
      die "$data was made by PostgreSQL $(cat "$data/PG_VERSION"), which is not installed; remove $PG_HOME to start afresh"
  else
    rm -rf "$data" # an initdb that was interrupted
    log "initdb $data (PostgreSQL $PG_MAJOR, trust auth)"
    as_pg "$PG_BIN/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 --locale=C \
      >"$PG_HOME/initdb.log" 2>&1 || {
      tail -n 20 "$PG_HOME/initdb.log" >&2
      die "initdb failed"
    }
    # Local only; the socket beside the data, not in /var/run/postgresql (may not exist, may be the system's).
    # Tests open a pool per test database, so allow more connections than the default 100.
    cat >>"$data/postgresql.conf" <<EOF

# flashsale private instance (scripts/services.sh)
listen_addresses = '127.0.0.1'
unix_socket_directories = '${PG_HOME//\'/\'\'}'
max_connections = 300
EOF
  fi
  for ((attempt = 1; attempt <= 5; attempt++)); do
    port=$(pick_port "$(cat "$PG_HOME/port" 2>/dev/null || true)" "$PG_PORT_BASE")
    log "starting private postgres on 127.0.0.1:$port"
    if detached as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$PG_HOME/postgres.log" -w -t 60 -o "-p $port" start \
      >"$STATE/pg_ctl.out" 2>&1; then
      echo "$port" >"$PG_HOME/port.new" && mv "$PG_HOME/port.new" "$PG_HOME/port"
      PG_PORT=$port
      return 0
    fi
    if tail -n 5 "$PG_HOME/postgres.log" 2>/dev/null | grep -q 'could not bind\|could not create any TCP/IP sockets'; then
      log "port $port was taken meanwhile; trying another"
      rm -f "$PG_HOME/port"
      PG_PORT_BASE=$((port + 1))
      continue
    fi
    break
  done
  cat "$STATE/pg_ctl.out" >&2
  tail -n 20 "$PG_HOME/postgres.log" >&2 || true
  die "could not start the private postgres"
}

# ---------------------------------------------------------------- private Redis

R_HOME=$STATE/redis

warn_old_redis() {
  case $("$REDIS_SERVER" --version 2>/dev/null) in
  *v=[0-6].*) log "warning: redis-server $("$REDIS_SERVER" --version | cut -d' ' -f3) is older than the 7 flashsale needs" ;;
  esac
}

# Sets REDIS_PORT if the private server already runs; removes the pid file of one that is gone.
redis_reuse() {
  local pid port i
  [ -f "$R_HOME/redis.pid" ] || return 1
  pid=$(cat "$R_HOME/redis.pid")
  if ! pid_is "$pid" redis; then
    log "removing the stale pid file of a private redis (pid ${pid:-?} is no redis of ours)"
    rm -f "$R_HOME/redis.pid"
    return 1
  fi
  port=$(cat "$R_HOME/port" 2>/dev/null || true)
  for ((i = 0; i < 30; i++)); do
    if [ -n "$port" ] && probe_redis "redis://127.0.0.1:$port" 2>/dev/null; then
      REDIS_PORT=$port
      return 0
    fi
    sleep 0.1
  done
  die "private redis (pid $pid) runs but does not answer; see $R_HOME/redis.log, or run: $0 stop"
}

redis_start() {
  local port attempt i
  mkdir -p "$R_HOME"
  for ((attempt = 1; attempt <= 5; attempt++)); do
    port=$(pick_port "$(cat "$R_HOME/port" 2>/dev/null || true)" "$REDIS_PORT_BASE")
    log "starting private redis on 127.0.0.1:$port"
    rm -f "$R_HOME/redis.pid"
    : >"$R_HOME/redis.log"
    # A scratch store for tests and demos: no snapshots, no append-only file.
    detached "$REDIS_SERVER" --bind 127.0.0.1 --port "$port" --daemonize yes \
      --pidfile "$R_HOME/redis.pid" --logfile "$R_HOME/redis.log" --dir "$R_HOME" \
      --save '' --appendonly no >/dev/null 2>"$R_HOME/redis.err" || true
    for ((i = 0; i < 100; i++)); do
      if probe_redis "redis://127.0.0.1:$port" >/dev/null 2>&1; then
        echo "$port" >"$R_HOME/port"
        REDIS_PORT=$port
        return 0
      fi
      if grep -q 'Address already in use' "$R_HOME/redis.log"; then break; fi
      sleep 0.1
    done
    if grep -q 'Address already in use' "$R_HOME/redis.log"; then
      log "port $port was taken meanwhile; trying another"
      rm -f "$R_HOME/port"
      REDIS_PORT_BASE=$((port + 1))
      continue
    fi
    break
  done
  tail -n 20 "$R_HOME/redis.err" "$R_HOME/redis.log" >&2 || true
  die "could not start the private redis"
}

# ---------------------------------------------------------------- private Redis Cluster

# .services/redis-cluster/ports holds the three ports of the running cluster (kept as the preferred ones for the
# next start); .services/redis-cluster/<port>/ holds one node's nodes.conf, pid file and logs.
C_HOME=$STATE/redis-cluster
CLUSTER_PORTS=()

# shq VALUE: VALUE as one shell word, bare when it needs no quoting (printf %q would escape a URL list's commas).
shq() {
  if [[ $1 =~ ^[A-Za-z0-9_./:,@%+=-]+$ ]]; then printf '%s' "$1"; else printf '%q' "$1"; fi
}

mask_urls() { printf '%s' "$1" | sed 's#://\([^:@/,]*\):[^@/,]*@#://\1:***@#g'; }

# cluster_info URL: the node's CLUSTER INFO (field:value lines); fails if it does not answer one.
cluster_info() {
  local out
  if have redis-cli; then
    out=$(with_timeout 3 redis-cli -u "$1" cluster info </dev/null 2>/dev/null) || return 1
  else
    parse_url "$1" 6379 || return 1
    # A RESP bulk string: "$<length>\r\n" then the text. No AUTH here: a password-protected node fails.
    # shellcheck disable=SC2016 # $0, $1, $h, $n and $b belong to the inner bash
    out=$(with_timeout 3 env LC_ALL=C bash -c 'exec 4<>"/dev/tcp/$0/$1" || exit 1
      printf "CLUSTER INFO\r\n" >&4
      IFS= read -r h <&4 || exit 1
      n=${h#?} n=${n%?}
      [[ $h == "\$"* && $n =~ ^[0-9]+$ ]] || exit 1
      read -r -N "$n" b <&4
      printf %s "$b"' "$U_HOST" "$U_PORT" 2>/dev/null) || return 1
  fi
  out=${out//$'\r'/}
  [[ $out == *cluster_state:* ]] || return 1
  printf '%s\n' "$out"
}

info_field() { sed -n "s/^$2://p" <<<"$1"; } # INFO FIELD

cluster_url_ok() { # URL: the node reports cluster_state:ok
  local info
  info=$(cluster_info "$1") && [ "$(info_field "$info" cluster_state)" = ok ]
}

# cluster_healthy PORT...: every node reports cluster_state:ok, all slots assigned, and knows exactly these nodes.
cluster_healthy() {
  local p info
  for p; do
    info=$(cluster_info "redis://127.0.0.1:$p") || return 1
    [ "$(info_field "$info" cluster_state)" = ok ] || return 1
    [ "$(info_field "$info" cluster_slots_assigned)" = 16384 ] || return 1
    [ "$(info_field "$info" cluster_known_nodes)" = "$#" ] || return 1
  done
}

# cluster_blank PORT...: every node knows only itself and serves no slot (ready for `--cluster create`).
cluster_blank() {
  local p info
  for p; do
    info=$(cluster_info "redis://127.0.0.1:$p") || return 1
    [ "$(info_field "$info" cluster_known_nodes)" = 1 ] || return 1
    [ "$(info_field "$info" cluster_slots_assigned)" = 0 ] || return 1
  done
}

cluster_wait() { # SECONDS PORT...: bounded wait until cluster_healthy
  local end=$((SECONDS + $1))
  shift
  while [ "$SECONDS" -lt "$end" ]; do
    if cluster_healthy "$@"; then return 0; fi
    sleep 0.25
  done
  cluster_healthy "$@"
}

# cnode_pid PORT: prints the pid of our cluster node on PORT, if it runs. Besides the pid file, the process title
# (`redis-server 127.0.0.1:PORT [cluster]`) must name the port, so a reused pid is never taken for ours.
cnode_pid() {
  local pid cmd
  pid=$(cat "$C_HOME/$1/redis.pid" 2>/dev/null || true)
  pid_is "$pid" redis || return 1
  if [ -r "/proc/$pid/cmdline" ]; then
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
    [[ " $cmd " == *":$1 "* ]] || return 1
  fi
  printf '%s\n' "$pid"
}

# cnode_start PORT: 0 = the node answers, 2 = its port or bus port was taken meanwhile, 1 = it failed otherwise.
cnode_start() {
  local port=$1 dir=$C_HOME/$1 i
  mkdir -p "$dir"
  rm -f "$dir/redis.pid"
  : >"$dir/redis.log"
  # Scratch data: no snapshots, no append-only file. nodes.conf lives in --dir.
  detached "$REDIS_SERVER" --bind 127.0.0.1 --port "$port" --daemonize yes \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir" \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --appendonly no --save '' >/dev/null 2>"$dir/redis.err" || true
  for ((i = 0; i < 100; i++)); do
    if cnode_pid "$port" >/dev/null && probe_redis "redis://127.0.0.1:$port" >/dev/null 2>&1; then return 0; fi
    if grep -q 'Address already in use' "$dir/redis.log"; then return 2; fi
    sleep 0.1
  done
  return 1
}

# Stops every cluster node this script started (whatever .services/redis-cluster/<port>/redis.pid names).
# With `quiet`, says nothing when none runs.
cluster_stop_nodes() {
  local d port pid n=0
  for d in "$C_HOME"/*/; do
    [ -d "$d" ] || continue
    port=$(basename "$d")
    pid=$(cnode_pid "$port") || continue
    log "stopping redis cluster node 127.0.0.1:$port (pid $pid)"
    kill -TERM "$pid"
    wait_gone "$pid" 30 || die "redis cluster node (pid $pid) did not stop within 30s"
    rm -f "$d/redis.pid"
    n=$((n + 1))
  done
  if [ "$n" -eq 0 ] && [ "${1:-}" != quiet ]; then log "no private redis cluster nodes running"; fi
}

cluster_fail() {
  log "error: $*"
  cluster_stop_nodes quiet
  exit 1
}

cluster_create() { # PORT...
  local nodes=() p
  for p; do nodes+=("127.0.0.1:$p"); done
  log "redis-cli --cluster create ${nodes[*]} --cluster-replicas 0 (log: $C_HOME/create.log)"
  detached with_timeout 60 redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
    >"$C_HOME/create.log" 2>&1 || {
    tail -n 20 "$C_HOME/create.log" >&2
    return 1
  }
}

# Three new nodes on quiet ports (the remembered ones if free, else upward from CLUSTER_PORT_BASE), joined into
# one cluster of three masters. Sets CLUSTER_PORTS.
cluster_fresh() {
  local prefer=() port base=$CLUSTER_PORT_BASE i attempt rc
  if [ -f "$C_HOME/ports" ]; then read -r -a prefer <"$C_HOME/ports" || true; fi
  # An old nodes.conf would make a node rejoin the cluster it was part of.
  rm -f "$C_HOME/ports"
  rm -rf "${C_HOME:?}"/[0-9]*
  mkdir -p "$C_HOME"
  CLUSTER_PORTS=()
  for ((i = 0; i < 3; i++)); do
    rc=1
    for ((attempt = 1; attempt <= 5; attempt++)); do
      port=$(pick_port "${prefer[i]:-}" "$base" "$CLUSTER_BUS_OFFSET")
      log "starting redis cluster node on 127.0.0.1:$port (cluster bus $((port + CLUSTER_BUS_OFFSET)))"
      rc=0
      cnode_start "$port" || rc=$?
      if [ "$rc" -ne 2 ]; then break; fi
      log "port $port was taken meanwhile; trying another"
      rm -rf "${C_HOME:?}/$port"
      prefer[i]=''
      base=$((port + 1))
    done
    if [ "$rc" -ne 0 ]; then
      tail -n 20 "$C_HOME/$port/redis.err" "$C_HOME/$port/redis.log" >&2 || true
      cluster_fail "could not start a redis cluster node on 127.0.0.1:$port"
    fi
    CLUSTER_PORTS+=("$port")
    base=$((port + 1))
  done
  echo "${CLUSTER_PORTS[*]}" >"$C_HOME/ports.new" && mv "$C_HOME/ports.new" "$C_HOME/ports"
  cluster_create "${CLUSTER_PORTS[@]}" || cluster_fail "redis-cli --cluster create failed"
  log "waiting for cluster_state:ok on every node"
  cluster_wait 30 "${CLUSTER_PORTS[@]}" || cluster_fail "the cluster did not reach cluster_state:ok within 30s"
}

# Reuses the running private cluster if it is whole and healthy, else starts a new one. Sets CLUSTER_PORTS.
cluster_up() {
  local ports=() p alive=0
  mkdir -p "$C_HOME"
  if [ -f "$C_HOME/ports" ]; then read -r -a ports <"$C_HOME/ports" || true; fi
  if [ "${#ports[@]}" -eq 3 ]; then
    for p in "${ports[@]}"; do
      if cnode_pid "$p" >/dev/null; then alive=$((alive + 1)); fi
    done
  fi
  if [ "$alive" -eq 3 ]; then
    if cluster_healthy "${ports[@]}"; then
      log "private redis cluster already running on ports ${ports[*]}"
      CLUSTER_PORTS=("${ports[@]}")
      return 0
    fi
    if cluster_blank "${ports[@]}"; then
      log "private redis cluster nodes on ports ${ports[*]} run but were never joined"
      if cluster_create "${ports[@]}" && log "waiting for cluster_state:ok on every node" &&
        cluster_wait 30 "${ports[@]}"; then
        CLUSTER_PORTS=("${ports[@]}")
        return 0
      fi
    elif cluster_wait 10 "${ports[@]}"; then
      log "private redis cluster on ports ${ports[*]} is healthy again"
      CLUSTER_PORTS=("${ports[@]}")
      return 0
    fi
    log "the private redis cluster on ports ${ports[*]} is not healthy; recreating it (it holds scratch data only)"
  elif [ "$alive" -gt 0 ]; then
    log "only $alive of the private redis cluster's 3 nodes run; recreating it (it holds scratch data only)"
  fi
  cluster_stop_nodes quiet
  cluster_fresh
}

# ---------------------------------------------------------------- commands

lock() {
  mkdir -p "$STATE"
  if have flock; then
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "another services.sh has held $STATE/.lock for 5 minutes"
  fi
}

cmd_stop() {
  local pid
  lock
  choose_pg_home
  pid=$(pg_pid)
  if pid_is "$pid" postgres; then
    log "stopping private postgres (pid $pid, port $(pg_running_port))"
    kill -INT "$pid" # fast shutdown: roll back open transactions, then exit
    wait_gone "$pid" 60 || die "postgres (pid $pid) did not stop within 60s"
  else
    log "no private postgres running"
  fi
  pid=$(cat "$R_HOME/redis.pid" 2>/dev/null || true)
  if pid_is "$pid" redis; then
    log "stopping private redis (pid $pid, port $(cat "$R_HOME/port" 2>/dev/null || echo ?))"
    kill -TERM "$pid"
    wait_gone "$pid" 30 || die "redis (pid $pid) did not stop within 30s"
  else
    log "no private redis running"
  fi
  rm -f "$R_HOME/redis.pid"
  cluster_stop_nodes
}

cmd_status() {
  local pid
  choose_pg_home
  pid=$(pg_pid)
  if pid_is "$pid" postgres; then
    log "private postgres: pid $pid, postgres://postgres@127.0.0.1:$(pg_running_port) (data $PG_HOME/data)"
  else
    log "private postgres: not running"
  fi
  pid=$(cat "$R_HOME/redis.pid" 2>/dev/null || true)
  if pid_is "$pid" redis; then
    log "private redis: pid $pid, redis://127.0.0.1:$(cat "$R_HOME/port" 2>/dev/null || echo ?)"
  else
    log "private redis: not running"
  fi
  local d port info state n=0
  for d in "$C_HOME"/*/; do
    [ -d "$d" ] || continue
    port=$(basename "$d")
    if pid=$(cnode_pid "$port"); then
      state='not answering'
      if info=$(cluster_info "redis://127.0.0.1:$port"); then
        state="cluster_state:$(info_field "$info" cluster_state), $(info_field "$info" cluster_known_nodes) nodes known"
      fi
      log "private redis cluster node: pid $pid, redis://127.0.0.1:$port ($state)"
      n=$((n + 1))
    fi
  done
  if [ "$n" -eq 0 ]; then log "private redis cluster: not running"; fi
}

cmd_up() {
  local db_url=${DATABASE_URL:-} redis_url=${REDIS_URL:-} db_explicit=1 redis_explicit=1 rc db_name
  local need_pg=0 need_redis=0 need_bin=0 install=() redis_bin=${REDIS_SERVER_BIN:-}
  if [ -z "$db_url" ]; then db_url=$DEFAULT_DATABASE_URL db_explicit=0; fi
  if [ -z "$redis_url" ]; then redis_url=$DEFAULT_REDIS_URL redis_explicit=0; fi

  # A URL that answers is used as is. One that answers but refuses us is still used if the caller chose it
  # (their credentials, their problem to fix); the default one is replaced by a private instance.
  rc=0
  probe_pg "$db_url" || rc=$?
  if [ "$rc" -eq 1 ] || { [ "$rc" -eq 2 ] && [ "$db_explicit" -eq 0 ]; }; then need_pg=1; fi
  if [ "$rc" -eq 2 ] && [ "$db_explicit" -eq 1 ]; then log "using DATABASE_URL as given anyway"; fi
  rc=0
  probe_redis "$redis_url" || rc=$?
  if [ "$rc" -eq 1 ] || { [ "$rc" -eq 2 ] && [ "$redis_explicit" -eq 0 ]; }; then need_redis=1; fi
  if [ "$rc" -eq 2 ] && [ "$redis_explicit" -eq 1 ]; then log "using REDIS_URL as given anyway"; fi
  # Tests spawn disposable redis-servers of their own: REDIS_SERVER_BIN as given, else the one on PATH.
  if [ -n "$redis_bin" ] && { [ ! -f "$redis_bin" ] || [ ! -x "$redis_bin" ]; }; then
    log "REDIS_SERVER_BIN=$redis_bin is no executable; looking for redis-server instead"
    redis_bin=
  fi
  if [ -z "$redis_bin" ] && ! have redis-server; then need_bin=1; fi

  if [ "$need_pg" -eq 1 ] || [ "$need_redis" -eq 1 ] || [ "$need_bin" -eq 1 ]; then
    lock
    if [ "$need_pg" -eq 1 ]; then
      log "nothing usable at ${db_url%%\?*}; using a private postgres"
      choose_pg_home
      if pg_reuse; then
        log "private postgres already running on 127.0.0.1:$PG_PORT"
        need_pg=0
      elif [ -f "$PG_HOME/data/PG_VERSION" ]; then
        : # pg_start looks for the version that made the data directory
      elif ! find_pg_bin; then
        install+=(pg)
      elif [ "$PG_MAJOR" -lt 15 ] && can_install; then
        install+=(pg) # else make do with the older one (warned below)
      fi
    fi
    if [ "$need_redis" -eq 1 ]; then
      log "nothing usable at $redis_url; using a private redis"
      if redis_reuse; then
        log "private redis already running on 127.0.0.1:$REDIS_PORT"
        need_redis=0
      elif ! have redis-server; then
        install+=(redis)
      fi
    fi
    if [ "$need_bin" -eq 1 ] && [ "$need_redis" -eq 0 ]; then
      # Only the binary is missing: a failed install costs the tests that need it, not DATABASE_URL/REDIS_URL.
      if [ "${#install[@]}" -eq 0 ]; then
        log "no redis-server binary (REDIS_SERVER_BIN); installing it"
        (install_servers redis) || true
        hash -r
      else
        install+=(redis)
      fi
    fi
    if [ "${#install[@]}" -gt 0 ]; then install_servers "${install[@]}"; fi
    if [ "$need_pg" -eq 1 ]; then
      ensure_pg_user
      choose_pg_home create
      if [ ! -f "$PG_HOME/data/PG_VERSION" ]; then
        find_pg_bin || die "no PostgreSQL server binaries (initdb, pg_ctl) found"
        if [ "$PG_MAJOR" -lt 15 ]; then log "warning: PostgreSQL $PG_MAJOR is older than the 15 flashsale needs"; fi
      fi
      pg_start
    fi
    if [ "$need_redis" -eq 1 ]; then
      REDIS_SERVER=$(command -v redis-server) || die "no redis-server found"
      warn_old_redis
      redis_start
    fi
  fi

  if [ -n "${PG_PORT:-}" ]; then
    parse_url "$db_url" 5432 || true
    db_name=${U_PATH#/}
    db_url="postgres://postgres@127.0.0.1:$PG_PORT/${db_name:-flashsale}"
  fi
  if [ -n "${REDIS_PORT:-}" ]; then redis_url="redis://127.0.0.1:$REDIS_PORT"; fi
  log "DATABASE_URL=$(printf '%s' "$db_url" | sed 's#://\([^:@/]*\):[^@/]*@#://\1:***@#')"
  log "REDIS_URL=$(printf '%s' "$redis_url" | sed 's#://\([^:@/]*\):[^@/]*@#://\1:***@#')"
  printf 'export DATABASE_URL=%q\nexport REDIS_URL=%q\n' "$db_url" "$redis_url" >&3
  if [ -z "$redis_bin" ] && have redis-server; then redis_bin=$(command -v redis-server); fi
  if [ -n "$redis_bin" ]; then
    # Absolute, but symlinks kept: Debian's redis-server links to redis-check-rdb, which acts by its name.
    case $redis_bin in /*) ;; *) redis_bin=$PWD/$redis_bin ;; esac
    log "REDIS_SERVER_BIN=$redis_bin"
    printf 'export REDIS_SERVER_BIN=%s\n' "$(shq "$redis_bin")" >&3
  else
    log "warning: no redis-server binary found or installed; REDIS_SERVER_BIN is not set"
  fi
}

cmd_cluster() {
  local urls=${REDIS_CLUSTER_URLS:-} first p
  if [ -n "$urls" ]; then
    first=${urls%%,*}
    first=${first//[[:space:]]/}
    if cluster_url_ok "$first"; then
      log "REDIS_CLUSTER_URLS=$(mask_urls "$urls") (cluster_state:ok)"
      printf 'export REDIS_CLUSTER_URLS=%s\n' "$(shq "$urls")" >&3
      return 0
    fi
    log "REDIS_CLUSTER_URLS: $(mask_urls "$first") does not report cluster_state:ok; using a private redis cluster"
  fi
  lock
  if ! have redis-server; then
    install_servers redis
  elif ! have redis-cli; then
    install_servers redis-cli
  fi
  REDIS_SERVER=$(command -v redis-server) || die "no redis-server found"
  have redis-cli || die "no redis-cli found (Debian package redis-tools)"
  warn_old_redis
  cluster_up
  urls=
  for p in "${CLUSTER_PORTS[@]}"; do urls+="${urls:+,}redis://127.0.0.1:$p"; done
  log "REDIS_CLUSTER_URLS=$urls"
  printf 'export REDIS_CLUSTER_URLS=%s\n' "$(shq "$urls")" >&3
}

case ${1:-up} in
up | start) cmd_up ;;
cluster) cmd_cluster ;;
stop) cmd_stop ;;
status) cmd_status ;;
-h | --help | help) sed -n '2,19s/^# \{0,1\}//p' "$0" ;;
*) die "unknown command '$1' (try: up, cluster, stop, status)" ;;
esac
