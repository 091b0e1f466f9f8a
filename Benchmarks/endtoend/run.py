#!/usr/bin/env python3
"""Sluice's end-to-end benchmark, with its baselines measured in the same run on the same payloads.

For each mode (send_as_batch true/false, 1 or N tenants) it starts a librdkafka mock cluster
(`kafka-out dev-cluster`, 3 brokers, in its own process), then on that cluster:
  1. Sluice's four processes, driven over HTTP by wrk (load.lua) at max load, then paced at 50% and
     25% of the rate it sustained end to end;
  2. the ceiling: raw_producer.c sending the messages Sluice produced (copied back from the topics:
     same keys, same bytes), as fast as it can;
  3. the peer: peer_forwarder.py (aiohttp + orjson + confluent-kafka), ack styles confirmed and
     queued, at max load;
  4. the HTTP ceiling: http_sink.c, which reads each request and answers 202 (nothing else), driven
     by the same wrk script at max load: no forwarder takes in more on this machine.
Accepted = 202s counted by wrk. Delivered = growth of the topics' high watermarks, counted until the
backlog has drained, over load time + drain time. CPU seconds (/proc/PID/stat) and peak RSS
(VmHWM, reset before each step) per process. Prints markdown tables; --record appends them to
docs/BENCHMARKS.md with the date, machine, commit and command.
"""
import argparse
import base64
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
sys.path.insert(0, str(HERE))
import payloads  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PYTHON_MODULES = {"aiohttp": "aiohttp", "orjson": "orjson", "confluent_kafka": "confluent-kafka", "uvloop": "uvloop"}


def say(*args):
    print("[bench]", *args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- dependencies

def ensure_deps():
    apt = [pkg for cmd, pkg in (("wrk", "wrk"), ("gcc", "gcc"), ("kcat", "kcat")) if not shutil.which(cmd)]
    if not Path("/usr/include/librdkafka/rdkafka.h").exists():
        apt.append("librdkafka-dev")
    if apt:
        say("installing system packages:", *apt)
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + apt, check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
    missing = [m for m in PYTHON_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        say("installing Python packages from", BENCH / "requirements.txt")
        pip = [sys.executable, "-m", "pip", "install", "-q", "-r", str(BENCH / "requirements.txt")]
        if subprocess.run(pip).returncode != 0:  # Debian's Python (PEP 668) needs this flag
            subprocess.run(pip + ["--break-system-packages"], check=True)
        importlib.invalidate_caches()


BINARIES = ["ingest", "router", "kafka-out", "keen-out"]


def check_binaries(bin_dir):
    """Returns when the binaries were last built; warns when sources changed since. (A build relinks
    only the executables whose inputs changed, so the newest binary is when the tree was built.)"""
    missing = [n for n in BINARIES if not (bin_dir / n).exists()]
    if missing:
        sys.exit(f"bench: {', '.join(missing)} not found in {bin_dir}: build first (swift build -c release)")
    built = max((bin_dir / n).stat().st_mtime for n in BINARIES)
    newer = [p for p in (ROOT / "Sources").rglob("*.swift") if p.stat().st_mtime > built]
    if newer:
        say(f"warning: {len(newer)} source files are newer than the binaries in {bin_dir} (e.g. {newer[0]})")
    return datetime.datetime.fromtimestamp(built, datetime.timezone.utc)


# ---------------------------------------------------------------- processes

class Proc:
    """A long-running process of the run, logging to a file, with its CPU time and peak RSS."""

    def __init__(self, name, argv, log_dir):
        self.name = name
        self.log = open(log_dir / f"{name}.log", "ab")
        self.popen = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self):
        return self.popen.poll() is None

    def cpu(self):
        try:
            fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError):
            return 0.0

    def reset_peak(self):
        try:
            Path(f"/proc/{self.popen.pid}/clear_refs").write_text("5")
        except OSError:
            pass

    def _status_mb(self, field):
        """A memory field of /proc/<pid>/status (VmRSS, VmHWM) in MB; 0 once the process is gone."""
        try:
            for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def rss_mb(self):
        return self._status_mb("VmRSS")

    def peak_mb(self):
        return self._status_mb("VmHWM")

    def stop(self, timeout=20):
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"warning: {self.name} did not exit within {timeout} s of SIGTERM; killing it")
                self.popen.kill()
                self.popen.wait()
        self.log.close()


def run_child(argv):
    """Runs a short-lived child to its end; returns (stdout, stderr, exit status). Its CPU time
    shows in child_cpu() once it is reaped."""
    p = subprocess.run(argv, capture_output=True, text=True)
    return p.stdout, p.stderr, p.returncode


