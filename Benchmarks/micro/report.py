#!/usr/bin/env python3
"""Runs the micro-benchmarks and prints a markdown table: ops/s, MB/s, mallocs per operation, and
each Sluice operation's ratio to its Foundation counterpart (same group, same input, same run).

    ./report.py                 # builds and runs everything (about 2.5 minutes), prints the table
    ./report.py --filter '5 keen.*'  # only benchmarks whose whole name matches (as `benchmark --filter`)
    ./report.py --csv FILE      # re-reads an earlier run (`--format influx --path stdout` output)
    ./report.py --save FILE     # also keeps the raw influx CSV of this run

Wall-clock p50 of each sample gives ops/s (samples of fast operations run 1000 of them; the factor
is read off the suite's own `MB/s (input)` metric); MB/s is ops/s x the input's size, which
`ProfileDriver info` prints.
"""
import argparse
import csv
import io
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRATCH = os.path.join(HERE, ".build")

# Sluice label -> the Foundation label it is compared with (in the same group and input).
PAIRS = {
    "Sluice Frame.encode": "Foundation JSONEncoder (Codable, payload string)",
    "Sluice FrameDecoder.next": "Foundation JSONDecoder (Codable, payload string)",
    # No Foundation counterpart (measured for the router's and kafka-out's per-event frames).
    "Sluice Frame.encode, a part per event (router, send_as_batch false)": "(none)",
    "Sluice FrameDecoder.next + messages, a part per event (kafka-out)": "(none)",
}


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=HERE, check=True, text=True, stdout=subprocess.PIPE, **kw).stdout


def input_sizes():
    run(["swift", "build", "--scratch-path", SCRATCH, "-c", "release", "--product", "ProfileDriver"], stderr=subprocess.DEVNULL)
    out = run([os.path.join(SCRATCH, "release", "ProfileDriver"), "info"])
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+): (\d+) bytes", out, re.M)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--filter")
    ap.add_argument("--csv")
    ap.add_argument("--save")
    args = ap.parse_args()
    sizes = input_sizes()
    if args.csv:
        text = open(args.csv).read()
    else:
        cmd = ["swift", "package", "--scratch-path", SCRATCH, "benchmark", "--no-progress", "--format", "influx", "--path", "stdout"]
        if args.filter:
            cmd += ["--filter", args.filter]
        text = run(cmd)
        if args.save:
            open(args.save, "w").write(text)
    start = text.index("measurement,")
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    p50 = {}
    order = []
    for r in rows:
        if r.get("percentile") != "50.0":
            continue
        name = r["test"]
        if name not in p50:
            p50[name] = {}
            order.append(name)
        p50[name][r["metric"]] = float(r["value"])

    results = {}
    for name in order:
        m = re.match(r"(\d [\w -]+?) (large|small): (.*)", name)
        group, inp, label = m.groups()
        v = p50[name]
        wall_ns = v["Time(wallclock)"]
        mbps = v.get("MB/s(input)", 0)
        guess = mbps * wall_ns / (sizes[inp] * 1e3) if mbps else 1
        scale = 1000 if guess > 30 else 1
        ops = 1e9 * scale / wall_ns
        results[(group, inp, label)] = {
            "ops": ops,
            "mbps": ops * sizes[inp] / 1e6,
            "us": wall_ns / scale / 1e3,
            "mallocs": v.get("Malloc(total)", float("nan")) / scale,
        }

    print("| group | input | implementation | ops/s (p50) | MB/s (p50) | µs/op | mallocs/op | × Foundation |")
    print("|---|---|---|--:|--:|--:|--:|--:|")
    for inp in ["large", "small"]:
        for (group, i, label), r in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][2].startswith("Foundation"), kv[0][2])):
            if i != inp:
                continue
            if label.startswith("Foundation"):
                ratio = "1"
            else:
                flabel = PAIRS.get(label) or next((l for (g, i2, l) in results if g == group and i2 == inp and l.startswith("Foundation")), None)
                f = results.get((group, inp, flabel))
                ratio = f"{r['ops'] / f['ops']:.1f}×" if f else ""
            print(
                f"| {group} | {inp} ({sizes[inp]} B) | {label} | {r['ops']:,.0f} | {r['mbps']:,.1f} | {r['us']:,.1f} | {r['mallocs']:,.0f} | {ratio} |"
            )


if __name__ == "__main__":
    sys.exit(main())
