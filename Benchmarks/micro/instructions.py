#!/usr/bin/env python3
"""Instructions per operation, counted by valgrind --tool=callgrind on ProfileDriver: unlike
wall-clock numbers these do not move with whatever else the machine is doing. Each operation runs
N and 2N times; (count(2N) - count(N)) / N leaves out start-up and one-time costs.

    ./instructions.py                  # every operation, both inputs (about 4 minutes)
    ./instructions.py apply keen       # only these operations
    ./instructions.py --keep DIR ...   # keep the callgrind.out files (for callgrind_annotate)

valgrind 3.19 cannot read the DWARF 5 that swiftc writes, so the driver is profiled from a copy
with the debug sections stripped (the symbol table stays: function names are all there).
"""
import argparse
import os
import re
import shutil
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRATCH = os.path.join(HERE, ".build")

# (Sluice operation, its Foundation counterpart) in table order.
ROWS = [
    ("validate", "foundation-validate"),
    ("batch-validate", "foundation-validate"),
    ("parse-tree", "foundation-validate"),
    ("foundation-validate", None),
    ("splice", "foundation-apply"),
    ("apply", "foundation-apply"),
    ("apply-tree", "foundation-apply"),
    ("foundation-apply", None),
    ("splice-split", "foundation-split"),
    ("split", "foundation-split"),
    ("split-tree", "foundation-split"),
    ("foundation-split", None),
    ("frame-encode", "foundation-frame-encode"),
    ("foundation-frame-encode", None),
    ("frame-decode", "foundation-frame-decode"),
    ("foundation-frame-decode", None),
    ("frame-encode-split", None),
    ("frame-decode-split", None),
    ("keen", "foundation-keen"),
    ("keen-tree", "foundation-keen"),
    ("foundation-keen", None),
]
CHEAP = {"validate", "frame-encode", "frame-decode", "foundation-frame-encode", "frame-encode-split", "frame-decode-split"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ops", nargs="*")
    ap.add_argument("--keep")
    args = ap.parse_args()
    subprocess.run(["swift", "build", "--scratch-path", SCRATCH, "-c", "release", "--product", "ProfileDriver"],
                   cwd=HERE, check=True, stdout=subprocess.DEVNULL)
    work = args.keep or tempfile.mkdtemp(prefix="sluice-callgrind-")
    os.makedirs(work, exist_ok=True)
    driver = os.path.join(work, "ProfileDriver")
    shutil.copy(os.path.join(SCRATCH, "release", "ProfileDriver"), driver)
    subprocess.run(["strip", "--strip-debug", driver], check=True)
    info = subprocess.run([driver, "info"], check=True, text=True, stdout=subprocess.PIPE).stdout
    sizes = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+): (\d+) bytes", info, re.M)}

    wanted = {op for op, _ in ROWS if not args.ops or op in args.ops or any(op.endswith(a) for a in args.ops)}
    wanted |= {f for op, f in ROWS if op in wanted and f}

    def count(op, inp, n):
        out = os.path.join(work, f"callgrind.out.{op}.{inp}.{n}")
        r = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", driver, op, inp, str(n)],
                           text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
        return int(re.search(r"Collected : (\d+)", r.stderr).group(1))

    per_op = {}
    for inp in ["large", "small"]:
        for op, _ in ROWS:
            if op not in wanted:
                continue
            n = (40 if op in CHEAP else 4) * (10 if inp == "small" else 1)
            per_op[(op, inp)] = (count(op, inp, 2 * n) - count(op, inp, n)) / n

    print("| operation | input | instructions/op | instructions/byte | Foundation ÷ Sluice |")
    print("|---|---|--:|--:|--:|")
    for inp in ["large", "small"]:
        for op, f in ROWS:
            if (op, inp) not in per_op:
                continue
            ir = per_op[(op, inp)]
            ratio = f"{per_op[(f, inp)] / ir:.1f}×" if f and (f, inp) in per_op else ""
            print(f"| {op} | {inp} ({sizes[inp]} B) | {ir:,.0f} | {ir / sizes[inp]:,.1f} | {ratio} |")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
