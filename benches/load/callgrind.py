#!/usr/bin/env python3
"""Instructions per request of the edge (and the bare pingora proxy), by callgrind.

Wall-clock figures on this 2-core VM move by tens of percent between runs; instruction
counts do not (the same binary, inputs and environment give the same count, whatever
else the machine does). This script runs one proxy under `valgrind --tool=callgrind`,
loads it with wrk (1 thread, 4 keep-alive connections) from a 1 KiB nginx origin, zeroes
the counters after a warm-up, measures, dumps, and prints the proxy's instructions
divided by the requests wrk completed:

    python3 benches/load/callgrind.py                  # edge, public preview (scenario 1)
    python3 benches/load/callgrind.py --shape cookie   # private preview + session cookie (5)
    python3 benches/load/callgrind.py --shape object   # a 1 KiB public storage object, the
                                                       # nginx origin as the store ([storage])
    python3 benches/load/callgrind.py --shape object-proxied  # the same bytes proxied
    python3 benches/load/callgrind.py --shape static   # a 1 KiB file of a static release (6)
    python3 benches/load/callgrind.py --shape static100k  # the 100 KiB one (sendfile)
    python3 benches/load/callgrind.py --target bare    # the bare pingora proxy
    python3 benches/load/callgrind.py --browser        # with a browser's request head (below)
    python3 benches/load/callgrind.py --edge path/to/other/miosa-edge   # a before/after pair
    python3 benches/load/callgrind.py --keep /tmp/cg.out   # then: callgrind_annotate /tmp/cg.out

Needs nginx, wrk and valgrind (benches/load/run.sh installs the first two; valgrind is
on every machine of this kind) and the release binaries. Bounded: about 30 s a run.
"""
import argparse, http.client, os, re, shutil, subprocess, sys, tempfile, time

# The fields Chromium sends with a page navigation over HTTP/1.1 (beside Host and wrk's
# own): what a proxy parses, forwards and writes per request in front of browsers.
BROWSER_HEAD = [
    "Connection: keep-alive",
    'sec-ch-ua: "Chromium";v="131", "Not_A Brand";v="24"',
    "sec-ch-ua-mobile: ?0",
    'sec-ch-ua-platform: "Linux"',
    "Upgrade-Insecure-Requests: 1",
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8",
    "Sec-Fetch-Site: none",
    "Sec-Fetch-Mode: navigate",
    "Sec-Fetch-User: ?1",
    "Sec-Fetch-Dest: document",
    "Accept-Encoding: gzip, deflate, br, zstd",
    "Accept-Language: en-US,en;q=0.9",
]

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import (ROOT, SHARE, TOKEN, Procs, bench_routes, free_port, nginx_conf, static_release, static_routes,  # noqa: E402
                 storage_routes, wait_port, wait_release)


