#!/usr/bin/env python3
"""Control-plane writes against a release build of the edge: what one write costs as the
state grows, how many writes a second the edge takes while it proxies, and how long a
restart takes on a large state.

Usage: python3 benches/control/writes.py [--sizes 1000,1000000] [--binary target/release/miosa-edge]

For each state size N (sandboxes over 10k workspaces, 2 preview ports each):
  1. the state is pushed whole (PUT /v1/state), and the edge's resident memory per
     sandbox is read from /proc;
  2. 2,000 one-object writes (PUT /v1/sandboxes/{id}, half new, half changed) from one
     client, one after the other: p50 / p99 as the client sees them (HTTP, check, log
     append, fsync, publish);
  3. 8 clients write as fast as they are answered for --seconds (writes/s); then, while
     wrk (1 thread, 32 connections) loads a public preview through the edge, the same
     clients write 1,000 a second between them; then wrk alone again: failed proxied
     requests, and the proxied p99 with and without the writes;
  4. the edge is killed (SIGKILL) and started again: the time until /readyz answers 200
     (the snapshot and the log records after it read and checked), the sandboxes it
     serves, and its resident memory per sandbox over an empty edge's.
Needs wrk and nginx for step 3 (benches/load/run.sh installs them). Bounded: every
loop ends by itself, and everything started is stopped at the end, also on failure.
"""
import argparse, http.client, json, os, re, shutil, signal, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "load"))
from run import ROOT, free_port, nginx_conf, wait_port  # noqa: E402
from put_1m import rss_kib  # noqa: E402

TOKEN = "bench-token-0123456789abcdef0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def state_json(n, origin_port):
    ws = [{"id": f"ws_{w}", "slug": f"team-{w}"} for w in range(10_000)]
    sb = [{"id": f"sb{i:08x}", "workspace": f"ws_{i % 10_000}", "address": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
           "previews": [{"port": 5173, "access": "public"}, {"port": 3000}]} for i in range(n)]
    sb.append({"id": "bench", "workspace": "ws_0", "address": "127.0.0.1", "previews": [{"port": origin_port, "access": "public"}]})
    return json.dumps({"workspaces": ws, "sandboxes": sb}, separators=(",", ":")).encode()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] if xs else float("nan")


class Edge:
    def __init__(self, binary, d, origin_port):
        self.binary, self.d = binary, d
        self.http, self.control = free_port(), free_port()
        self.cfg = os.path.join(d, "edge.toml")
        with open(self.cfg, "w") as f:
            f.write(f'[server]\nhttp = "127.0.0.1:{self.http}"\nstate_dir = "{d}/var"\nwatch_interval_ms = 0\nthreads = 1\n'
                    f'[control]\nlisten = "127.0.0.1:{self.control}"\nmax_body_bytes = 1073741824\n')
        self.p = None
        self.start()

    def start(self):
        env = dict(os.environ, MIOSA_EDGE_CONTROL_TOKEN=TOKEN, MIOSA_EDGE_LOG="warn")
        t0 = time.time()
        self.p = subprocess.Popen(["taskset", "-c", "0", self.binary, "run", "--config", self.cfg], stdout=subprocess.DEVNULL,
                                  env=env, start_new_session=True)
        while time.time() - t0 < 120:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.control, timeout=2)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return time.time() - t0
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("the edge did not become ready")

    def kill(self):
        if self.p:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()
            self.p = None

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.control, timeout=60)


def put(conn, path, body):
    conn.request("PUT", path, body=body, headers=HEADERS)
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"{path}: {r.status} {data[:200]!r}")


