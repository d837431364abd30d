#!/usr/bin/env python3
"""Per-run deltas of the commit/fsync counters scraped by compare.sh (before/after each run).
Usage: bench/store/metrics-delta.py bench/results/compare-<stamp>"""
import glob, json, os, re, sys

def scrape(path):
    out = {}
    try:
        for line in open(path):
            if line.startswith("#"): continue
            m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?)\s+([-+\d.eE]+|NaN|\+Inf)$", line.strip())
            if m: out[m.group(1)] = float(m.group(2))
    except FileNotFoundError: pass
    return out

KEYS = {
    "meshwork": ["meshwork_store_commit_batch_requests_sum", "meshwork_store_commit_batch_requests_count",
                 "meshwork_store_commit_seconds_sum"],
    "etcd": ["etcd_disk_wal_fsync_duration_seconds_count", "etcd_disk_wal_fsync_duration_seconds_sum",
             "etcd_disk_backend_commit_duration_seconds_count", "etcd_disk_backend_commit_duration_seconds_sum"],
}
d = sys.argv[1]
print("| run | requests | commits/fsyncs | req per commit | mean commit/fsync ms | server CPU s |")
print("|---|---:|---:|---:|---:|---:|")
for after in sorted(glob.glob(f"{d}/*-put-*.metrics.after") + glob.glob(f"{d}/*-load1m.metrics.after")):
    run = os.path.basename(after)[: -len(".metrics.after")]
    side = run.split("-")[0]
    a, b = scrape(after), scrape(after.replace(".after", ".before"))
    delta = {k: a.get(k, 0) - b.get(k, 0) for k in KEYS[side]}
    res = json.load(open(f"{d}/{run}.json")) if os.path.exists(f"{d}/{run}.json") else {}
    if side == "meshwork":
        n, c, s = delta[KEYS[side][0]], delta[KEYS[side][1]], delta[KEYS[side][2]]
        what = f"{c:.0f} redb commits"
    else:
        c, s = delta["etcd_disk_wal_fsync_duration_seconds_count"], delta["etcd_disk_wal_fsync_duration_seconds_sum"]
        n = res.get("requests", 0)
        what = f"{c:.0f} WAL fsyncs ({delta['etcd_disk_backend_commit_duration_seconds_count']:.0f} bolt commits)"
    print(f"| {run} | {n:.0f} | {what} | {n / c if c else 0:.1f} | {1000 * s / c if c else 0:.2f} | {res.get('server_cpu_s', 'n/a')} |")