def dev_cluster_command(path, command):
    """Sends one command to the dev cluster's control socket (kafka-out DevClusterControl)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(command.encode() + b"\n")
        answer = s.recv(256).decode().strip()
    if answer != "ok":
        raise RuntimeError(f"dev cluster: {command}: {answer}")


def child_cpu():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


INGEST_COUNTERS = {"sluice_ingest_router_refusals_total": "refused", "sluice_ingest_spool_read_back_total": "read_back",
                   "sluice_ingest_spool_commit_seconds_count": "commits",
                   "sluice_ingest_spool_committed_operations_total": "committed_operations"}
CHURN = ("refused", "read_back")


def ingest_counters(url):
    """Ingest's churn counters (router refusals, deliveries read back from the spool) and its spool's
    group commits (commits, operations committed), or {}."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as f:
            text = f.read().decode()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in INGEST_COUNTERS:
            found[INGEST_COUNTERS[name]] = float(value)
    return found


def group_size(r):
    """", spool commits N/s of M operations" from a step's ingest counters, or ""."""
    c = r.get("ingest", {})
    if not c.get("commits"):
        return ""
    return f"; spool commits {c['commits']:,.0f}/s of {c.get('committed_operations', 0) / c['commits']:.1f} operations each"


def wait_http(url, timeout, procs):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited ({p.popen.returncode}); see {p.log.name}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout} s")


# ---------------------------------------------------------------- one mode

