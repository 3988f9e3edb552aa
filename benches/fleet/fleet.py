#!/usr/bin/env python3
"""Fleet mode on one machine: three release edges on one redis-server (password,
append-only, as tests/edge/support/redis.rs runs it).

Usage: python3 benches/fleet/fleet.py [--sandboxes 1000000] [--rate 100] [--seconds 10]
                                       [--binary target/release/miosa-edge]

  1. convergence: one client writes --rate one-object writes a second (PUT
     /v1/sandboxes/{id}, each to a node chosen in turn) for --seconds; a watcher per node
     polls its /readyz (which answers the generation it serves) on a kept-alive
     connection and records when each generation appears. For every write: the time
     from its acknowledgement until each of the other two nodes serves it (p50, p99,
     max; the watchers' polling adds its own resolution, printed);
  2. Redis memory per sandbox: used_memory before and after --sandboxes sandboxes are
     pushed whole (PUT /v1/state on one node), at its peak (the record in the log) and
     once a node has kept the fleet's snapshot and trimmed the log;
  3. joining: a fourth node starts with an empty state directory on that fleet; the
     time until its /readyz answers 200 (it takes the fleet's snapshot before it opens
     its store, then follows the log), and the sandboxes it serves.
Bounded: every loop ends by itself; everything started is stopped at the end, also on
failure.
"""
import argparse, http.client, json, os, re, shutil, signal, socket, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "bench-token-0123456789abcdef0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
PASSWORD = "fleet-bench-password"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Redis:
    def __init__(self, d):
        self.port = free_port()
        self.dir = os.path.join(d, "redis")
        os.makedirs(self.dir)
        self.p = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", PASSWORD,
                                   "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--dir", self.dir,
                                   "--logfile", os.path.join(self.dir, "redis.log")])
        for _ in range(200):
            if self.cli("PING").strip() == "PONG":
                return
            time.sleep(0.05)
        sys.exit("redis-server did not start")

    def cli(self, *args):
        r = subprocess.run(["redis-cli", "-p", str(self.port), "--no-auth-warning", "-a", PASSWORD, *args],
                           capture_output=True, text=True)
        return r.stdout

    def used_memory(self):
        m = re.search(r"used_memory:(\d+)", self.cli("INFO", "memory"))
        return int(m.group(1)) if m else 0

    def url(self):
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()


class Edge:
    def __init__(self, binary, d, name, redis):
        self.dir = os.path.join(d, name)
        os.makedirs(self.dir)
        cfg = os.path.join(self.dir, "edge.toml")
        with open(cfg, "w") as f:
            f.write(f'[server]\nhttp = "127.0.0.1:0"\nstate_dir = "{self.dir}/var"\nwatch_interval_ms = 0\n'
                    f'[control]\nlisten = "127.0.0.1:0"\nmax_body_bytes = 1073741824\n'
                    f'[cluster]\nnode = "{name}"\nprefix = "bench"\n')
        env = dict(os.environ, MIOSA_EDGE_CONTROL_TOKEN=TOKEN, MIOSA_EDGE_LOG="warn", MIOSA_EDGE_REDIS_URL=redis.url())
        self.started = time.monotonic()
        self.log = open(os.path.join(self.dir, "edge.log"), "w")
        self.p = subprocess.Popen([binary, "run", "--config", cfg], stdout=subprocess.PIPE, stderr=self.log, env=env, text=True)
        line = self.p.stdout.readline()
        m = re.search(r"control=127\.0\.0\.1:(\d+)", line)
        if not m:
            sys.exit(f"edge {name} did not start: {line!r}")
        self.control = int(m.group(1))

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.control, timeout=600)

    def readyz(self, c=None):
        c = c or self.conn()
        c.request("GET", "/readyz")
        r = c.getresponse()
        body = json.loads(r.read() or b"{}")
        return r.status, body.get("generation", 0)

    def wait_ready(self, limit=120):
        t0 = time.monotonic()
        c = self.conn()
        while time.monotonic() - t0 < limit:
            try:
                status, g = self.readyz(c)
                if status == 200:
                    return g
            except (OSError, http.client.HTTPException):
                c = self.conn()
            time.sleep(0.005)
        sys.exit("edge never ready")

    def api(self, method, path, body=None, c=None):
        c = c or self.conn()
        c.request(method, path, body=body, headers=HEADERS)
        r = c.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else {}

    def stop(self):
        self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()


class Watcher(threading.Thread):
    """Polls one node's /readyz; records (time, generation) at each change."""

    def __init__(self, edge, until):
        super().__init__(daemon=True)
        self.edge, self.until, self.seen, self.polls = edge, until, [], 0

    def run(self):
        c = self.edge.conn()
        last = -1
        while time.monotonic() < self.until:
            try:
                _, g = self.edge.readyz(c)
            except (OSError, http.client.HTTPException):
                c = self.edge.conn()
                continue
            self.polls += 1
            if g != last:
                self.seen.append((time.monotonic(), g))
                last = g

    def first_at(self, g):
        for t, seen in self.seen:
            if seen >= g:
                return t
        return None


