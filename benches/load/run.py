#!/usr/bin/env python3
"""Load benchmark: miosa-edge against nginx (and a bare pingora proxy) on this machine.

Run through benches/load/run.sh, which installs nginx and wrk and builds the release
binaries. Starts, all on loopback:
  - origin: nginx (single process) serving 1 KiB and 64 KiB files;
  - nginx:  nginx (single process, master_process off) as the equivalent reverse proxy:
            the same Host routing ({port}-{sandbox}.sandbox.localhost), keep-alive
            upstream, the same forwarding headers, access log off;
  - edge:   miosa-edge with 1 worker thread, routing that host to the origin;
  - bare:   benches/load/bare_proxy.rs, a pingora proxy with no features, same profile
            and allocator, 1 thread.
Pinning: each proxy alone on CPU 0; wrk and the origin share CPU 1.

Scenarios run alternately (A B A B ...), each bounded (--seconds, default 5):
  1. keep-alive HTTP/1.1, 1 KiB response, sandbox-preview host;
  2. keep-alive, 64 KiB response;
  3. a new TLS connection per request (full handshake, no resumption: wrk sends
     `Connection: close`), 1 KiB response; both proxies serve the same ECDSA P-256
     certificate for *.sandbox.localhost (wrk's SNI is the URL's IP, so both fall back to
     their default/only certificate; the SNI lookup itself is benched by criterion);
  4. HTTP/2 over TLS, 8 connections x 16 concurrent streams (h2load), 1 KiB response;
     p50/p99 from h2load's per-request log;
  5. scenario 1 on a private preview: every request carries the edge's session cookie
     (obtained once through a share link), which the edge verifies (HMAC over the host,
     share record lookup) and strips before forwarding; nginx and the bare proxy get the
     same request and forward it as it is. "edge, public" is the edge given the same
     request (the same `Cookie` header) on the public preview, in the same rounds: the
     issue's goal compares the private preview with it (the summary prints the ratio);
  6. a static release file (1 KiB and 100 KiB) served by the edge from its release
     cache, against nginx serving the same files from disk (no bare proxy here);
  7. scenario 1 on the edge while its routing table (100k sandboxes) is replaced
     through the control API as often as it can, up to 10 times a second;
  8. scenario 2 behind a corking origin: nginx with `sendfile on; tcp_nopush on` (the
     common static configuration), which sends the head and the file's full segments
     first and the last partial segment when it uncorks.
The figure that counts is the proxy's own CPU time per request (utime+stime of its
process from /proc over requests served): on 2 cores wrk saturates first, so requests/s
alone says little. Every process started is stopped at the end, also on failure.
"""
import argparse, hashlib, http.client, json, os, tarfile, re, shutil, signal, socket, subprocess, sys, tempfile, threading, time, urllib.request

