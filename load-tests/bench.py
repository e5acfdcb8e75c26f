#!/usr/bin/env python3
"""Macro benchmark: impression-server against the HTTP floor of this machine, in one run.

Builds release binaries of the server and of `examples/floor.rs` (a server that only reads the
body and responds with 200), drives both with the same wrk script, and reports:

- throughput ratio server/floor at 1 and at 20 impressions per batch (median of --repeat runs);
- p50 and p99 latency at about half the server's maximum rate, with 20 impressions per batch;
- resident memory per active session with --sessions sessions, against their encoded Avro size;
- the time from SIGINT to exit with those sessions active, writing to a local directory;
- CPU time per request of the server, the floor and wrk, and wrk's share of a core.

By default wrk runs on the first CPU the script may use and the servers on the others, so that
the load generator and the server under test do not compete for CPU time. `--cores
shared` lets all of them run on every CPU instead.

    python3 load-tests/bench.py
    python3 load-tests/bench.py --duration 10 --repeat 3 --sessions 100000 --json out.json

Needs wrk (Debian package `wrk`), fastavro and cramjam. Every server listens on 127.0.0.1.
"""

import argparse
import glob
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fastavro

import harness

ROOT = Path(__file__).resolve().parent.parent
WRK_SCRIPT = ROOT / "load-tests" / "wrk" / "collect.lua"
# Connections of the maximum-rate runs; enough to keep both cores of the server busy.
MAX_RATE_CONNECTIONS = 32
# Pause of each connection between requests in the half-rate run, in milliseconds. It is short
# so that the rate needs few connections. With 10 ms the rate took about 250 connections, whose
# requests went out in bursts, and the floor's own p99 passed 5 ms at 19,000 requests a second.
PACED_DELAY_MS = 2
# Seconds of the run that measures the rate of one paced connection.
PACED_TRIAL_SECONDS = 3
# Slowest rate of opening sessions that the sessions run allows for. wrk stops sending once every
# session is open but still runs to the end of its duration, so the duration is bounded by this
# rate. With the CPUs split, 100,000 sessions opened in about 3 s on a 2-core machine.
MIN_SESSIONS_PER_SECOND = 2_000
# Items of one benchmark session: what one k6 visit leaves (a page of 5, one reply, 3 events).
SESSION_IMPRESSIONS = 6
SESSION_EVENTS = 3


def main():
    args = parse_args()
    layout = Layout.choose(args.cores)
    log("building release binaries (a few minutes the first time)")
    # Two builds: one that includes an example also enables the features of the development
    # dependencies, so the server would not be the binary that users build.
    for target in (["--bin", "impression-server"], ["--example", "floor"]):
        subprocess.run(["cargo", "build", "--release", "--quiet", *target], cwd=ROOT, check=True)
    release = ROOT / "target" / "release"
    server_bin, floor_bin = release / "impression-server", release / "examples" / "floor"

    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cores": len(os.sched_getaffinity(0)), "layout": layout.describe(),
              "load_before": load_average()}
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        work = Path(work)
        if "throughput" in parts:
            report["runs"] = throughput(server_bin, floor_bin, work, layout, args)
        if "latency" in parts:
            if args.paced_rate:
                rate = args.paced_rate
            elif "throughput" in parts:
                rate = statistics.median(r["rps"] for r in report["runs"]["server_20"]) / 2
            else:
                sys.exit("bench: --parts latency without throughput needs --paced-rate")
            report["paced"] = {}
            for name, binary in (("floor", floor_bin), ("server", server_bin)):
                report["paced"][name] = paced(binary, name == "server", work, layout, rate,
                                              args.duration, args.paced_delay_ms)
                log(f"{name} paced: {report['paced'][name]}")
        if "sessions" in parts:
            report["sessions"] = sessions_run(server_bin, work, layout, args.sessions)
            log(f"sessions: {report['sessions']}")
    report["load_after"] = load_average()

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per load run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per maximum-rate figure")
    parser.add_argument("--sessions", type=int, default=100_000,
                        help="active sessions for the memory and shutdown figures")
    parser.add_argument("--cores", choices=("split", "shared"), default="split",
                        help="split: wrk on the first CPU, the servers on the others (default); "
                             "shared: all of them on every CPU")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--parts", default="throughput,latency,sessions",
                        help="comma-separated figures to take (default: all three)")
    parser.add_argument("--paced-rate", type=float,
                        help="request rate of the latency run (default: half the server's "
                             "maximum rate with 20 impressions a batch)")
    parser.add_argument("--paced-delay-ms", type=int, default=PACED_DELAY_MS,
                        help="pause of each connection between requests in the latency run "
                             f"(default: {PACED_DELAY_MS})")
    return parser.parse_args()


