#!/bin/sh
# The cluster simulation's figures: N = 100 and 1,000 for every scenario and policy (the cluster
# policy: cold and scale-out, address and prefix mode), and one 5,000-node cold start of the
# agent; then the tables (report.md) and the chart (chart.svg).
# Real time: a 1,000-node cold start takes minutes, the 5,000-node one over half an hour.
# Usage: tests/sim/run-matrix.sh OUT_DIR   (runs in parallel; each run is its own process)
set -eu
out=${1:?usage: $0 OUT_DIR}
cargo build --release -p vnet-clustersim
bin=target/release/vnet-clustersim
mkdir -p "$out"
"$bin" run --nodes 5000 --scenario cold --policy agent --out "$out" > "$out/run-5000-cold-agent.log" 2>&1 &
for n in 100 1000; do
  for s in cold scale-out churn; do
    for p in agent naive; do
      "$bin" run --nodes "$n" --scenario "$s" --policy "$p" --out "$out" > "$out/run-$n-$s-$p.log" 2>&1 &
    done
  done
done
# Cluster mode (one allocator for the cluster), address and prefix mode.
for n in 100 1000; do
  for s in cold scale-out; do
    for m in address prefix; do
      "$bin" run --nodes "$n" --scenario "$s" --policy cluster --mode "$m" --out "$out" > "$out/run-$n-$s-cluster-$m.log" 2>&1 &
    done
  done
done
wait
"$bin" report --out "$out"