class Mode:
    def __init__(self, opts, work, send_as_batch, tenants):
        self.opts, self.send_as_batch, self.tenants = opts, send_as_batch, tenants
        self.name = f"{'batch' if send_as_batch else 'event'}-{tenants}"
        self.dir = work / self.name
        self.dir.mkdir()
        self.results = []
        self.creds = [(f"bench-key-{i}", f"bench-secret-{i}") for i in range(tenants)]
        self.creds_file = self.dir / "credentials"
        self.creds_file.write_text("".join("Basic " + base64.b64encode(f"{k}:{s}".encode()).decode() + "\n"
                                           for k, s in self.creds))
        self.templates = self.dir / "templates"
        self.events_per_request, self.bytes_per_request = payloads.write_templates(
            self.templates, opts.mix_weights, opts.identities)
        # messages per request, and events per message, as produced
        self.msgs_per_request = 1 if send_as_batch else self.events_per_request
        self.events_per_msg = self.events_per_request if send_as_batch else 1
        self.msg_bytes = {}

    def topics(self, system):
        return [f"{system}-t{i}" for i in range(self.tenants)]

    # -- load and measurement

    def step(self, system, load, url, procs, rate=0.0, seconds=None, record=True, delivers=True):
        """Drives `url` with wrk for `seconds`, then waits until the backlog has drained (`delivers`:
        the system produces to its topics; the HTTP sink does not)."""
        o, c = self.opts, self.cluster
        seconds = seconds or o.duration
        topics = self.topics(system) if delivers else []
        # Files the harness wrote (the binaries' copies, ~200 MB; samples and the raw producer's
        # messages, tens of MB) would otherwise be written back by the kernel 30 s later, in the
        # middle of a step: the virtual disk then holds every fsync for 150-450 ms, and a paced
        # step's p99 measured the harness, not the system under test.
        os.sync()
        base = c.delivered(topics) if delivers else 0
        for p in procs:
            p.reset_peak()
        cpu0 = {p.name: p.cpu() for p in procs}
        child0 = child_cpu()
        counters0 = ingest_counters(url) if system == "sluice" else {}
        argv = ["wrk", "-t", str(o.wrk_threads), "-c", str(o.connections), "-d", f"{seconds}s", "--timeout", "30s",
                "-s", str(HERE / "load.lua"), url + "/v2/events", "--",
                str(self.templates), str(self.creds_file), f"{rate:.3f}", str(o.wrk_threads)]
        out, err, status = run_child(argv)
        wrk_cpu = child_cpu() - child0
        line = next((l for l in out.splitlines() if l.startswith("BENCH ")), None)
        if status != 0 or line is None:
            raise RuntimeError(f"wrk failed ({status}): {err.strip()}\n{out}")
        w = json.loads(line[6:])
        dur = w["duration_us"] / 1e6
        epr = w["events_sent"] / max(1, w["requests_sent"])
        expected = w["ok"] * (1 if self.send_as_batch else epr)
        slack = o.connections * (1 if self.send_as_batch else 50)
        r = {
            "system": system, "load": load, "rate": rate, "seconds": dur, "drain_s": 0.0,
            "req_s": w["completed"] / dur, "accepted_eps": w["ok"] * epr / dur,
            "p50": w["p50_us"] / 1e3, "p99": w["p99_us"] / 1e3, "p999": w["p999_us"] / 1e3,
            "not_202": w["other"] + w["socket_errors"], "statuses": w["statuses"],
        }
        if delivers:
            in_window = c.delivered(topics) - base
            drain, delivered = c.wait_delivered(topics, base, expected, slack, timeout=o.drain_timeout)
            r.update({
                "drain_s": drain, "delivered_msgs": delivered, "expected_msgs": expected,
                "delivered_eps": delivered * self.events_per_msg / (dur + drain),
                "window_eps": in_window * self.events_per_msg / dur,
                "msgs_s": delivered / (dur + drain),
            })
        else:
            r.update({"delivered_eps": None, "msgs_s": None, "mb_s": None,
                      "body_mb_s": w["ok"] * self.bytes_per_request / dur / 1e6})
        r["cpu"] = {p.name: (p.cpu() - cpu0[p.name], p.peak_mb()) for p in procs}
        r["cpu"]["wrk"] = (wrk_cpu, None)
        if counters0:
            after = ingest_counters(url)
            r["ingest"] = {k: (after.get(k, 0) - v) / (dur + r["drain_s"]) for k, v in counters0.items()}
        if delivers:
            if r["delivered_msgs"] < expected - slack:
                say(f"warning: {system} {load}: {r['delivered_msgs']} of {expected:.0f} expected messages arrived")
            say(f"{self.name} {system} {load}: accepted {r['accepted_eps']:,.0f} ev/s, delivered {r['delivered_eps']:,.0f} "
                f"ev/s (drain {r['drain_s']:.1f} s), p99 {r['p99']:.1f} ms, not 202: {r['not_202']}"
                + "".join(f", {k.replace('_', ' ')} {v:,.0f}/s" for k, v in r.get("ingest", {}).items() if k in CHURN)
                + group_size(r))
        else:
            say(f"{self.name} {system} {load}: {r['req_s']:,.0f} req/s, {r['body_mb_s']:.0f} MB/s of bodies, "
                f"p99 {r['p99']:.1f} ms, not 202: {r['not_202']}")
        if record:
            self.results.append(r)
        return r

    def soak(self, url, procs, rate):
        """A long paced step (--soak seconds at `rate`) sampling each process's RSS every 10 s:
        reports the growth per 10 minutes from a least-squares line over the samples after the first minute."""
        samples, done = [], threading.Event()

        def sample():
            start = time.monotonic()
            while not done.wait(10):
                samples.append((time.monotonic() - start, {p.name: p.rss_mb() for p in procs}))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            r = self.step("sluice", f"soak {self.opts.soak // 60} min at 50%", url, procs + [self.cluster_proc], rate=rate,
                          seconds=self.opts.soak, record=False)
        finally:
            done.set()
            sampler.join()
        later = [(t, v) for t, v in samples if t >= 60] or samples
        slopes = {}
        for p in procs:
            xs, ys = [t for t, _ in later], [v[p.name] for _, v in later]
            n = len(xs)
            if n < 2:
                continue
            mx, my = sum(xs) / n, sum(ys) / n
            var = sum((x - mx) ** 2 for x in xs)
            slopes[p.name] = (ys[0], ys[-1], max(ys), 600 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0)
        self.soak_result = {"step": r, "slopes": slopes, "samples": samples}
        say(f"{self.name} soak: " + ", ".join(f"{n} {a:.0f}→{b:.0f} MB ({sl:+.1f} MB/10 min)"
                                              for n, (a, b, _, sl) in slopes.items()))

    def sample_bytes(self, system, limit=2000):
        """Average key+value bytes of the messages `system` produced (a sample still on the brokers)."""
        _, avg = self.cluster.capture(self.topics(system), self.dir / f"{system}.sample", lambda t: t, limit=limit)
        self.msg_bytes[system] = avg

    # -- the systems

    def run(self):
        o = self.opts
        from kafkatools import Cluster
        all_topics = [t for s in ("sluice", "raw", "peerc", "peerq") for t in self.topics(s)]
        cluster = Proc("dev-cluster", [str(o.bin_dir / "kafka-out"), "dev-cluster", "--run-dir", str(self.dir),
                                       "--log-level", "notice", "--brokers", "3"]
                       + [a for t in all_topics for a in ("--topic", f"{t}:{o.partitions}")], self.dir)
        bootstrap_file = self.dir / "dev-cluster.bootstrap"
        deadline = time.monotonic() + 120
        while not bootstrap_file.exists():
            if not cluster.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the dev cluster did not start; see {cluster.log.name}")
            time.sleep(0.05)
        self.bootstrap = bootstrap_file.read_text().strip()
        if o.broker_rtt:
            dev_cluster_command(self.dir / "dev-cluster.control", f"rtt {o.broker_rtt}")
        self.cluster = Cluster(self.bootstrap, o.partitions)
        self.cluster_proc = cluster
        try:
            self.run_sluice()
            self.run_raw()
            for ack in o.peer_acks:
                self.run_peer(ack)
            if o.http_sink:
                self.run_sink()
        finally:
            self.cluster.close()
            cluster.stop()

    def run_sluice(self):
        o = self.opts
        port = free_port()
        config = self.dir / "sluice.yaml"
        lines = [f"ingest:\n  listen: 127.0.0.1:{port}\ntenants:"]
        for i, (key, secret) in enumerate(self.creds):
            lines.append(f"  t{i}:\n    api_key: {key}\n    api_secret: {secret}\n    destinations:\n"
                         f"      main: {{kind: kafka, bootstrap_servers: dev, plaintext: true, topic: sluice-t{i}, "
                         f"settings: {{send_as_batch: {str(self.send_as_batch).lower()}}}}}")
        config.write_text("\n".join(lines) + "\n")
        common = ["--run-dir", str(self.dir), "--config", str(config), "--log-level", o.log_level]
        if o.scheduling != "normal":
            common += ["--cpu-scheduling", o.scheduling]
        procs = [Proc("router", [str(o.bin_dir / "router")] + common, self.dir)]
        procs += [Proc(f"kafka-out-{i}", [str(o.bin_dir / "kafka-out"), "run", "--instance", f"kafka-out-{i}"] + common
                       + shlex.split(o.kafka_out_args),
                       self.dir) for i in range(o.kafka_outs)]
        procs.append(Proc("keen-out", [str(o.bin_dir / "keen-out")] + common, self.dir))
        spool = Path(tempfile.mkdtemp(prefix="sluice-spool-", dir="/dev/shm")) if o.spool_tmpfs else self.dir / "spool"
        procs.append(Proc("ingest", [str(o.bin_dir / "ingest"), "serve", "--spool-dir", str(spool)]
                          + common, self.dir))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(url + "/readyz", 60, procs)
            measured = procs + [self.cluster_proc]
            self.step("sluice", "warm-up", url, measured, seconds=o.warmup, record=False)
            top = self.step("sluice", "max", url, measured)
            # the rate it sustained end to end, in requests/s
            sustained = min(top["req_s"], top["msgs_s"] / self.msgs_per_request)
            for frac in o.paced:
                self.step("sluice", f"{int(frac * 100)}%", url, measured, rate=frac * sustained)
            if o.soak:
                self.soak(url, procs, 0.5 * sustained)
        finally:
            for p in reversed(procs):
                p.stop()
            if o.spool_tmpfs:
                shutil.rmtree(spool, ignore_errors=True)
        self.sample_bytes("sluice")

    def run_raw(self):
        """The ceiling: the messages Sluice produced (headers too), as fast as librdkafka sends them;
        then the same at Sluice's delivered rate, to show what librdkafka and the cluster cost there."""
        sample = self.dir / "raw.messages"
        n, avg = self.cluster.capture(self.topics("sluice"), sample, lambda t: "raw" + t[len("sluice"):])
        if n == 0:
            raise RuntimeError("no Sluice messages to replay for the raw producer")
        r = self.replay(sample, "raw", n)
        self.raw_info = r
        self.msg_bytes["raw"] = r["bytes"] / max(1, r["delivered"])
        say(f"{self.name} raw: {r['msgs_per_s']:,.0f} msgs/s, {r['mb_per_s']:.0f} MB/s ({n} distinct messages cycled)")
        h = self.replay(sample, "rawbare", n, flags=["-H"])
        say(f"{self.name} raw without headers: {h['msgs_per_s']:,.0f} msgs/s")
        sluice = next((x for x in self.results if x["system"] == "sluice" and x["load"] == "max"), None)
        if sluice and sluice["msgs_s"] > 0:
            p = self.replay(sample, "rawpaced", n, rate=sluice["msgs_s"])
            say(f"{self.name} raw at Sluice's rate: {p['msgs_per_s']:,.0f} msgs/s, its CPU {p['cpu_s']:.1f} s")
        t = self.replay(sample, "rawtarget", n, rate=0.25 * r["msgs_per_s"])
        say(f"{self.name} raw at 25% of the ceiling: {t['msgs_per_s']:,.0f} msgs/s, its CPU {t['cpu_s']:.1f} s")

    def replay(self, sample, system, distinct, rate=None, flags=()):
        o = self.opts
        base = self.cluster.delivered(self.topics("raw"))
        cpu0 = self.cluster_proc.cpu()
        out, err, status = run_child(o.baseline_prefix + [str(o.raw_producer), "-b", self.bootstrap, "-f", str(sample),
                                      "-s", str(min(o.duration, 10))] + (["-r", f"{rate:.0f}"] if rate else []) + list(flags))
        if status != 0:
            raise RuntimeError(f"raw_producer failed ({status}): {err.strip()} {out.strip()}")
        r = json.loads(out)
        counted = self.cluster.delivered(self.topics("raw")) - base
        if counted != r["delivered"]:
            say(f"warning: raw producer: {r['delivered']} delivery reports, {counted} messages on the brokers")
        self.results.append({
            "system": system, "load": {"raw": "max", "rawbare": "max", "rawpaced": "Sluice's max"}.get(system, "25% of max"), "seconds": r["seconds"], "drain_s": 0.0,
            "msgs_s": r["msgs_per_s"], "delivered_eps": r["msgs_per_s"] * self.events_per_msg, "mb_s": r["mb_per_s"],
            "cpu": {"raw producer": (r["cpu_s"], None), "dev-cluster": (self.cluster_proc.cpu() - cpu0, None)},
            "distinct": distinct,
        })
        return r

    def run_peer(self, ack):
        o = self.opts
        system = "peerc" if ack == "confirmed" else "peerq"
        tenants = self.dir / f"{system}.tenants.json"
        tenants.write_text(json.dumps([{"api_key": k, "api_secret": s, "topic": f"{system}-t{i}"}
                                       for i, (k, s) in enumerate(self.creds)]))
        port = free_port()
        peer = Proc(f"peer-{ack}", o.baseline_prefix + [sys.executable, str(BENCH / "baselines" / "peer_forwarder.py"),
                                    "--listen", f"127.0.0.1:{port}", "--bootstrap", self.bootstrap,
                                    "--tenants", str(tenants), "--mode", "batch" if self.send_as_batch else "event",
                                    "--ack", ack], self.dir)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(url + "/healthz", 30, [peer])
            measured = [peer, self.cluster_proc]
            self.step(system, "warm-up", url, measured, seconds=o.warmup, record=False)
            top = self.step(system, "max", url, measured)
            if o.pace_peers:
                sustained = min(top["req_s"], top["msgs_s"] / self.msgs_per_request)
                for frac in o.paced:
                    self.step(system, f"{int(frac * 100)}%", url, measured, rate=frac * sustained)
        finally:
            peer.stop()
        self.sample_bytes(system)

    def run_sink(self):
        o = self.opts
        port = free_port()
        sink = Proc("http-sink", o.baseline_prefix + [str(o.http_sink_binary), str(port)], self.dir)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(url + "/healthz", 30, [sink])
            self.step("sink", "warm-up", url, [sink], seconds=o.warmup, record=False, delivers=False)
            self.step("sink", "max", url, [sink], delivers=False)
        finally:
            sink.stop()