class Layout:
    """The CPUs that wrk and the servers under test may run on. None means every CPU this script
    may use."""

    def __init__(self, generator, servers):
        self.generator, self.servers = generator, servers

    @staticmethod
    def choose(cores):
        if cores == "shared":
            return Layout(None, None)
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            sys.exit("bench: --cores split needs at least 2 CPUs; use --cores shared")
        return Layout({allowed[0]}, set(allowed[1:]))

    def describe(self):
        if self.generator is None:
            return f"wrk and the servers share CPU {cpu_list(os.sched_getaffinity(0))}"
        return (f"wrk on CPU {cpu_list(self.generator)}, "
                f"the servers on CPU {cpu_list(self.servers)}")


def cpu_list(cpus):
    return ",".join(str(cpu) for cpu in sorted(cpus))


def throughput(server_bin, floor_bin, work, layout, args):
    """Runs floor and server alternately at their maximum rate, --repeat times each."""
    runs = {}
    for impressions in (1, 20):
        for name in ("floor", "server"):
            runs[f"{name}_{impressions}"] = []
        for attempt in range(args.repeat):
            # Alternate the two, so a change in the machine's load hits both alike.
            for name, binary in (("floor", floor_bin), ("server", server_bin)):
                result = max_rate(binary, name == "server", work, layout, impressions,
                                  args.duration, f"r{impressions}x{attempt}")
                runs[f"{name}_{impressions}"].append(result)
                log(f"{name} {impressions} impressions: {result['rps']:.0f} req/s")
    return runs


def max_rate(binary, is_server, work, layout, impressions, duration, run_id):
    with running(binary, is_server, work, layout) as (addr, process):
        cpu_before = cpu_seconds(process.pid)
        result = wrk(addr, layout, MAX_RATE_CONNECTIONS, duration,
                     [impressions, 0, 5000, 0, 0, run_id])
        cpu = cpu_seconds(process.pid) - cpu_before
    # CPU time per request depends less on what else the shared machine runs than the rate does.
    result["cpu_us_per_request"] = round(cpu * 1e6 / max(result["requests"], 1), 1)
    return result


def paced(binary, is_server, work, layout, rate, duration, delay_ms):
    """Runs at about `rate` requests a second with 20 impressions a batch.

    Each connection waits `delay_ms` after a response, so it sends fewer requests a second
    than the delay alone allows. A short first run measures how many, and the measured run
    opens as many connections as `rate` then needs.
    """
    # The two runs differ in run id, so the measured run sends no id of the trial again: the
    # server would drop those as duplicates and do less work than for new items.
    def script_args(run_id):
        return [20, 0, 5000, delay_ms, 0, run_id]

    connections = max(1, round(rate * delay_ms / 1000))
    with running(binary, is_server, work, layout) as (addr, _):
        trial = wrk(addr, layout, connections, PACED_TRIAL_SECONDS, script_args("paced-trial"))
        per_connection = max(trial["rps"] / connections, 1.0)
        connections = max(1, round(rate / per_connection))
        result = wrk(addr, layout, connections, duration, script_args("paced"))
    result["target_rps"] = round(rate)
    result["connections"] = connections
    return result


def sessions_run(binary, work, layout, sessions):
    """Opens `sessions` sessions, measures resident memory, then the SIGINT to exit time."""
    output = work / "sessions-output"
    with running(binary, True, work, layout, output=output) as (addr, server):
        time.sleep(0.5)
        rss_before = resident_bytes(server.pid)
        # One request per device; the first `sessions` responses open one session each.
        wrk(addr, layout, 16, 5 + sessions // MIN_SESSIONS_PER_SECOND,
            [SESSION_IMPRESSIONS, SESSION_EVENTS, sessions, 0, sessions, "mem"])
        active = json.loads(http_get(addr, "/v1/sessions/count"))["activeSessions"]
        if active < sessions:
            log(f"warning: {active} of {sessions} sessions opened before wrk's run ended")
        time.sleep(1)
        rss_after = resident_bytes(server.pid)
        exit_status, exit_seconds = harness.stop(server)

    files = glob.glob(str(output / "incoming-logs" / "**" / "*.avro"), recursive=True)
    file_bytes = sum(os.path.getsize(path) for path in files)
    records = 0
    encoded_bytes = 0
    schema = None
    for path in files:
        with open(path, "rb") as handle:
            reader = fastavro.reader(handle)
            schema = schema or fastavro.parse_schema(reader.writer_schema)
            for record in reader:
                records += 1
                buffer = io.BytesIO()
                fastavro.schemaless_writer(buffer, schema, record)
                encoded_bytes += buffer.tell()
    per_session = (rss_after - rss_before) / max(active, 1)
    encoded_per_session = encoded_bytes / max(records, 1)
    return {"active": active, "records": records, "rss_before": rss_before,
            "rss_after": rss_after, "rss_per_session": round(per_session),
            "encoded_per_session": round(encoded_per_session),
            "file_bytes_per_session": round(file_bytes / max(records, 1)),
            "memory_ratio": round(per_session / max(encoded_per_session, 1), 2),
            "exit_status": exit_status, "sigint_to_exit_s": round(exit_seconds, 2)}


