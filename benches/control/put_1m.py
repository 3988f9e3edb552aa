#!/usr/bin/env python3
"""Measures a PUT /v1/state of 1M sandboxes against a release build of the edge.

Usage: python3 benches/control/put_1m.py [--sandboxes N] [--binary target/release/miosa-edge]

Starts the edge on free ports with a throw-away state directory, PUTs a state of N
sandboxes (2 preview ports each, 10k workspaces), and prints how long the write took
(parse + validate + build + persist + swap, as seen by the client), the edge's CPU time
and minor page faults for it, its resident memory before and after and at its peak, and
the size of the persisted state. Everything it starts is stopped at the end, also on
failure.
"""
import argparse, json, os, re, signal, subprocess, sys, tempfile, time, urllib.request

def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0

def cpu_and_faults(pid):
    """The process's CPU seconds (user + system, all threads) and minor page faults."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    # After the name: state is field 3, so minflt (10) is [7], utime (14) [11], stime (15) [12].
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[7])

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sandboxes", type=int, default=1_000_000)
    ap.add_argument("--binary", default="target/release/miosa-edge")
    a = ap.parse_args()
    token = "bench-token-0123456789abcdef0123456789"
    with tempfile.TemporaryDirectory() as d:
        cfg = os.path.join(d, "edge.toml")
        with open(cfg, "w") as f:
            f.write(f'[server]\nhttp = "127.0.0.1:0"\nstate_dir = "{d}/var"\nwatch_interval_ms = 0\n'
                    f'[control]\nlisten = "127.0.0.1:0"\nmax_body_bytes = 1073741824\n')
        env = dict(os.environ, MIOSA_EDGE_CONTROL_TOKEN=token, MIOSA_EDGE_LOG="warn")
        p = subprocess.Popen([a.binary, "run", "--config", cfg], stdout=subprocess.PIPE, env=env, text=True)
        try:
            line = p.stdout.readline()
            m = re.search(r"control=(\S+)", line)
            if not m:
                sys.exit(f"edge did not start: {line!r}")
            control = m.group(1)
            time.sleep(0.5)
            ws = 10_000
            state = {
                "workspaces": [{"id": f"ws_{w}", "slug": f"team-{w}"} for w in range(ws)],
                "sandboxes": [{"id": f"sb{i:08x}", "workspace": f"ws_{i % ws}",
                               "address": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
                               "previews": [{"port": 5173, "access": "public"}, {"port": 3000}]}
                              for i in range(a.sandboxes)],
            }
            body = json.dumps(state, separators=(",", ":")).encode()
            del state
            before = rss_kib(p.pid)
            cpu0, faults0 = cpu_and_faults(p.pid)
            req = urllib.request.Request(f"http://{control}/v1/state", data=body, method="PUT",
                                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            t0 = time.monotonic()
            with urllib.request.urlopen(req, timeout=600) as r:
                answer = r.read().decode()
            took = time.monotonic() - t0
            after = rss_kib(p.pid)
            cpu1, faults1 = cpu_and_faults(p.pid)
            # The state directory as a whole: the state log's snapshot and records (there is
            # no single state.json since the state log).
            var = os.path.join(d, "var")
            size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(var) for f in files)
            print(f"sandboxes: {a.sandboxes}  body: {len(body) / 1e6:.1f} MB  answer: {answer}")
            print(f"PUT /v1/state (receive + parse + validate + build + persist + swap): {took:.2f} s")
            # Wall time on a VM moves with how fast fresh memory comes (page faults, huge
            # pages); the edge's CPU time and its page faults say what the write cost.
            print(f"edge CPU time for it: {cpu1 - cpu0:.2f} s, minor page faults: {faults1 - faults0}")
            print(f"edge resident memory: {before / 1024:.0f} MiB before, {after / 1024:.0f} MiB after "
                  f"({(after - before) * 1024 / a.sandboxes:.0f} B per sandbox, API state copy and table included)")
            print(f"edge peak resident memory: {rss_kib(p.pid, 'VmHWM') / 1024:.0f} MiB")
            print(f"state directory: {size / 1e6:.1f} MB")
        finally:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

if __name__ == "__main__":
    main()