def wrk(port, host, seconds, headers, path="/1k"):
    extra = [x for h in headers for x in ("-H", h)]
    out = subprocess.run(["wrk", "-t1", "-c4", f"-d{seconds}s", "-H", f"Host: {host}", *extra, f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw failures:\n{out}")
    return int(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", choices=["edge", "bare"], default="edge")
    ap.add_argument("--shape", choices=["public", "cookie", "object", "object-proxied", "static", "static100k"], default="public")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--browser", action="store_true", help="send a browser's request head (BROWSER_HEAD)")
    ap.add_argument("--keep", help="copy the callgrind dump here (for callgrind_annotate)")
    ap.add_argument("--edge", default=os.path.join(ROOT, "target/release/miosa-edge"))
    ap.add_argument("--bare", default=os.path.join(ROOT, "target/release/examples/bare_proxy"))
    a = ap.parse_args()
    for tool in ["nginx", "wrk", "valgrind", "callgrind_control"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (benches/load/run.sh installs nginx and wrk)")
    d = tempfile.mkdtemp(prefix="miosa-callgrind-")
    procs = Procs()
    try:
        www = os.path.join(d, "www")
        os.makedirs(www)
        os.makedirs(os.path.join(www, "bench-public"))
        for name in ["1k", "bench-public/1k"]:
            with open(os.path.join(www, name), "wb") as f:
                f.write(b"x" * 1024)
        with open(os.path.join(www, "100k"), "wb") as f:
            f.write(b"x" * 102400)
        # The same files as a static release (scenario 6).
        store, release_sha = static_release(d, www)
        o_port, p_port, c_port = free_port(), free_port(), free_port()
        conf = nginx_conf(d, "origin", f"server {{ listen 127.0.0.1:{o_port}; root {www}; sendfile on; }}")
        procs.start("origin", ["nginx", "-c", conf, "-p", d], 1)
        out = os.path.join(d, "callgrind.out")
        vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no", "--collect-atstart=yes"]
        sandbox = "priv" if a.shape == "cookie" else "bench"
        host, path = f"{o_port}-{sandbox}.sandbox.localhost", "/1k"
        if a.shape == "object":
            host = "bench.storage.localhost"
        elif a.shape == "object-proxied":
            host, path = "raw.bench.apps.localhost", "/bench-public/1k"
        elif a.shape.startswith("static"):
            host, path = "site.bench.apps.localhost", "/100k" if a.shape == "static100k" else "/1k"
        # The origin as the store: it serves the object's path and ignores the signature.
        storage = storage_routes(f"127.0.0.1:{o_port}")
        if a.target == "edge":
            edge_conf = os.path.join(d, "edge.toml")
            with open(edge_conf, "w") as f:
                f.write(f"""[server]
http = "127.0.0.1:{p_port}"
state_dir = "{d}/var"
threads = 1
watch_interval_ms = 0
[control]
listen = "127.0.0.1:{c_port}"
{bench_routes(o_port)}{storage}{static_routes(store, release_sha)}""")
            env = dict(os.environ, MIOSA_EDGE_CONTROL_TOKEN=TOKEN, MIOSA_EDGE_LOG="warn",
                       STORAGE_KEY_ID="bench-key-id", STORAGE_KEY_SECRET="bench-key-secret")
            proc = procs.start("edge", vg + [a.edge, "run", "--config", edge_conf], 0, env=env)
        else:
            proc = procs.start("bare", vg + [a.bare, f"127.0.0.1:{p_port}", f"127.0.0.1:{o_port}", "1"], 0)
        wait_port(o_port)
        wait_port(p_port, timeout=120)
        headers = []
        if a.shape.startswith("static"):
            wait_release(p_port, host, path, a.shape)
        if a.shape == "cookie":
            c = http.client.HTTPConnection("127.0.0.1", p_port, timeout=30)
            c.request("GET", f"/1k?token={SHARE}", headers={"Host": host})
            resp = c.getresponse()
            resp.read()
            set_cookie = resp.getheader("Set-Cookie") or ""
            if resp.status != 303 or not set_cookie:
                sys.exit(f"the share link answered {resp.status} without a session cookie")
            headers = [f"Cookie: theme=dark; {set_cookie.split(';')[0]}; lang=en"]
        if a.browser:
            headers += BROWSER_HEAD
        wrk(p_port, host, 2, headers, path)  # warm-up: connections, pools, caches
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        requests = wrk(p_port, host, a.seconds, headers, path)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        time.sleep(1)
        dumps = sorted(x for x in os.listdir(d) if x.startswith("callgrind.out."))
        if not dumps:
            sys.exit("callgrind wrote no dump")
        with open(os.path.join(d, dumps[-1])) as f:
            total = next(int(line.split()[1]) for line in f if line.startswith(("summary:", "totals:")))
        if a.keep:
            shutil.copy(os.path.join(d, dumps[-1]), a.keep)
        print(f"{a.target} {a.shape}{' (browser head)' if a.browser else ''}: {requests} requests, {total / requests / 1000:.1f}k instructions per request")
    finally:
        procs.stop()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