# ---------------------------------------------------------------- report

LABELS = {"sluice": "Sluice", "raw": "raw librdkafka (ceiling)", "peerc": "peer, ack after Kafka confirmed",
          "peerq": "peer, ack when queued", "sink": "HTTP ceiling (reads, answers 202)",
          "rawpaced": "raw librdkafka at Sluice's rate", "rawtarget": "raw librdkafka at the target rate",
          "rawbare": "raw librdkafka, no headers"}


def fmt(v, digits=0):
    return "–" if v is None else f"{v:,.{digits}f}"


def mode_report(m):
    o = m.opts
    lines = [f"### send_as_batch: {str(m.send_as_batch).lower()}, {m.tenants} tenant{'s' if m.tenants > 1 else ''}", "",
             f"Requests: {m.events_per_request:.1f} events and {m.bytes_per_request / 1024:.1f} KB on average "
             f"(mix {o.mix}, user_identities as {o.identities}); {o.connections} connections; {o.duration} s per step. "
             f"Messages: {m.events_per_msg:.1f} events each.", "",
             "| system | load | req/s | accepted ev/s | delivered ev/s | delivered msgs/s | delivered MB/s | drain s "
             "| p50 ms | p99 ms | p99.9 ms | not 202 |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in m.results:
        if "mb_s" not in r:
            r["mb_s"] = r["msgs_s"] * m.msg_bytes.get(r["system"], 0) / 1e6
        mb = r["mb_s"]
        load = r["load"] + (f" ({r['rate']:,.0f} req/s)" if r.get("rate") else "")
        status = fmt(r.get("not_202")) + (f" ({r['statuses']})" if r.get("statuses") else "")
        lines.append(f"| {LABELS[r['system']]} | {load} | {fmt(r.get('req_s'))} | {fmt(r.get('accepted_eps'))} "
                     f"| {fmt(r['delivered_eps'])} | {fmt(r['msgs_s'])} | {fmt(mb, 1)} | {fmt(r['drain_s'], 1)} "
                     f"| {fmt(r.get('p50'), 2)} | {fmt(r.get('p99'), 2)} | {fmt(r.get('p999'), 2)} "
                     f"| {status if not r['system'].startswith('raw') else '–'} |")
    by = {(r["system"], r["load"]): r for r in m.results}
    s, raw = by.get(("sluice", "max")), by.get(("raw", "max"))
    ratios = []
    if s and raw:
        ratios.append(f"Sluice ÷ raw producer: messages/s {100 * s['msgs_s'] / raw['msgs_s']:.1f}%, "
                      f"MB/s {100 * s['mb_s'] / raw['mb_s']:.1f}% (target ≥ 25%)")
        bare = by.get(("rawbare", "max"))
        if bare:
            ratios.append(f"Sluice ÷ raw producer without the headers Sluice adds: messages/s "
                          f"{100 * s['msgs_s'] / bare['msgs_s']:.1f}% (the headers cost the raw producer "
                          f"{100 * (1 - raw['msgs_s'] / bare['msgs_s']):.0f}% of its rate)")

    def cores(r, name):
        return r["cpu"][name][0] / (r["seconds"] + r["drain_s"]) if name in r["cpu"] else 0.0
    paced = by.get(("rawpaced", "Sluice's max"))
    kafka_out = sum(cores(s, n) for n in s["cpu"] if n.startswith("kafka-out")) if s else 0.0
    if s and paced:
        ratios.append(f"librdkafka at Sluice's rate (the raw producer paced at {paced['msgs_s']:,.0f} msgs/s, users' "
                      f"batches interleaved): raw producer {cores(paced, 'raw producer'):.2f} cores, cluster "
                      f"{cores(paced, 'dev-cluster'):.2f}; Sluice at max: kafka-out {kafka_out:.2f}, "
                      f"cluster {cores(s, 'dev-cluster'):.2f}")
    target = by.get(("rawtarget", "25% of max"))
    if target:
        ratios.append(f"librdkafka at the target rate (25% of the ceiling's messages/s, the same pattern): "
                      f"{target['msgs_s']:,.0f} msgs/s delivered; raw producer {cores(target, 'raw producer'):.2f} cores, "
                      f"cluster {cores(target, 'dev-cluster'):.2f} — of the machine's 2, before any HTTP, spool or routing")
    sink = by.get(("sink", "max"))
    if sink and raw:
        # what the sink took in, counted as Sluice would deliver it: a message per request (batches)
        # or per event, and the request bodies' bytes (a batch message is its request's batch)
        sink_msgs = sink["req_s"] * m.msgs_per_request
        ratios.append(f"HTTP ceiling (http_sink, the same wrk): {sink['req_s']:,.0f} req/s, {sink['body_mb_s']:.1f} MB/s of "
                      f"request bodies; ÷ raw producer: messages/s {100 * sink_msgs / raw['msgs_s']:.1f}%, "
                      f"MB/s {100 * sink['body_mb_s'] / raw['mb_s']:.1f}% (what any HTTP forwarder could reach here)")
    if sink and s:
        ratios.append(f"Sluice ÷ HTTP ceiling: requests/s accepted {100 * s['req_s'] / sink['req_s']:.1f}%, "
                      f"delivered {100 * s['msgs_s'] / (sink['req_s'] * m.msgs_per_request):.1f}%")
    for peer in ("peerc", "peerq"):
        p = by.get((peer, "max"))
        if s and p and p["delivered_eps"]:
            ratios.append(f"Sluice ÷ {LABELS[peer]}: delivered events/s {s['delivered_eps'] / p['delivered_eps']:.2f}× "
                          f"(goal ≥ 3×, bar ≥ 2×)")
    if s and s.get("ingest"):
        ratios.append("Sluice at max, ingest's churn: " + ", ".join(
            f"{k.replace('_', ' ')} {v:,.0f} deliveries/s" for k, v in s["ingest"].items() if k in CHURN) + group_size(s))
    half = by.get(("sluice", "50%"))
    if half:
        ratios.append(f"Sluice p99 at 50% load: {half['p99']:.2f} ms (target ≤ 10 ms)")
    peaks = [(peak, name) for r in m.results if r["system"] == "sluice"
             for name, (_, peak) in r["cpu"].items() if peak and name != "dev-cluster"]
    if peaks:
        ratios.append("Sluice's largest peak RSS: %.0f MB, %s (target ≤ 64 MB per process)" % max(peaks))
    soak = getattr(m, "soak_result", None)
    if soak:
        r = soak["step"]
        ratios.append(f"Soak: {r['load']} ({r['rate']:,.0f} req/s for {r['seconds']:.0f} s): accepted {r['accepted_eps']:,.0f} ev/s, "
                      f"delivered {r['delivered_eps']:,.0f} ev/s, p99 {r['p99']:.2f} ms, not 202: {r['not_202']}; RSS every 10 s, "
                      "growth from a least-squares line after the first minute (target: none): "
                      + ", ".join(f"{n} {a:.0f} → {b:.0f} MB (max {hi:.0f}, {sl:+.1f} MB per 10 min)"
                                  for n, (a, b, hi, sl) in soak["slopes"].items()))
    lines += [""] + [f"- {x}" for x in ratios]
    names = []
    for r in m.results:
        names += [n for n in r["cpu"] if n not in names]
    lines += ["", "CPU seconds over load + drain (cores busy on average), peak RSS MB:", "",
              "| system | load | wall s | " + " | ".join(names) + " |", "|---|---|--:|" + "--:|" * len(names)]
    for r in m.results:
        wall = r["seconds"] + r["drain_s"]
        cells = []
        for n in names:
            if n not in r["cpu"]:
                cells.append("")
                continue
            cpu, peak = r["cpu"][n]
            cells.append(f"{cpu:.1f} ({cpu / wall:.2f})" + (f", {peak:.0f} MB" if peak else ""))
        lines.append(f"| {LABELS[r['system']]} | {r['load']} | {wall:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fsync_cost(directory, n=200):
    """p50, p99 and max of fsync after a 16 KB write, in ms, on the filesystem of the spool."""
    path, times = Path(directory) / "fsync-probe", []
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(b"x" * 16384)
            f.flush()
            t = time.perf_counter()
            os.fsync(f.fileno())
            times.append((time.perf_counter() - t) * 1e3)
    path.unlink()
    times.sort()
    return times[n // 2], times[n * 99 // 100], times[-1]


def machine():
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0) / 2**20
    return f"{os.cpu_count()} × {model}, {mem:.0f} GiB, Linux {platform.release()}"


def commit():
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions():
    import confluent_kafka
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split(" [")[0].strip()
    debian = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "librdkafka-dev"], capture_output=True,
                            text=True).stdout.strip() or "?"
    ck = confluent_kafka.version()
    ck = ck[0] if isinstance(ck, tuple) else ck
    return (f"librdkafka {debian} (Debian) for Sluice and the raw producer; librdkafka {confluent_kafka.libversion()[0]} "
            f"bundled in confluent-kafka {ck} for the peer; Python {platform.python_version()}; {wrk}")


