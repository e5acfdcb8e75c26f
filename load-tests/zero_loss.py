#!/usr/bin/env python3
"""Zero-loss check: every item the server acknowledged is in its Avro output exactly once.

Starts a fresh server on 127.0.0.1 with a temporary output directory, runs a k6 scenario that
logs every acknowledged batch, sends SIGINT when k6 ends, reads the partition files back with
fastavro and compares. Prints one summary line; exits 1 on any mismatch or failure.

    python3 load-tests/zero_loss.py --build
    python3 load-tests/zero_loss.py --script load-tests/load.js --env RATE=100 --env DURATION=30s

Needs k6 and fastavro (and cramjam for the default snappy codec) on the path.
"""

import argparse
import collections
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import fastavro

import harness

ROOT = Path(__file__).resolve().parent.parent


def main():
    args = parse_args()
    if args.build:
        profile = [] if args.debug else ["--release"]
        subprocess.run(["cargo", "build", "--quiet", "--bin", "impression-server", *profile],
                       cwd=ROOT, check=True)
    binary = Path(args.binary or ROOT / "target" / ("debug" if args.debug else "release")
                  / "impression-server")
    if not binary.exists():
        fail(f"server binary {binary} not found; build it or pass --build")

    with tempfile.TemporaryDirectory(prefix="zero-loss-") as work:
        work = Path(work)
        result = run_check(args, binary, work)
        if not result["ok"] and args.keep:
            kept = Path(tempfile.mkdtemp(prefix="zero-loss-kept-"))
            os.rename(work / "output", kept / "output")
            os.rename(work / "server.log", kept / "server.log")
            print(f"kept the output and server log in {kept}", file=sys.stderr)
    print(result["summary"])
    sys.exit(0 if result["ok"] else 1)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", default=str(ROOT / "load-tests" / "smoke.js"),
                        help="k6 script to run (default: load-tests/smoke.js)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the k6 script; repeatable")
    parser.add_argument("--binary", help="server binary (default: target/release/impression-server)")
    parser.add_argument("--build", action="store_true", help="build the server binary first")
    parser.add_argument("--debug", action="store_true", help="use the debug build")
    parser.add_argument("--session-timeout", default="2s",
                        help="server session timeout, short so sessions also close by inactivity")
    parser.add_argument("--codec", default="snappy", help="server Avro codec")
    parser.add_argument("--k6-timeout", type=int, default=600,
                        help="seconds after which k6 is stopped (default 600)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the output and server log when the check fails")
    return parser.parse_args()


def run_check(args, binary, work):
    output = work / "output"
    log_path = work / "server.log"
    acks_path = work / "acks.jsonl"
    try:
        server, addr = harness.start(
            [str(binary), "--listen", "127.0.0.1:0", "--output", str(output),
             "--session-timeout", args.session_timeout, "--codec", args.codec,
             "--server-id", "zero-loss"], log_path)
    except RuntimeError as err:
        fail(str(err))
    try:
        k6_status = run_k6(args, f"http://{addr}", acks_path)
    finally:
        exit_status, exit_seconds = harness.stop(server)

    problems = []
    if k6_status != 0:
        problems.append(f"k6 exited {k6_status}")
    if exit_status != 0:
        problems.append(f"server exited {exit_status}")
    leftovers = [p for p in glob.glob(str(output / "**" / "*"), recursive=True)
                 if p.endswith(".partial")]
    if leftovers:
        problems.append(f"{len(leftovers)} unfinished files left in staging")

    acks = read_acks(acks_path)
    stored = read_output(output)
    problems.extend(compare(acks, stored))
    summary = (f"zero-loss: {'ok' if not problems else 'FAILED'}: "
               f"{acks['batches']} batches acknowledged, {len(acks['owner'])} items acknowledged "
               f"({acks['duplicates']} duplicates answered), {stored['records']} sessions and "
               f"{sum(stored['count'].values())} items in {stored['files']} files, "
               f"SIGINT to exit {exit_seconds:.2f} s")
    if problems:
        summary += "; " + "; ".join(problems)
    return {"ok": not problems, "summary": summary}


def run_k6(args, base_url, acks_path):
    env = dict(os.environ, BASE_URL=base_url, RECORD_ACKS="1")
    for pair in args.env:
        name, _, value = pair.partition("=")
        env[name] = value
    command = ["k6", "run", "--quiet", "--no-usage-report", "--log-format=raw",
               f"--console-output={acks_path}", args.script]
    try:
        return subprocess.run(command, env=env, timeout=args.k6_timeout,
                              stdout=sys.stderr).returncode
    except subprocess.TimeoutExpired:
        return f"timeout after {args.k6_timeout} s"


def read_acks(path):
    """Returns the acknowledged items: their device, and the server's counts."""
    owner = {}
    batches = accepted = duplicates = 0
    sent_twice = collections.Counter()
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if not line.startswith("{"):
                continue
            ack = json.loads(line)
            batches += 1
            accepted += ack["accepted"]["impressions"] + ack["accepted"]["events"]
            duplicates += ack["duplicates"]
            for item_id in ack["impressions"] + ack["events"]:
                if item_id in owner:
                    sent_twice[item_id] += 1
                owner[item_id] = ack["ack"]
    return {"owner": owner, "batches": batches, "accepted": accepted,
            "duplicates": duplicates, "sent_twice": sum(sent_twice.values())}


def read_output(output):
    """Counts every impression and event id in the Avro files, with the device it was under."""
    count = collections.Counter()
    device = {}
    records = 0
    files = sorted(glob.glob(str(output / "incoming-logs" / "ds=*" / "hh=*" / "*.avro")))
    for path in files:
        with open(path, "rb") as handle:
            for record in fastavro.reader(handle):
                records += 1
                for item in record["impressions"]:
                    count[item["impression_id"]] += 1
                    device[item["impression_id"]] = record["device_id"]
                for item in record["events"]:
                    count[item["event_id"]] += 1
                    device[item["event_id"]] = record["device_id"]
    return {"count": count, "device": device, "records": records, "files": len(files)}


def compare(acks, stored):
    problems = []
    owner, count = acks["owner"], stored["count"]
    missing = [item for item in owner if count[item] == 0]
    repeated = [item for item, n in count.items() if n > 1]
    unexpected = [item for item in count if item not in owner]
    misplaced = [item for item in owner if count[item] and stored["device"][item] != owner[item]]
    for name, items in [("missing", missing), ("stored more than once", repeated),
                        ("stored but never acknowledged", unexpected),
                        ("stored under another device", misplaced)]:
        if items:
            problems.append(f"{len(items)} items {name}, e.g. {items[:3]}")

    # Every retried item must have been reported as a duplicate, and nothing else.
    if acks["accepted"] != len(owner):
        problems.append(f"the server accepted {acks['accepted']} items but "
                        f"{len(owner)} distinct items were acknowledged")
    if acks["duplicates"] != acks["sent_twice"]:
        problems.append(f"the server answered {acks['duplicates']} duplicates for "
                        f"{acks['sent_twice']} items sent again")
    if not owner:
        problems.append("no item was acknowledged")
    return problems


def fail(message):
    print(f"zero-loss: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
