#!/usr/bin/env python3
"""Storage benchmark (issue 18): public objects served by the edge from an S3-compatible
store, against proxying the same bytes from the same store as an origin.

Run through benches/load/run.sh storage (it installs nginx and wrk and builds the release
binary); moto_server comes from scripts/deps. Starts, all on loopback:
  - store:  moto_server, holding bucket `bench-public` (public) with objects of 1 KiB,
            and one of --big-mib MiB;
  - edge:   miosa-edge, 1 worker thread, pinned to CPU 0, with [storage] on the store,
            bucket alias `bench`, and a deployment `raw` whose instance is the store
            itself (so `raw.bench.apps.localhost/bench-public/1k` is the same object
            through the same store, proxied: one upstream exchange either way);
  - nginx:  one process on CPU 0 proxying that same path to the store (keep-alive).
wrk and the store share CPU 1. Scenarios, each bounded (--seconds), alternately:
  S1. GET of the 1 KiB public object: edge (object read, SigV4-signed, streamed) vs the
      edge proxying the same object vs nginx proxying it. The figure is each proxy's own
      CPU time per request (utime+stime from /proc over requests served).
  S2. The --big-mib object to a client reading at --slow-mbps MB/s: the edge's peak RSS
      growth (VmHWM) while it streams, and the bytes received.
moto is a Python server: its throughput bounds req/s (not the edge's CPU per request,
which is what is compared). Every process is stopped at the end, also on failure.
"""
import argparse, http.client, os, shutil, socket, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import CLK, ROOT, Procs, cpu_ticks, free_port, nginx_conf, wait_port, wrk  # noqa: E402

TOKEN = "storage-bench-token-0123456789abcdef"