class running:
    """Starts a server on 127.0.0.1 and stops it on leaving; yields its address and process."""

    def __init__(self, binary, is_server, work, layout, output=None):
        self.binary, self.is_server, self.work, self.layout = binary, is_server, work, layout
        self.output = output or Path(tempfile.mkdtemp(dir=work, prefix="output-"))

    def __enter__(self):
        if self.is_server:
            command = [str(self.binary), "--listen", "127.0.0.1:0", "--output", str(self.output),
                       "--server-id", "bench"]
        else:
            command = [str(self.binary), "127.0.0.1:0"]
        log_path = Path(tempfile.mkdtemp(dir=self.work, prefix="server-")) / "server.log"
        env = dict(os.environ, RUST_LOG="warn,impression_server=info")
        self.process, addr = harness.start(command, log_path, env=env, cpus=self.layout.servers)
        return addr, self.process

    def __exit__(self, *exc):
        harness.stop(self.process)


def wrk(addr, layout, connections, duration, script_args):
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
               "-s", str(WRK_SCRIPT), f"http://{addr}", "--", *map(str, script_args)]
    started = time.monotonic()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    completed = subprocess.run(command, capture_output=True, text=True, check=True,
                               timeout=duration + 60, preexec_fn=harness.pin_to(layout.generator))
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    elapsed = time.monotonic() - started
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"wrk printed no summary: {completed.stdout}{completed.stderr}")
    result = json.loads(lines[-1])
    # wrk's one thread bounds the rate it can send, so the figures show how much of a core it got
    # and what one request cost it.
    wrk_cpu = ((children_after.ru_utime + children_after.ru_stime)
               - (children_before.ru_utime + children_before.ru_stime))
    result["wrk_cpu_us_per_request"] = round(wrk_cpu * 1e6 / max(result["requests"], 1), 1)
    result["wrk_core_share"] = round(wrk_cpu / elapsed, 2)
    if result["not_200"] or result["errors"]:
        log(f"warning: {result['not_200']} answers were not 200, {result['errors']} errors")
    return result


def http_get(addr, path):
    import urllib.request
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=10) as response:
        return response.read().decode()


def cpu_seconds(pid):
    """Returns the user and system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resident_bytes(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def load_average():
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def log(message):
    print(message, file=sys.stderr, flush=True)


def print_table(report):
    print(f"date {report['date']}, {report['layout']}, "
          f"load average before {report['load_before']}, after {report['load_after']}")
    runs = report.get("runs")
    if runs:
        print()
        print("| impressions per batch | floor req/s | server req/s | server/floor "
              "| floor CPU us/req | server CPU us/req | floor/server CPU |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
    for impressions in (1, 20) if runs else ():
        floor = runs[f"floor_{impressions}"]
        server = runs[f"server_{impressions}"]
        floor_rps = statistics.median(r["rps"] for r in floor)
        server_rps = statistics.median(r["rps"] for r in server)
        floor_cpu = statistics.median(r["cpu_us_per_request"] for r in floor)
        server_cpu = statistics.median(r["cpu_us_per_request"] for r in server)
        print(f"| {impressions} | {floor_rps:.0f} | {server_rps:.0f} | "
              f"{server_rps / floor_rps:.2f} | {floor_cpu:.1f} | {server_cpu:.1f} | "
              f"{floor_cpu / server_cpu:.2f} |")
    if runs:
        print_load_generator(runs)
    if "paced" in report:
        print_paced(report["paced"])
    if "sessions" in report:
        print_sessions(report["sessions"])


def print_load_generator(runs):
    print()
    print("| impressions per batch | wrk CPU us/req, floor | wrk CPU us/req, server "
          "| wrk's share of a core, floor | wrk's share of a core, server |")
    print("| --- | --- | --- | --- | --- |")
    def median(key, results):
        return statistics.median(r[key] for r in results)

    for impressions in (1, 20):
        floor = runs[f"floor_{impressions}"]
        server = runs[f"server_{impressions}"]
        print(f"| {impressions} | {median('wrk_cpu_us_per_request', floor):.1f} | "
              f"{median('wrk_cpu_us_per_request', server):.1f} | "
              f"{median('wrk_core_share', floor):.2f} | {median('wrk_core_share', server):.2f} |")


def print_paced(paced):
    print()
    print("| paced, 20 impressions | target req/s | achieved req/s | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, result in paced.items():
        print(f"| {name} | {result['target_rps']} | {result['rps']:.0f} | "
              f"{result['p50_us'] / 1000:.2f} | {result['p99_us'] / 1000:.2f} |")


def print_sessions(sessions):
    print()
    print(f"{sessions['active']} active sessions: resident {sessions['rss_per_session']} B/session, "
          f"encoded Avro {sessions['encoded_per_session']} B/session "
          f"(file with snappy {sessions['file_bytes_per_session']} B/session), "
          f"ratio {sessions['memory_ratio']}; SIGINT to exit {sessions['sigint_to_exit_s']} s "
          f"(exit status {sessions['exit_status']}, {sessions['records']} records written)")


if __name__ == "__main__":
    main()