def sandbox(i, k):
    return json.dumps({"id": f"sb{i:08x}", "workspace": f"ws_{i % 10_000}", "address": f"10.9.{(k >> 8) & 255}.{k & 255}",
                       "previews": [{"port": 5173, "access": "public"}]}).encode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,1000000")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/miosa-edge"))
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="miosa-writes-")
    nginx = None
    try:
        www = os.path.join(d, "www")
        os.makedirs(www)
        with open(os.path.join(www, "1k"), "wb") as f:
            f.write(b"x" * 1024)
        o_port = free_port()
        if shutil.which("nginx") and shutil.which("wrk"):
            conf = nginx_conf(d, "origin", f"server {{ listen 127.0.0.1:{o_port}; root {www}; }}")
            nginx = subprocess.Popen(["taskset", "-c", "1", "nginx", "-c", conf, "-p", d], start_new_session=True)
            wait_port(o_port)
        rows = []
        for n in [int(x) for x in a.sizes.split(",")]:
            ed = os.path.join(d, f"edge-{n}")
            os.makedirs(ed)
            edge = Edge(a.binary, ed, o_port)
            try:
                before = rss_kib(edge.p.pid)
                empty_rss = before
                body = state_json(n, o_port)
                t0 = time.time()
                put(edge.conn(), "/v1/state", body)
                whole = time.time() - t0
                del body
                time.sleep(1)
                per = (rss_kib(edge.p.pid) - before) * 1024 / max(n, 1)
                c = edge.conn()
                lat = []
                for k in range(2000):
                    i = (k * 7919) % (2 * n)  # half existing ids, half new
                    t = time.perf_counter()
                    put(c, f"/v1/sandboxes/sb{i:08x}", sandbox(i, k))
                    lat.append((time.perf_counter() - t) * 1e6)
                row = {"n": n, "whole_put_s": whole, "bytes_per_sandbox": per, "p50_us": pct(lat, 0.5), "p99_us": pct(lat, 0.99)}
                # Let the background fold of the large first record finish first.
                time.sleep(3 if n < 100_000 else 15)

                def writers(rate, seconds, read_only=False):
                    stop = threading.Event()
                    counts = [0] * 8

                    def writer(w):
                        c = edge.conn()
                        k = 0
                        start = time.perf_counter()
                        while not stop.is_set() and k < 1_000_000:
                            if rate:
                                # Paced: this writer's share of `rate` writes a second.
                                due = start + k * 8 / rate
                                pause = due - time.perf_counter()
                                if pause > 0:
                                    time.sleep(pause)
                            i = 3 * n + w * 1_000_000 + k + (rate or 0) * 17
                            if read_only:
                                # The same client work against an endpoint that writes
                                # nothing: what the harness itself costs the proxy.
                                c.request("GET", "/healthz")
                                c.getresponse().read()
                            else:
                                put(c, f"/v1/sandboxes/sb{i:08x}", sandbox(i, k))
                            counts[w] += 1
                            k += 1

                    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
                    t0 = time.time()
                    for t in threads:
                        t.start()
                    time.sleep(seconds)
                    stop.set()
                    for t in threads:
                        t.join()
                    return sum(counts) / (time.time() - t0)

                row["writes_per_s"] = writers(None, a.seconds)
                if nginx:
                    host = f"{o_port}-bench.sandbox.localhost"

                    def load():
                        out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c32", f"-d{a.seconds}s", "--latency", "-H",
                                              f"Host: {host}", f"http://127.0.0.1:{edge.http}/1k"], capture_output=True, text=True,
                                             timeout=a.seconds + 30).stdout
                        m = re.search(r"99%\s+(\S+)", out)
                        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
                        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
                        return (m.group(1) if m else "?"), (int(bad.group(1)) if bad else 0) + (sum(map(int, sock.groups())) if sock else 0)

                    paced = {}
                    t = threading.Thread(target=lambda: paced.setdefault("rate", writers(1000, a.seconds)))
                    t.start()
                    row["p99_with_writes"], row["failed_with_writes"] = load()
                    t.join()
                    row["paced_writes_per_s"] = paced.get("rate", 0)
                    t = threading.Thread(target=lambda: writers(1000, a.seconds, read_only=True))
                    t.start()
                    row["p99_with_reads"], _ = load()
                    t.join()
                    row["p99_alone"], row["failed_alone"] = load()
                edge.kill()
                row["restart_s"] = edge.start()
                time.sleep(1)
                row["rss_per_sandbox"] = (rss_kib(edge.p.pid) - empty_rss) * 1024 / max(n, 1)
                c = edge.conn()
                c.request("GET", "/metrics", headers=HEADERS)
                m = re.search(r"^miosa_edge_sandboxes (\d+)", c.getresponse().read().decode(), re.M)
                row["served_after_restart"] = int(m.group(1)) if m else -1
                rows.append(row)
                print(json.dumps(row), flush=True)
            finally:
                edge.kill()
        print("\n| sandboxes | whole PUT s | one-object PUT p50 µs | p99 µs | writes/s (8 clients) | proxied p99 with 1,000 writes/s / 1,000 health checks/s / alone | failed | restart s (served) | resident B/sandbox |")
        print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for r in rows:
            print(f"| {r['n']:,} | {r['whole_put_s']:.2f} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['writes_per_s']:.0f} | "
                  f"{r.get('p99_with_writes', '-')} / {r.get('p99_with_reads', '-')} / {r.get('p99_alone', '-')} | {r.get('failed_with_writes', '-')} | "
                  f"{r['restart_s']:.2f} ({r['served_after_restart']:,}) | {r['rss_per_sandbox']:.0f} |")
    finally:
        if nginx:
            os.killpg(nginx.pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