def http_do(port, method, path, host, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request(method, path, body=body, headers=dict({"Host": host}, **(headers or {})))
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def vm(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def slow_get(port, host, path, mbps, limit_s):
    """Reads a response at about `mbps` MB/s; returns bytes of body received."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    got, t0, chunk = 0, time.monotonic(), 64 * 1024
    head = b""
    while True:
        data = s.recv(chunk)
        if not data:
            break
        if not head.endswith(b"\r\n\r\n") and b"\r\n\r\n" not in head:
            head += data
            if b"\r\n\r\n" in head:
                got += len(head.split(b"\r\n\r\n", 1)[1])
            continue
        got += len(data)
        # Pace: sleep until the bytes so far match the rate.
        ahead = got / (mbps * 1e6) - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
        if time.monotonic() - t0 > limit_s:
            break
    s.close()
    return head.split(b"\r\n", 1)[0].decode(errors="replace"), got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--big-mib", type=int, default=100)
    ap.add_argument("--slow-mbps", type=float, default=20.0)
    ap.add_argument("--edge", default=os.path.join(ROOT, "target/release/miosa-edge"))
    a = ap.parse_args()
    for tool in ["nginx", "wrk", "taskset", "moto_server"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run benches/load/run.sh (and scripts/deps for moto_server)")

    d = tempfile.mkdtemp(prefix="miosa-storage-bench-")
    procs = Procs()
    try:
        s_port, e_port, c_port, n_port = (free_port() for _ in range(4))
        env = dict(os.environ, S3_IGNORE_SUBDOMAIN_BUCKETNAME="true")
        procs.start("store", ["moto_server", "-H", "127.0.0.1", "-p", str(s_port)], 1, env=env)
        wait_port(s_port)
        store_host = f"127.0.0.1:{s_port}"
        assert http_do(s_port, "PUT", "/bench-public", store_host)[0] == 200
        assert http_do(s_port, "PUT", "/bench-public/1k", store_host, b"x" * 1024,
                       {"Content-Type": "text/plain", "x-amz-acl": "public-read"})[0] == 200  # readable unsigned: the origin case
        big = os.urandom(1 << 20) * a.big_mib
        assert http_do(s_port, "PUT", "/bench-public/big", store_host, big, {"Content-Type": "application/octet-stream"})[0] == 200

        edge_conf = os.path.join(d, "edge.toml")
        with open(edge_conf, "w") as f:
            f.write(f"""[server]
http = "127.0.0.1:{e_port}"
state_dir = "{d}/var"
threads = 1
watch_interval_ms = 0
[control]
listen = "127.0.0.1:{c_port}"
[storage]
endpoint = "http://{store_host}"
[[workspaces]]
id = "ws_bench"
slug = "bench"
[[buckets]]
id = "bk_bench"
workspace = "ws_bench"
bucket = "bench-public"
alias = "bench"
public = true
[[deployments]]
id = "dep_raw"
workspace = "ws_bench"
name = "raw"
active_version = "v1"
[[deployments.versions]]
id = "v1"
release = {{ kind = "dynamic", instances = ["{store_host}"] }}
""")
        env = dict(os.environ, MIOSA_EDGE_CONTROL_TOKEN=TOKEN, MIOSA_EDGE_LOG="warn",
                   STORAGE_KEY_ID="bench-key-id", STORAGE_KEY_SECRET="bench-key-secret")
        edge = procs.start("edge", [a.edge, "run", "--config", edge_conf], 0, env=env)
        conf = nginx_conf(d, "proxy", f"""
  upstream store {{ server {store_host}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{n_port};
    location / {{
      proxy_pass http://store;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $remote_addr;
    }}
  }}""")
        nginx = procs.start("nginx", ["nginx", "-c", conf, "-p", d], 0)
        for p in [e_port, c_port, n_port]:
            wait_port(p)
        obj_host, raw_host = "bench.storage.localhost", "raw.bench.apps.localhost"
        for port, host, path in [(e_port, obj_host, "/1k"), (e_port, raw_host, "/bench-public/1k"), (n_port, store_host, "/bench-public/1k")]:
            status, body = http_do(port, "GET", path, host)
            if status != 200 or len(body) != 1024:
                sys.exit(f"{host}{path} answered {status} with {len(body)} bytes")

        rows = []

        def run(label, port, proc, path, host):
            wrk(port, host, path, 1, a.connections)  # warm-up
            before = cpu_ticks(proc.pid)
            r = wrk(port, host, path, a.seconds, a.connections)
            after = cpu_ticks(proc.pid)
            r["cpu_us"] = (after - before) / CLK * 1e6 / r["requests"] if r["requests"] else None
            r["target"] = label
            rows.append(r)
            print(f"  S1 1 KiB object  {label:<24} {r['rps']:>7.0f} req/s  p50 {r['p50']:>7.0f} us  p99 {r['p99']:>7.0f} us  "
                  f"cpu {r['cpu_us'] or 0:>6.1f} us/req  errors {r['errors']}", flush=True)

        for _ in range(a.rounds):
            run("edge: public object", e_port, edge, "/1k", obj_host)
            run("edge: proxied from store", e_port, edge, "/bench-public/1k", raw_host)
            run("nginx: proxied from store", n_port, nginx, "/bench-public/1k", store_host)

        # S2: a big object to a slow client.
        rss0, hwm0 = vm(edge.pid, "VmRSS"), vm(edge.pid, "VmHWM")
        limit = a.big_mib / a.slow_mbps * 1.5 + 10
        status, got = slow_get(e_port, obj_host, "/big", a.slow_mbps, limit)
        hwm1 = vm(edge.pid, "VmHWM")
        print(f"  S2 {a.big_mib} MiB object at {a.slow_mbps} MB/s: {status}, {got} bytes received; "
              f"edge RSS before {rss0 // 1024} MiB, peak growth {(hwm1 - hwm0) / 1024:.1f} MiB", flush=True)

        print()
        print("| S1: 1 KiB, same store | req/s | p50 µs | p99 µs | proxy CPU µs/req | vs edge proxying | vs nginx |")
        print("|---|---|---|---|---|---|---|")
        by = {}
        for r in rows:
            by.setdefault(r["target"], []).append(r)

        def mean(rs, k):
            vals = [x[k] for x in rs if x[k] is not None and x[k] == x[k]]
            return sum(vals) / len(vals) if vals else float("nan")
        proxied = mean(by["edge: proxied from store"], "cpu_us")
        ng = mean(by["nginx: proxied from store"], "cpu_us")
        for label, rs in by.items():
            cpu = mean(rs, "cpu_us")
            print(f"| {label} | {mean(rs, 'rps'):.0f} | {mean(rs, 'p50'):.0f} | {mean(rs, 'p99'):.0f} | {cpu:.1f} | "
                  f"{cpu / proxied:.2f}× | {cpu / ng:.2f}× |")
        print(f"\nS2: {a.big_mib} MiB at {a.slow_mbps} MB/s: {got} of {len(big)} bytes in the time limit; "
              f"peak RSS growth {(hwm1 - hwm0) / 1024:.1f} MiB (target < 32 MiB)")
        errors = sum(r["errors"] for r in rows)
        if errors or not status.startswith("HTTP/1.1 200"):
            sys.exit(f"ERRORS: {errors} failed requests; big object: {status}")
    finally:
        procs.stop()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