CLK = os.sysconf("SC_CLK_TCK")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "load-bench-token-0123456789abcdef0123"
SHARE = "ms_load-bench-share-link-0123456789"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12])  # utime, stime (fields 14, 15)


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def to_us(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    if not m:
        return float("nan")
    n, u = float(m.group(1)), m.group(2)
    return n * {"us": 1, "ms": 1e3, "s": 1e6}[u]


def measure(tool, proc, seconds):
    """One measured run of `tool(seconds)` after a 1 s warm-up (connections, pools,
    caches); adds `cpu_us`, `proc`'s own CPU time per request (None without a process)."""
    tool(1)
    before = cpu_ticks(proc.pid) if proc else 0
    r = tool(seconds)
    after = cpu_ticks(proc.pid) if proc else 0
    r["cpu_us"] = ((after - before) / CLK * 1e6 / r["requests"]) if proc and r["requests"] else None
    return r


def mean(rows, key):
    """The mean of `key` over `rows`, skipping None and NaN (a wrk line that did not parse)."""
    vals = [x[key] for x in rows if x[key] is not None and x[key] == x[key]]
    return sum(vals) / len(vals) if vals else float("nan")


def rotated(targets, rnd):
    """The targets in round `rnd`: rotated by one place per round and reversed in odd
    rounds. On this VM where a target sits in a round shows in its figures whichever
    build it is: the one measured last came out slower (up to 12%), and with rotation
    alone, where each target always follows the same one, the same binary measured as
    both "edge" and "edge before" read 13% slower as "edge" (right after nginx) over
    four rounds. So each target takes each place, after different neighbours."""
    k = rnd % len(targets) if targets else 0
    order = targets[k:] + targets[:k]
    return order[::-1] if rnd % 2 else order


def wrk(port, host, path, seconds, conns, headers=(), scheme="http"):
    extra = [x for h in headers for x in ("-H", h)]
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-H", f"Host: {host}", *extra,
           f"{scheme}://127.0.0.1:{port}{path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    # The latency distribution's lines, not the thread statistics' "+/- Stdev" column
    # (a "92.99%" there matched "99%" and read the next word as the p99: NaN).
    p50 = to_us(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))
    p99 = to_us(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    return {"requests": total, "rps": rps, "p50": p50, "p99": p99, "errors": errors}


def h2load(port, host, path, seconds, conns, streams=16):
    """h2load's own summary has mean and max only: the percentiles come from its
    per-request log (microseconds from start to end of each response)."""
    with tempfile.NamedTemporaryFile(prefix="h2load-", suffix=".log") as log:
        cmd = ["taskset", "-c", "1", "h2load", "-t1", f"-c{conns}", f"-m{streams}", f"-D{seconds}", "--warm-up-time=1",
               f"--log-file={log.name}", "-H", f":authority: {host}", f"https://127.0.0.1:{port}{path}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
        durations = sorted(int(f[2]) for f in (line.split("\t") for line in open(log.name)) if len(f) >= 3 and f[1] != "-1")
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if not m or not durations:
        raise RuntimeError(f"h2load output not understood:\n{out}")
    done, ok = int(m.group(2)), int(m.group(3))
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    pct = lambda q: float(durations[min(len(durations) - 1, int(q * len(durations)))])
    return {"requests": done, "rps": rps, "p50": pct(0.50), "p99": pct(0.99),
            "errors": int(m.group(4)) + int(m.group(5)) + (done - ok - int(m.group(4)))}


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, name, cmd, cpu, env=None, stdout=subprocess.DEVNULL):
        full = ["taskset", "-c", str(cpu)] + cmd
        p = subprocess.Popen(full, stdout=stdout, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        self.procs.append((name, p))
        return p

    def stop(self):
        for _, p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def nginx_conf(d, name, body):
    path = os.path.join(d, f"{name}.conf")
    with open(path, "w") as f:
        f.write(f"""
master_process off;
daemon off;
worker_processes 1;
pid {d}/{name}.pid;
error_log {d}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_temp_path {d}/{name}-body;
  proxy_temp_path {d}/{name}-proxy;
  fastcgi_temp_path {d}/{name}-fcgi;
  uwsgi_temp_path {d}/{name}-uwsgi;
  scgi_temp_path {d}/{name}-scgi;
  {body}
}}
""")
    return path


def deployment(dep_id, name, release):
    """A deployment `name` of workspace ws_bench whose active version `v1` has `release`
    (the inside of its inline table)."""
    return f"""[[deployments]]
id = "{dep_id}"
workspace = "ws_bench"
name = "{name}"
active_version = "v1"
[[deployments.versions]]
id = "v1"
release = {{ {release} }}
"""


def storage_routes(store_host):
    """`[storage]` on `store_host`, the public bucket `bench-public` (alias `bench`, in
    workspace ws_bench, which bench_routes defines) and a deployment `raw` whose instance
    is the store itself: the same object as a public object and proxied."""
    return f"""[storage]
endpoint = "http://{store_host}"
[[buckets]]
id = "bk_bench"
workspace = "ws_bench"
bucket = "bench-public"
alias = "bench"
public = true
""" + deployment("dep_raw", "raw", f'kind = "dynamic", instances = ["{store_host}"]')


def bench_routes(o_port):
    """The routing sections every edge of the benchmarks runs: a public preview (bench)
    and a private one (priv) of the origin, and a share link for the private one."""
    return f"""[[workspaces]]
id = "ws_bench"
slug = "bench"
[[sandboxes]]
id = "bench"
workspace = "ws_bench"
address = "127.0.0.1"
previews = [{{ port = {o_port}, access = "public" }}]
[[sandboxes]]
id = "priv"
workspace = "ws_bench"
address = "127.0.0.1"
previews = [{{ port = {o_port}, access = "private" }}]
[[share_tokens]]
id = "sh_bench"
token_sha256 = "{hashlib.sha256(SHARE.encode()).hexdigest()}"
sandbox = "priv"
"""


def static_release(d, www, names=("1k", "100k")):
    """Files of `www` (scenario 6's by default) as a static release in a directory store
    under `d`: returns the store and the archive's SHA-256."""
    store = os.path.join(d, "store")
    os.makedirs(store)
    tgz = os.path.join(d, "release.tar.gz")
    with tarfile.open(tgz, "w:gz") as t:
        for name in names:
            t.add(os.path.join(www, name), arcname=name)
    with open(tgz, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    shutil.move(tgz, os.path.join(store, f"{sha}.tar.gz"))
    return store, sha


def static_routes(store, sha):
    """The edge's `[static]` store and the deployment serving the release on
    `site.bench.apps.localhost`."""
    return f"""[static]
store = "{store}"
""" + deployment("dep_static", "site", f'kind = "static", sha256 = "{sha}"')


def wait_release(port, host, path, what):
    """Asks `path` on `host` until it answers 200: the edge fetches and unpacks its static
    release at start."""
    for _ in range(600):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", path, headers={"Host": host})
        resp = c.getresponse()
        resp.read()
        if resp.status == 200:
            return
        time.sleep(0.1)
    sys.exit(f"{what}: the static release never became available ({resp.status})")


def table_json(n, origin_port, flip):
    sandboxes = [{"id": f"sb{i:06x}", "workspace": "ws_bench", "address": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
                  "previews": [{"port": 5173, "access": "public"}]} for i in range(n)]
    # The benchmarked route is an API object too, so every swap rebuilds it.
    sandboxes.append({"id": "swap", "workspace": "ws_bench", "address": "127.0.0.1",
                      "previews": [{"port": origin_port, "access": "public"}, {"port": 1000 + flip, "access": "public"}]})
    return json.dumps({"sandboxes": sandboxes}, separators=(",", ":")).encode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--swap-sandboxes", type=int, default=100_000)
    ap.add_argument("--scenarios", default="1,2,3,4,5,6,7,8", help="comma-separated scenario numbers to run")
    ap.add_argument("--edge", default=os.path.join(ROOT, "target/release/miosa-edge"))
    ap.add_argument("--bare", default=os.path.join(ROOT, "target/release/examples/bare_proxy"))
    ap.add_argument("--edge-before", help="another miosa-edge build to measure beside --edge (before/after a change)")
    a = ap.parse_args()
    for tool in ["nginx", "wrk", "taskset"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run benches/load/run.sh")

    d = tempfile.mkdtemp(prefix="miosa-load-")
    procs = Procs()
    try:
        www = os.path.join(d, "www")
        os.makedirs(www)
        for name, size in [("1k", 1024), ("64k", 65536), ("100k", 102400)]:
            with open(os.path.join(www, name), "wb") as f:
                f.write(b"x" * size)
        # The same files as a static release for the edge.
        store, release_sha = static_release(d, www)
        o_port, n_port, e_port, b_port, c_port, nt_port, et_port, co_port, bc_port = (free_port() for _ in range(9))
        # One certificate for both proxies (ECDSA P-256, as the edge generates).
        certs = os.path.join(d, "certs")
        os.makedirs(os.path.join(certs, "bench"))
        crt, key = os.path.join(certs, "bench", "fullchain.pem"), os.path.join(certs, "bench", "privkey.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "7",
                        "-subj", "/CN=bench", "-addext", "subjectAltName=DNS:*.sandbox.localhost,DNS:localhost",
                        "-keyout", key, "-out", crt], check=True, capture_output=True)
        host = f"{o_port}-bench.sandbox.localhost"

        # No tcp_nopush on this origin (nor on nginx's static server below), so that
        # scenarios 1-7 measure the proxies; scenario 8 has the corking origin: its last
        # segment waits for the proxy's ACK, 40 ms with a delayed ACK (nginx as a proxy
        # waits it out; the edge acknowledges at once, vendor/README.md pingora-core 3).
        conf = nginx_conf(d, "origin", f"server {{ listen 127.0.0.1:{o_port}; root {www}; sendfile on; }}")
        procs.start("origin", ["nginx", "-c", conf, "-p", d], 1)
        # Scenario 8's origin corks: what most nginx static configurations do.
        conf = nginx_conf(d, "cork", f"server {{ listen 127.0.0.1:{co_port}; root {www}; sendfile on; tcp_nopush on; }}")
        procs.start("cork", ["nginx", "-c", conf, "-p", d], 1)
        cork_host = f"{co_port}-cork.sandbox.localhost"
        conf = nginx_conf(d, "proxy", f"""
  upstream origin {{ server 127.0.0.1:{o_port}; keepalive 64; }}
  upstream cork {{ server 127.0.0.1:{co_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{n_port} default_server;
    listen 127.0.0.1:{nt_port} ssl http2 default_server;
    return 404;
  }}
  server {{
    listen 127.0.0.1:{n_port};
    server_name site.bench.apps.localhost;
    root {www};
    sendfile on;
  }}
  map $http_host $upstream_group {{ {cork_host} cork; default origin; }}
  ssl_certificate {crt};
  ssl_certificate_key {key};
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache off;
  ssl_session_tickets off;
  server {{
    listen 127.0.0.1:{n_port};
    listen 127.0.0.1:{nt_port} ssl http2;
    server_name ~^(?<pport>[1-9][0-9]*)-(?<sandbox>[a-z0-9-]+)\\.sandbox\\.localhost$;
    location / {{
      proxy_pass http://$upstream_group;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host;
      proxy_set_header X-Request-Id $request_id;
      add_header X-Request-Id $request_id;
      add_header X-Robots-Tag noindex;
    }}
  }}""")
        nginx = procs.start("nginx", ["nginx", "-c", conf, "-p", d], 0)

        def edge_conf(name, http_port, https_port, control_port):
            path = os.path.join(d, f"{name}.toml")
            with open(path, "w") as f:
                f.write(f"""[server]
http = "127.0.0.1:{http_port}"
https = "127.0.0.1:{https_port}"
state_dir = "{d}/{name}-var"
threads = 1
watch_interval_ms = 0
[tls]
certs_dir = "{certs}"
redirect_http = false
[control]
listen = "127.0.0.1:{control_port}"
max_body_bytes = 1073741824
{bench_routes(o_port)}[[sandboxes]]
id = "cork"
workspace = "ws_bench"
address = "127.0.0.1"
previews = [{{ port = {co_port}, access = "public" }}]
{static_routes(store, release_sha)}""")
            return path

        env = dict(os.environ, MIOSA_EDGE_CONTROL_TOKEN=TOKEN, MIOSA_EDGE_LOG="warn")
        edge = procs.start("edge", [a.edge, "run", "--config", edge_conf("edge", e_port, et_port, c_port)], 0, env=env)
        # --edge-before: another build of the edge, measured in the same rounds (not in
        # scenarios 5 and 7, which need the first edge's session and control API).
        before = []
        if a.edge_before:
            eb_port, ebt_port, ebc_port = free_port(), free_port(), free_port()
            edge_b = procs.start("edge-before", [a.edge_before, "run", "--config", edge_conf("edge-before", eb_port, ebt_port, ebc_port)],
                                 0, env=env)
            for p in [eb_port, ebt_port, ebc_port]:
                wait_port(p)
            before = [("edge before", eb_port, ebt_port, edge_b)]
        bare = procs.start("bare", [a.bare, f"127.0.0.1:{b_port}", f"127.0.0.1:{o_port}", "1"], 0)
        bare_cork = procs.start("bare-cork", [a.bare, f"127.0.0.1:{bc_port}", f"127.0.0.1:{co_port}", "1"], 0)
        for p in [o_port, n_port, e_port, b_port, c_port, nt_port, et_port, co_port, bc_port]:
            wait_port(p)

        targets = [("direct", o_port, None), ("nginx", n_port, nginx), ("edge", e_port, edge), ("bare pingora", b_port, bare)]
        plus_before = targets + [(label, port, proc) for label, port, _, proc in before]
        rows = []

        def run(scenario, label, port, proc, path, hostname, headers=(), scheme="http", tool=None):
            tool = tool or (lambda secs: wrk(port, hostname, path, secs, a.connections, headers, scheme))
            r = measure(tool, proc, a.seconds)
            r["scenario"], r["target"] = scenario, label
            rows.append(r)
            print(f"  {scenario:<28} {label:<13} {r['rps']:>9.0f} req/s  p50 {r['p50']:>7.0f} us  p99 {r['p99']:>7.0f} us  "
                  f"cpu {('%.1f us/req' % r['cpu_us']) if r['cpu_us'] is not None else '-':>13}  errors {r['errors']}", flush=True)

        only = set(a.scenarios.split(","))
        for scenario, path in [("1 keep-alive 1 KiB", "/1k"), ("2 keep-alive 64 KiB", "/64k")]:
            if scenario[0] not in only:
                continue
            for rnd in range(a.rounds):
                for label, port, proc in rotated(plus_before, rnd):
                    run(scenario, label, port, proc, path, host)

        cork_targets = [("direct", co_port, None), ("nginx", n_port, nginx), ("edge", e_port, edge),
                        ("bare pingora", bc_port, bare_cork)] + plus_before[len(targets):]
        for rnd in range(a.rounds if "8" in only else 0):
            for label, port, proc in rotated(cork_targets, rnd):
                run("8 64 KiB, corking origin", label, port, proc, "/64k", cork_host)

        # Scenarios 3 and 4: TLS (nginx and the edge; the bare proxy has no TLS).
        tls_targets = [("nginx", nt_port, nginx), ("edge", et_port, edge)] + [(label, tport, proc) for label, _, tport, proc in before]
        for rnd in range(a.rounds if "3" in only else 0):
            for label, port, proc in rotated(tls_targets, rnd):
                run("3 TLS handshake per request", label, port, proc, "/1k", host, ["Connection: close"], "https")
        for rnd in range(a.rounds if "4" in only else 0):
            for label, port, proc in rotated(tls_targets, rnd):
                run("4 h2 over TLS, 16 streams", label, port, proc, "/1k", host,
                    tool=lambda secs, port=port: h2load(port, host, "/1k", secs, 8))

        # Scenario 5: a private preview with the session cookie on every request.
        priv_host = f"{o_port}-priv.sandbox.localhost"
        c = http.client.HTTPConnection("127.0.0.1", e_port, timeout=10)
        c.request("GET", f"/1k?token={SHARE}", headers={"Host": priv_host})
        resp = c.getresponse()
        resp.read()
        set_cookie = resp.getheader("Set-Cookie") or ""
        if resp.status != 303 or not set_cookie:
            sys.exit(f"scenario 5: the share link answered {resp.status} without a session cookie")
        session = set_cookie.split(";")[0]
        cookie = [f"Cookie: theme=dark; {session}; lang=en"]
        cookie_targets = [(label, port, proc, priv_host) for label, port, proc in targets] + [("edge, public", e_port, edge, host)]
        for rnd in range(a.rounds if "5" in only else 0):
            for label, port, proc, hostname in rotated(cookie_targets, rnd):
                run("5 private preview, cookie", label, port, proc, "/1k", hostname, cookie)

        # Scenario 6: static files (edge release cache vs nginx from disk).
        static_host = "site.bench.apps.localhost"
        static_targets = [t for t in plus_before if t[0] not in ("direct", "bare pingora")]
        for _, port, _ in static_targets[1:]:
            wait_release(port, static_host, "/1k", "scenario 6")
        for path in ["/1k", "/100k"]:
            for rnd in range(a.rounds if "6" in only else 0):
                for label, port, proc in rotated(static_targets, rnd):
                    run(f"6 static file {path[1:]}", label, port, proc, path, static_host)

        # Scenario 7: table swaps under load (edge only).
        swap_host = f"{o_port}-swap.sandbox.localhost"
        bodies = [table_json(a.swap_sandboxes, o_port, i) for i in range(2)]
        stop = threading.Event()
        swaps, swap_errors, swap_secs = [0], [0], []

        def swapper():
            i = 0
            while not stop.is_set():
                t0 = time.monotonic()
                req = urllib.request.Request(f"http://127.0.0.1:{c_port}/v1/state", data=bodies[i % 2], method="PUT",
                                             headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        resp.read()
                    swaps[0] += 1
                except Exception:
                    swap_errors[0] += 1
                took = time.monotonic() - t0
                swap_secs.append(took)
                i += 1
                stop.wait(max(0.0, 0.1 - took))

        # The route must exist before load starts.
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{c_port}/v1/state", data=bodies[0], method="PUT",
                               headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}), timeout=60).read()
        for _ in range(a.rounds if "7" in only else 0):
            stop.clear()
            swaps[0] = 0
            t = threading.Thread(target=swapper)
            t.start()
            t0 = time.monotonic()
            run(f"7 swaps of {a.swap_sandboxes // 1000}k-sandbox table", "edge", e_port, edge, "/1k", swap_host)
            stop.set()
            t.join()
            rate = swaps[0] / (time.monotonic() - t0)
            rows[-1]["swaps_per_s"] = rate
            rows[-1]["swap_errors"] = swap_errors[0]
            print(f"    table swaps: {swaps[0]} ({rate:.1f}/s), failed swaps: {swap_errors[0]}, "
                  f"median swap {sorted(swap_secs)[len(swap_secs) // 2] * 1000:.0f} ms", flush=True)

        # Summary: means over rounds, ratios against nginx.
        print()
        print("| scenario | target | req/s | p50 µs | p99 µs | proxy CPU µs/req | CPU vs nginx | errors |")
        print("|---|---|---|---|---|---|---|---|")
        summary = {}
        for r in rows:
            summary.setdefault((r["scenario"], r["target"]), []).append(r)
        for (scenario, target), rs in summary.items():
            cpu = [x["cpu_us"] for x in rs if x["cpu_us"] is not None]
            cpu_mean = sum(cpu) / len(cpu) if cpu else None
            ng = [x["cpu_us"] for x in summary.get((scenario, "nginx"), []) if x["cpu_us"] is not None]
            ratio = (cpu_mean / (sum(ng) / len(ng))) if cpu_mean and ng else None
            print(f"| {scenario} | {target} | {mean(rs, 'rps'):.0f} | {mean(rs, 'p50'):.0f} | {mean(rs, 'p99'):.0f} | "
                  f"{'%.1f' % cpu_mean if cpu_mean else '—'} | {'%.2f×' % ratio if ratio else '—'} | {sum(x['errors'] for x in rs)} |")
        private = [x["cpu_us"] for x in summary.get(("5 private preview, cookie", "edge"), []) if x["cpu_us"]]
        public = [x["cpu_us"] for x in summary.get(("5 private preview, cookie", "edge, public"), []) if x["cpu_us"]]
        if private and public:
            print(f"\nscenario 5, the edge's CPU per request: private preview {sum(private) / len(private):.1f} µs, the same request "
                  f"on a public preview {sum(public) / len(public):.1f} µs: {sum(private) / len(private) / (sum(public) / len(public)):.2f}×")
        total_errors = sum(r["errors"] for r in rows if r["target"] != "direct")
        if total_errors:
            print(f"\nERRORS: {total_errors} failed requests", file=sys.stderr)
            sys.exit(1)
    finally:
        procs.stop()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
