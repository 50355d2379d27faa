#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine, for trying `dist-svc merge --cluster`:
# a head node plus N worker nodes, every address on 127.0.0.1.
#
#   cluster/local-cluster.sh start [N]    # head + N worker nodes (default 2), each with 1 fake GPU
#   cluster/local-cluster.sh stop         # stops this cluster only: other Ray clusters keep running
#
# Then merge on it (RAY_AUTH_MODE must match the nodes'; the second variable keeps the driver's
# address on the loopback interface too, as the nodes' are):
#   RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
#     dist-svc merge my-merge.yaml ./merged --cluster 127.0.0.1:6379
#
# Each node is started in a session of its own (setsid); the sessions' ids and the cluster's Ray
# files (--temp-dir) are kept in $STATE. `stop` ends the processes of those sessions (Ray's
# daemons and the workers they started, which stay in the session), never `ray stop`, which
# ends every Ray process on the machine, other users' clusters included.
set -euo pipefail
# Ray >= 2.59 turns token auth on for `ray start`; every node must agree or the second one
# fails to join. This cluster is local and throwaway: no auth.
export RAY_AUTH_MODE=disabled
# Every node on the loopback interface (--node-ip-address below). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# would do the same but makes `ray start` refuse a second node, so it is for drivers only.
unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
PORT=${RAY_PORT:-6379}
RAY=${RAY:-ray}
# One state directory per GCS port: two clusters of this script on different ports stay apart.
# Short: Ray's socket paths under it must stay within 107 bytes.
STATE=${RAY_CLUSTER_STATE:-${TMPDIR:-/tmp}/ray-lc-$(id -u)-$PORT}
GRACE_S=${RAY_STOP_GRACE_S:-5}

# The live processes of the recorded sessions that are Ray's (a session id whose processes are
# all gone could be reused by an unrelated process: only Ray's are ever signalled; an exited one
# not yet reaped, state Z, is gone already).
cluster_pids() {
  [ -f "$STATE/sessions" ] || return 0
  local sid
  while read -r sid; do
    ps -eo pid=,sid=,stat=,args= | awk -v s="$sid" '$2 == s && $3 !~ /^Z/ && /ray/ { print $1 }'
  done < "$STATE/sessions"
}

stop_cluster() {
  local pids left i
  pids=$(cluster_pids)
  if [ -n "$pids" ]; then
    kill -TERM $pids 2>/dev/null || true
    for i in $(seq "$((GRACE_S * 10))"); do
      left=$(cluster_pids)
      [ -z "$left" ] && break
      sleep 0.1
    done
    # Past the grace: SIGKILL, again for any process started meanwhile, until none is left (a
    # killed process with many threads takes a moment to go, longer on a loaded machine).
    for i in $(seq 100); do
      left=$(cluster_pids)
      [ -z "$left" ] && break
      kill -KILL $left 2>/dev/null || true
      sleep 0.1
    done
  fi
  rm -rf "$STATE"
}

# `ray start` in a new session, its id recorded before it returns: setsid, not a process group
# leader here (no job control in a script), makes its own pid the session's id and execs.
start_node() {
  setsid "$RAY" start "$@" --temp-dir "$STATE/ray" --disable-usage-stats < /dev/null &
  local pid=$!
  echo "$pid" >> "$STATE/sessions"
  wait "$pid"
}

case "${1:-}" in
  start)
    n=${2:-2}
    if [ -n "$(cluster_pids)" ]; then
      echo "a cluster of this script is running on port $PORT ($STATE): stop it first" >&2
      exit 1
    fi
    rm -rf "$STATE"
    mkdir -p "$STATE"
    trap 'echo "start failed: stopping what was started" >&2; stop_cluster' ERR
    start_node --head --node-ip-address 127.0.0.1 --port "$PORT" --num-cpus 1 --num-gpus 0 --include-dashboard false
    for i in $(seq 1 "$n"); do
      # Fake GPUs: dist-svc places one actor per GPU; on a CPU-only machine the actor computes on CPU.
      start_node --address "127.0.0.1:$PORT" --node-ip-address 127.0.0.1 --num-cpus 1 --num-gpus 1
    done
    trap - ERR
    echo "cluster up at 127.0.0.1:$PORT: merge with --cluster 127.0.0.1:$PORT; stop with: $0 stop"
    ;;
  stop)
    stop_cluster
    echo "stopped the cluster on port $PORT"
    ;;
  *)
    echo "usage: $0 start [N] | stop   (RAY_PORT: the GCS port, default 6379)" >&2
    exit 2
    ;;
esac
