#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine, for trying `dist-svc merge --cluster`:
# a head node plus N worker nodes, every address on 127.0.0.1.
#
#   cluster/local-cluster.sh start [N]    # head + N worker nodes (default 2), each with 1 fake GPU
#   cluster/local-cluster.sh stop
#
# Then merge on it (RAY_AUTH_MODE must match the nodes'; the second variable keeps the driver's
# address on the loopback interface too, as the nodes' are):
#   RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
#     dist-svc merge my-merge.yaml ./merged --cluster 127.0.0.1:6379
set -euo pipefail
# Ray >= 2.59 turns token auth on for `ray start`; every node must agree or the second one
# fails to join. This cluster is local and throwaway: no auth.
export RAY_AUTH_MODE=disabled
# Every node on the loopback interface (--node-ip-address below). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# would do the same but makes `ray start` refuse a second node, so it is for drivers only.
unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
PORT=${RAY_PORT:-6379}
RAY=${RAY:-ray}

case "${1:-}" in
  start)
    n=${2:-2}
    "$RAY" start --head --node-ip-address 127.0.0.1 --port "$PORT" --num-cpus 1 --num-gpus 0 \
      --include-dashboard false --disable-usage-stats
    for i in $(seq 1 "$n"); do
      # Fake GPUs: dist-svc places one actor per GPU; on a CPU-only machine the actor computes on CPU.
      "$RAY" start --address "127.0.0.1:$PORT" --node-ip-address 127.0.0.1 --num-cpus 1 --num-gpus 1 \
        --disable-usage-stats
    done
    echo "cluster up at 127.0.0.1:$PORT: merge with --cluster 127.0.0.1:$PORT"
    ;;
  stop)
    "$RAY" stop --force
    ;;
  *)
    echo "usage: $0 start [N] | stop" >&2
    exit 2
    ;;
esac