def report(modes, opts, started):
    head = [f"## {started:%Y-%m-%d %H:%M} UTC, commit {commit()}", "",
            f"- Machine: {machine()}", f"- Command: `{opts.command}`",
            f"- Sluice binaries: {os.path.relpath(opts.bin_origin, ROOT)}, built {opts.built:%Y-%m-%d %H:%M} UTC",
            f"- Versions: {versions()}",
            ("- Spool on tmpfs (/dev/shm, --spool-tmpfs): fsyncs cost nothing and nothing is durable; "
             "compare with a run on disk for the cost of the flushes" if opts.spool_tmpfs else
             "- fsync after a 16 KB write where the spool lives: p50 %.2f ms, p99 %.2f ms, max %.2f ms" % opts.fsync)]
    if opts.scheduling != "normal":
        head.append(f"- CPU scheduling: Sluice's processes and the baselines (raw producer, peer, HTTP ceiling) "
                    f"{opts.scheduling} (`--scheduling`); the dev cluster and wrk normal")
    if opts.kafka_out_args:
        head.append(f"- kafka-out run with `{opts.kafka_out_args}`")
    if opts.broker_rtt:
        head.append(f"- The dev cluster's brokers answer every request {opts.broker_rtt} ms late (--broker-rtt)")
    head.append("")
    return "\n".join(head + ["\n\n".join(mode_report(m) for m in modes), ""])