def convergence(edges, rate, seconds):
    for e in edges:
        e.api("PUT", "/v1/workspaces/ws_bench", json.dumps({"id": "ws_bench", "slug": "bench"}))
    until = time.monotonic() + seconds + 3
    watchers = [Watcher(e, until) for e in edges]
    for w in watchers:
        w.start()
    conns = [e.conn() for e in edges]
    acks = []  # (ack time, generation, writer index)
    n = int(rate * seconds)
    t0 = time.monotonic()
    for i in range(n):
        due = t0 + i / rate
        while time.monotonic() < due:
            time.sleep(min(0.001, max(0.0, due - time.monotonic())))
        k = i % len(edges)
        body = json.dumps({"id": f"conv{i}", "workspace": "ws_bench", "address": "10.9.0.1",
                           "previews": [{"port": 5173, "access": "public"}]})
        status, j = edges[k].api("PUT", f"/v1/sandboxes/conv{i}", body, conns[k])
        if status != 200:
            sys.exit(f"write {i} answered {status}: {j}")
        acks.append((time.monotonic(), j["generation"], k))
    for w in watchers:
        w.join()
    lags, missing = [], 0
    for t, g, k in acks:
        for j, w in enumerate(watchers):
            if j == k:
                continue
            at = w.first_at(g)
            if at is None:
                missing += 1
            else:
                lags.append(max(0.0, at - t) * 1000)
    polls = sum(w.polls for w in watchers) / len(watchers) / (seconds + 3)
    print(f"convergence, {n} writes at {rate}/s over {len(edges)} nodes (ack on the writer -> served by each other node):")
    print(f"  p50 {pct(lags, 50):.2f} ms  p99 {pct(lags, 99):.2f} ms  max {max(lags or [0]):.2f} ms  "
          f"never seen: {missing}  (each watcher polled {polls:.0f} times/s: ~{1000 / max(polls, 1):.2f} ms resolution)")
    return lags


def state_json(n):
    ws = [{"id": f"ws_{w}", "slug": f"team-{w}"} for w in range(10_000)]
    sb = [{"id": f"sb{i:08x}", "workspace": f"ws_{i % 10_000}", "address": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
           "previews": [{"port": 5173, "access": "public"}, {"port": 3000}]} for i in range(n)]
    return json.dumps({"workspaces": ws, "sandboxes": sb}, separators=(",", ":")).encode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sandboxes", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=100)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/miosa-edge"))
    a = ap.parse_args()
    if not shutil.which("redis-server"):
        sys.exit("redis-server is not installed: run scripts/deps")
    d = tempfile.mkdtemp(prefix="fleet-bench-")
    started = []
    redis = Redis(d)
    try:
        edges = [Edge(a.binary, d, f"edge-{i}", redis) for i in range(1, 4)]
        started += edges
        for e in edges:
            e.wait_ready()
        convergence(edges, a.rate, a.seconds)

        base = redis.used_memory()
        snap_at = redis.cli("GET", "bench:snap:at").strip()
        body = state_json(a.sandboxes)
        t0 = time.monotonic()
        status, j = edges[0].api("PUT", "/v1/state", body)
        took = time.monotonic() - t0
        if status != 200:
            sys.exit(f"PUT /v1/state answered {status}: {j}")
        g = j["generation"]
        peak = redis.used_memory()
        t1 = time.monotonic()
        for e in edges[1:]:
            c = e.conn()
            while time.monotonic() - t1 < 300 and e.readyz(c)[1] < g:
                time.sleep(0.01)
        followed = time.monotonic() - t1
        print(f"PUT /v1/state of {a.sandboxes} sandboxes on one node: {took:.2f} s ({len(body) / 1e6:.0f} MB); "
              f"the two others serve it {followed:.2f} s later")
        # The fleet's snapshot is kept once enough was written (64 MiB of records, or a
        # minute after a smaller write): wait for it, bounded.
        t2 = time.monotonic()
        while time.monotonic() - t2 < 90:
            head = redis.cli("GET", "bench:snap:at").strip()
            if head.isdigit() and head != snap_at and int(redis.cli("XLEN", "bench:log").strip() or 0) == 0:
                break
            time.sleep(0.5)
        steady = redis.used_memory()
        print(f"Redis used_memory: {base / 2**20:.1f} MiB before, {peak / 2**20:.1f} MiB with the write in the log "
              f"({(peak - base) / a.sandboxes:.0f} B per sandbox), {steady / 2**20:.1f} MiB once the snapshot is kept "
              f"and the log trimmed ({(steady - base) / a.sandboxes:.0f} B per sandbox); "
              f"log entries left: {redis.cli('XLEN', 'bench:log').strip()}")

        t3 = time.monotonic()
        joiner = Edge(a.binary, d, "edge-4", redis)
        started.append(joiner)
        jg = joiner.wait_ready()
        joined = time.monotonic() - joiner.started
        status, st = joiner.api("GET", "/v1/state")
        print(f"a fourth node with an empty state directory: ready {joined:.2f} s after its start "
              f"(generation {jg}, {len(st.get('sandboxes', []))} sandboxes served; the fleet is at {g})")
        _ = t3
    finally:
        for e in started:
            e.stop()
        redis.stop()
        if not os.environ.get("FLEET_BENCH_KEEP"):
            shutil.rmtree(d, ignore_errors=True)
        else:
            print(f"kept {d}")


if __name__ == "__main__":
    main()
