#!/usr/bin/env python3
"""Storage benchmark (issue 18): public objects served by the edge from an S3-compatible
store, against proxying the same bytes from the same store as an origin.

Run through benches/load/run.sh storage (it installs nginx and wrk and builds the release
binary); moto_server comes from scripts/deps. Starts, all on loopback:
  - stores: moto_server, holding bucket `bench-public` (public) with objects of 1 KiB,
            and one of --big-mib MiB; and nginx serving the same 1 KiB at the same path
            (sendfile, tcp_nopush, keep-alive: a fast store that ignores signatures, so
            the figures isolate the edge's own cost from moto's, which closes every
            connection);
  - edges:  two miosa-edge processes (one per store), 1 worker thread each, on CPU 0,
            with [storage] on their store, bucket alias `bench`, and a deployment `raw`
            whose instance is the store itself (so `raw.bench.apps.localhost/bench-public/1k`
            is the same object through the same store, proxied: one upstream exchange
            either way), and the same 1 KiB as a static release;
  - nginx:  one process on CPU 0 proxying that same path to each store (keep-alive).
wrk and the store share CPU 1. Scenarios, each bounded (--seconds), alternately:
  S1. GET of the 1 KiB public object: edge (object read, SigV4-signed, streamed) vs the
      edge proxying the same object vs nginx proxying it, and the same 1 KiB served by the
      edge from memory (a static release file: what a small in-memory object cache would
      cost per hit). The figure is each proxy's own CPU time per request (utime+stime
      from /proc over requests served).
  S2. The --big-mib object to a client reading at --slow-mbps MB/s: the edge's peak RSS
      growth (VmHWM) while it streams, and the bytes received.
moto is a Python server: its throughput bounds req/s (not the edge's CPU per request,
which is what is compared). Every process is stopped at the end, also on failure.
"""
import argparse, http.client, os, shutil, socket, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import (ROOT, Procs, free_port, mean, measure, nginx_conf, static_release, static_routes,  # noqa: E402
                 storage_routes, wait_port, wrk)

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
        s_port, g_port, n_port, ng_port = (free_port() for _ in range(4))
        env = dict(os.environ, S3_IGNORE_SUBDOMAIN_BUCKETNAME="true")
        procs.start("moto", ["moto_server", "-H", "127.0.0.1", "-p", str(s_port)], 1, env=env)
        # A second store: nginx serving the same object at the same path, as a fast
        # keep-alive origin (sendfile, tcp_nopush) that ignores the signature: it isolates
        # the edge's own cost per request from moto's (moto closes every connection).
        www = os.path.join(d, "www", "bench-public")
        os.makedirs(www)
        with open(os.path.join(www, "1k"), "wb") as f:
            f.write(b"x" * 1024)
        conf = nginx_conf(d, "store", f"server {{ listen 127.0.0.1:{g_port}; root {os.path.dirname(www)}; sendfile on; tcp_nopush on; }}")
        procs.start("nginx-store", ["nginx", "-c", conf, "-p", d], 1)
        wait_port(s_port)
        wait_port(g_port)
        moto_host, nginx_store = f"127.0.0.1:{s_port}", f"127.0.0.1:{g_port}"
        assert http_do(s_port, "PUT", "/bench-public", moto_host)[0] == 200
        assert http_do(s_port, "PUT", "/bench-public/1k", moto_host, b"x" * 1024,
                       {"Content-Type": "text/plain", "x-amz-acl": "public-read"})[0] == 200  # readable unsigned: the origin case
        big = os.urandom(1 << 20) * a.big_mib
        assert http_do(s_port, "PUT", "/bench-public/big", moto_host, big, {"Content-Type": "application/octet-stream"})[0] == 200

        # The same 1 KiB as a static release (served from the edge's memory).
        releases, sha = static_release(d, www, ["1k"])

        def start_edge(name, store_host):
            """An edge on CPU 0 whose [storage] and deployment `raw` are `store_host`."""
            e_port, c_port = free_port(), free_port()
            path = os.path.join(d, f"{name}.toml")
            with open(path, "w") as f:
                f.write(f"""[server]
http = "127.0.0.1:{e_port}"
state_dir = "{d}/{name}-var"
threads = 1
watch_interval_ms = 0
[control]
listen = "127.0.0.1:{c_port}"
[[workspaces]]
id = "ws_bench"
slug = "bench"
{storage_routes(store_host)}{static_routes(releases, sha)}""")
            env = dict(os.environ, MIOSA_EDGE_CONTROL_TOKEN=TOKEN, MIOSA_EDGE_LOG="warn",
                       STORAGE_KEY_ID="bench-key-id", STORAGE_KEY_SECRET="bench-key-secret")
            proc = procs.start(name, [a.edge, "run", "--config", path], 0, env=env)
            wait_port(e_port)
            return proc, e_port

        edge_m, em_port = start_edge("edge-moto", moto_host)
        edge_g, eg_port = start_edge("edge-nginx-store", nginx_store)
        conf = nginx_conf(d, "proxy", f"""
  upstream moto {{ server {moto_host}; keepalive 64; }}
  upstream store {{ server {nginx_store}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{n_port};
    location / {{ proxy_pass http://moto; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $http_host; }}
  }}
  server {{
    listen 127.0.0.1:{ng_port};
    location / {{ proxy_pass http://store; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $http_host; }}
  }}""")
        nginx = procs.start("nginx", ["nginx", "-c", conf, "-p", d], 0)
        wait_port(n_port)
        wait_port(ng_port)
        obj_host, raw_host, site_host = "bench.storage.localhost", "raw.bench.apps.localhost", "site.bench.apps.localhost"
        for _ in range(100):  # the release is fetched and unpacked at start
            if http_do(em_port, "GET", "/1k", site_host)[0] == 200:
                break
            time.sleep(0.1)
        checks = [(em_port, obj_host, "/1k"), (em_port, raw_host, "/bench-public/1k"), (n_port, moto_host, "/bench-public/1k"),
                  (eg_port, obj_host, "/1k"), (eg_port, raw_host, "/bench-public/1k"), (ng_port, nginx_store, "/bench-public/1k"),
                  (em_port, site_host, "/1k")]
        for port, host, path in checks:
            status, body = http_do(port, "GET", path, host)
            if status != 200 or len(body) != 1024:
                sys.exit(f"{host}{path} on {port} answered {status} with {len(body)} bytes")

        rows = []

        def run(store, label, port, proc, path, host):
            r = measure(lambda secs: wrk(port, host, path, secs, a.connections), proc, a.seconds)
            r["target"], r["store"] = label, store
            rows.append(r)
            print(f"  S1 1 KiB from {store:<6} {label:<26} {r['rps']:>7.0f} req/s  p50 {r['p50']:>7.0f} us  p99 {r['p99']:>7.0f} us  "
                  f"cpu {r['cpu_us'] or 0:>6.1f} us/req  errors {r['errors']}", flush=True)

        for _ in range(a.rounds):
            for store, port, ng, ng_host in [("nginx", eg_port, ng_port, nginx_store), ("moto", em_port, n_port, moto_host)]:
                proc = edge_g if store == "nginx" else edge_m
                run(store, "edge: public object", port, proc, "/1k", obj_host)
                run(store, "edge: proxied from store", port, proc, "/bench-public/1k", raw_host)
                run(store, "nginx: proxied from store", ng, nginx, "/bench-public/1k", ng_host)
            run("-", "edge: from memory", em_port, edge_m, "/1k", site_host)

        # S2: a big object to a slow client.
        rss0, hwm0 = vm(edge_m.pid, "VmRSS"), vm(edge_m.pid, "VmHWM")
        limit = a.big_mib / a.slow_mbps * 1.5 + 10
        status, got = slow_get(em_port, obj_host, "/big", a.slow_mbps, limit)
        hwm1 = vm(edge_m.pid, "VmHWM")
        print(f"  S2 {a.big_mib} MiB object at {a.slow_mbps} MB/s: {status}, {got} bytes received; "
              f"edge RSS before {rss0 // 1024} MiB, peak growth {(hwm1 - hwm0) / 1024:.1f} MiB", flush=True)

        print()
        print("| S1: 1 KiB | store | req/s | p50 µs | p99 µs | proxy CPU µs/req | vs edge proxying | vs nginx |")
        print("|---|---|---|---|---|---|---|---|")
        by = {}
        for r in rows:
            by.setdefault((r["store"], r["target"]), []).append(r)

        for (store, label), rs in by.items():
            cpu = mean(rs, "cpu_us")
            ref = "nginx" if store == "-" else store
            proxied = mean(by[(ref, "edge: proxied from store")], "cpu_us")
            ng = mean(by[(ref, "nginx: proxied from store")], "cpu_us")
            print(f"| {label} | {store} | {mean(rs, 'rps'):.0f} | {mean(rs, 'p50'):.0f} | {mean(rs, 'p99'):.0f} | {cpu:.1f} | "
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
