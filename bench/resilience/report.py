#!/usr/bin/env python3
"""Turns criterion's estimates (target/criterion/**/new/estimates.json) of the
meshwork-resilience benches into the markdown tables of RESULTS.md: median
per call, and meshwork/peer ratios for the side-by-side pairs."""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
medians = {}
for est in root.glob("*/*/new/estimates.json"):
    bench = json.loads((est.parent / "benchmark.json").read_text())
    medians[bench["full_id"]] = json.loads(est.read_text())["median"]["point_estimate"]

def fmt(ns):
    return f"{ns / 1000:.2f} µs" if ns >= 1000 else f"{ns:.1f} ns"

print("| benchmark | median per call |")
print("| --- | --- |")
for name in sorted(medians):
    print(f"| `{name}` | {fmt(medians[name])} |")

pairs = [
    ("gcra/meshwork/uncontended", "gcra/governor/uncontended"),
    ("gcra/meshwork/2-threads", "gcra/governor/2-threads"),
    ("rate-limit-service/meshwork/uncontended", "rate-limit-service/tower-RateLimit/uncontended"),
    ("concurrency-limit/meshwork-bulkhead/uncontended", "concurrency-limit/tower-ConcurrencyLimit/uncontended"),
    ("concurrency-limit/meshwork-bulkhead/2-threads", "concurrency-limit/tower-ConcurrencyLimit/2-threads"),
    ("p2c/meshwork-p2c-peak-ewma/8-endpoints", "p2c/tower-p2c-peak-ewma/8-endpoints"),
]
print()
print("| meshwork | peer | meshwork | peer | ratio (meshwork / peer) |")
print("| --- | --- | --- | --- | --- |")
for ours, theirs in pairs:
    if ours in medians and theirs in medians:
        print(f"| `{ours}` | `{theirs}` | {fmt(medians[ours])} | {fmt(medians[theirs])} | {medians[ours] / medians[theirs]:.2f} |")