def record(text, path):
    path = Path(path)
    if not path.exists():
        path.write_text("# Benchmarks\n\nResults of `Benchmarks/run --record` (see Benchmarks/README.md), newest last. "
                        "Ratios between systems in one run are the numbers to compare; absolute numbers vary "
                        "with the machine and its neighbours.\n\n")
    with open(path, "a") as f:
        f.write("\n" + text)
    say("appended to", path)


# ---------------------------------------------------------------- main

def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a couple of seconds per step, one mode (for the test suite)")
    p.add_argument("--duration", type=int, help="seconds per measured step (default 20; quick: 2)")
    p.add_argument("--warmup", type=int, help="seconds of unreported load before each system (default 3; quick: 1)")
    p.add_argument("--modes", help="comma list of SENDAS:TENANTS, SENDAS batch or event "
                                   "(default batch:1,event:1,batch:50,event:50; quick: batch:1)")
    p.add_argument("--mix", default="large=1,small=1", help="request mix by weight: large (50 events) and small (1-5)")
    p.add_argument("--identities", choices=["map", "array"], default="map",
                   help="user_identities as the inbound map (Sluice rewrites it) or the outgoing array (forwarded as is)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--partitions", type=int, default=6, help="partitions per topic")
    p.add_argument("--broker-rtt", type=int, default=0, metavar="MS",
                   help="the dev cluster's brokers answer every request MS ms late (a remote cluster's round trip)")
    p.add_argument("--kafka-outs", type=int, default=1, help="kafka-out instances")
    p.add_argument("--kafka-out-args", default="", metavar="ARGS",
                   help="more arguments for each kafka-out (e.g. '--linger-ms 10')")
    p.add_argument("--paced", default="0.5,0.25", help="paced steps as fractions of the sustained max (quick: 0.5)")
    p.add_argument("--peer-acks", default="confirmed,queued")
    p.add_argument("--spool-tmpfs", action="store_true",
                   help="put Sluice's spool in /dev/shm: fsyncs cost nothing (NOT durable; shows what the disk's flushes cost)")
    p.add_argument("--no-http-sink", dest="http_sink", action="store_false",
                   help="skip the HTTP ceiling (http_sink.c at max load)")
    p.add_argument("--pace-peers", action="store_true", help="also run the peer at the paced fractions of its own max")
    p.add_argument("--soak", type=int, default=0, metavar="SECONDS",
                   help="after the paced steps, run Sluice at 50%% load this long sampling RSS (e.g. 600)")
    p.add_argument("--bin-dir", default=str(ROOT / ".build" / "release"))
    p.add_argument("--scheduling", choices=["normal", "batch"], default="normal",
                   help="CPU scheduling policy of Sluice's processes (--cpu-scheduling) and, the same way, of "
                        "the baselines (raw producer, peer, HTTP ceiling; batch: under chrt -b 0); the dev "
                        "cluster and wrk run normal")
    p.add_argument("--log-level", default="info", help="Sluice's log level")
    p.add_argument("--record", nargs="?", const=str(ROOT / "docs" / "BENCHMARKS.md"), metavar="FILE",
                   help="append the report to FILE (default docs/BENCHMARKS.md)")
    p.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs, samples)")
    o = p.parse_args()
    o.command = shlex.join(["Benchmarks/run"] + sys.argv[1:])
    o.duration = o.duration or (2 if o.quick else 20)
    o.warmup = o.warmup or (1 if o.quick else 3)
    o.modes = o.modes or ("batch:1" if o.quick else "batch:1,event:1,batch:50,event:50")
    o.paced = [float(x) for x in ("0.5" if o.quick and o.paced == "0.5,0.25" else o.paced).split(",") if x]
    o.peer_acks = [a for a in o.peer_acks.split(",") if a]
    o.mix_weights = payloads.parse_mix(o.mix)
    o.drain_timeout = 20 if o.quick else max(60, 3 * o.duration)
    o.bin_dir = Path(o.bin_dir).absolute()
    return o


def main():
    opts = parse_args()
    modes_spec = []
    for spec in opts.modes.split(","):
        kind, _, n = spec.partition(":")
        if kind not in ("batch", "event") or not n.isdigit() or int(n) < 1:
            sys.exit(f"bench: bad mode {spec!r} (expected e.g. batch:1 or event:50)")
        modes_spec.append((kind == "batch", int(n)))
    opts.built = check_binaries(opts.bin_dir)
    ensure_deps()
    started = datetime.datetime.now(datetime.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="sb-", dir="/tmp"))  # short: Unix socket paths live here
    say("work directory:", work)
    # a copy, so that a rebuild during the run cannot swap binaries under it
    (work / "bin").mkdir()
    for name in BINARIES:
        shutil.copy2(opts.bin_dir / name, work / "bin" / name)
    opts.bin_origin, opts.bin_dir = opts.bin_dir, work / "bin"
    opts.fsync = fsync_cost(work)
    opts.raw_producer = work / "raw_producer"
    subprocess.run(["gcc", "-O2", "-o", str(opts.raw_producer), str(BENCH / "baselines" / "raw_producer.c"),
                    "-lrdkafka"], check=True)
    opts.baseline_prefix = ["chrt", "-b", "0"] if opts.scheduling == "batch" else []
    if opts.scheduling != "normal":
        help_text = subprocess.run([str(opts.bin_dir / "ingest"), "serve", "--help"], capture_output=True, text=True).stdout
        if "--cpu-scheduling" not in help_text:
            sys.exit(f"bench: the binaries in {opts.bin_origin} have no --cpu-scheduling (built before session 21)")
    opts.http_sink_binary = work / "http_sink"
    subprocess.run(["gcc", "-O2", "-o", str(opts.http_sink_binary), str(BENCH / "baselines" / "http_sink.c")], check=True)
    modes, ok = [], False
    try:
        for send_as_batch, tenants in modes_spec:
            m = Mode(opts, work, send_as_batch, tenants)
            modes.append(m)
            m.run()
        ok = True
    finally:
        done = [m for m in modes if m.results]
        if done:
            text = report(done, opts, started)
            print(text)
            if opts.record and ok:
                record(text, opts.record)
            if opts.json:
                Path(opts.json).write_text(json.dumps([{"mode": m.name, "results": m.results,
                                                        "soak": getattr(m, "soak_result", None)} for m in done], indent=1))
        if opts.keep or not ok:
            say("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
