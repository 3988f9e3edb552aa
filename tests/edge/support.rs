//! Test support: the real edge binary on a free port, real origins on loopback, and
//! a small raw HTTP/1.1 client (raw, so tests can send hostile requests).

#![allow(dead_code)]

/// Certificates, a TLS client, and Pebble (ACME) for the TLS tests.
pub mod pebble;
pub mod redis;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// Bounded wait for readiness: polls `f` until it returns `Some` or `limit` passes.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The control API token every test edge is started with.
pub const CONTROL_TOKEN: &str = "test-control-token-0123456789abcdef";

/// The session-cookie key every test edge gets (env `MIOSA_EDGE_SESSION_KEY`).
pub const SESSION_KEY: &str = "test-session-key-0123456789abcdef0123456789";
/// The HS256 secret of preview key `k1` (env `MIOSA_PREVIEW_KEY_K1`).
pub const PREVIEW_KEY_K1: &str = "test-preview-key-k1-0123456789abcdef012345";
/// The HS256 secret of preview key `k2` (env `MIOSA_PREVIEW_KEY_K2`).
pub const PREVIEW_KEY_K2: &str = "test-preview-key-k2-0123456789abcdef012345";

/// The `[tokens]` section matching the keys above.
pub const TOKENS_TOML: &str = r#"
[tokens]
session_key_env = "MIOSA_EDGE_SESSION_KEY"
[[tokens.preview_keys]]
kid = "k1"
alg = "HS256"
secret_env = "MIOSA_PREVIEW_KEY_K1"
"#;

/// A running edge process, killed on drop.
pub struct Edge {
    pub child: Child,
    pub addr: SocketAddr,
    pub control: SocketAddr,
    /// The TLS listener, when `[server] https` is set.
    pub https: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub stderr: PathBuf,
    /// Extra environment of the process (kept for restarts).
    env: Vec<(String, String)>,
    /// Extra `[server]` keys (kept for `write_config`).
    server_extra: String,
}

impl Edge {
    /// Starts the edge on `config_body` (a TOML file without `[server]` and `[control]`,
    /// which are added with free ports and a fast file watch).
    pub async fn start(config_body: &str) -> Edge {
        Edge::start_with("", config_body).await
    }

    /// Like [`Edge::start`], with extra `[control]` keys.
    pub async fn start_with(control_extra: &str, config_body: &str) -> Edge {
        Edge::start_env(&[], &format!("{control_extra}\n\n{config_body}")).await
    }

    /// Like [`Edge::start`], with extra environment variables for the process.
    pub async fn start_env(env: &[(&str, String)], config_body: &str) -> Edge {
        Edge::start_opts("", env, config_body).await
    }

    /// Like [`Edge::start_env`], with extra `[server]` keys (`https = "127.0.0.1:0"`, an
    /// explicit `http = "127.0.0.1:PORT"`); a key given here replaces the test default.
    pub async fn start_opts(server_extra: &str, env: &[(&str, String)], config_body: &str) -> Edge {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("edge.toml");
        let text = Edge::with_server(dir.path(), server_extra, config_body);
        std::fs::write(&config, text).expect("write config");
        let stderr = dir.path().join("edge.log");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let (child, addr, control, https) = Edge::spawn(&config, &stderr, &env).await;
        Edge { child, addr, control, https, dir, config, stderr, env, server_extra: server_extra.to_string() }
    }

    /// The TLS listener (panics when the edge runs without one).
    pub fn https(&self) -> SocketAddr {
        self.https.unwrap_or_else(|| panic!("the edge announced no https= listener: {}", self.log()))
    }

    /// Kills the process with SIGKILL (no shutdown of any kind) and starts a new one on
    /// the same config and state directory.
    pub async fn kill9_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.respawn().await;
    }

    /// Stops the process with SIGINT (pingora's fast shutdown: no drain), waits for it
    /// to exit, and starts a new one on the same config and state directory.
    pub async fn interrupt_and_restart(&mut self) {
        // SAFETY: kill(2) with the pid of our own child, which has not been waited for.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < deadline, "the edge did not exit within 20 s of SIGINT: {}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.respawn().await;
    }

    async fn respawn(&mut self) {
        let (child, addr, control, https) = Edge::spawn(&self.config, &self.stderr, &self.env).await;
        self.child = child;
        self.addr = addr;
        self.control = control;
        self.https = https;
    }

    async fn spawn(config: &Path, stderr: &Path, env: &[(String, String)]) -> (Child, SocketAddr, SocketAddr, Option<SocketAddr>) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(stderr).expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_miosa-edge"))
            .args(["run", "--config"])
            .arg(config)
            .env("MIOSA_EDGE_LOG", std::env::var("MIOSA_TEST_EDGE_LOG").unwrap_or_else(|_| "info".into()))
            .env("MIOSA_EDGE_CONTROL_TOKEN", CONTROL_TOKEN)
            .env("MIOSA_EDGE_SESSION_KEY", SESSION_KEY)
            .env("MIOSA_PREVIEW_KEY_K1", PREVIEW_KEY_K1)
            .env("MIOSA_PREVIEW_KEY_K2", PREVIEW_KEY_K2)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn miosa-edge");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = oneshot::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("miosa-edge listening ") {
                    // `http=A control=B[ https=C]`
                    let field = |key: &str| {
                        rest.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse::<SocketAddr>().ok())
                    };
                    if let (Some(h), Some(c)) = (field("http"), field("control")) {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send((h, c, field("https")));
                        }
                    }
                }
            }
        });
        let (addr, control, https) = match tokio::time::timeout(Duration::from_secs(20), rx).await {
            Ok(Ok(a)) => a,
            _ => panic!("edge did not start: {}", std::fs::read_to_string(stderr).unwrap_or_default()),
        };
        let log = || std::fs::read_to_string(stderr).unwrap_or_default();
        let up = eventually(Duration::from_secs(10), || probe(addr)).await;
        assert!(up.is_some(), "edge never accepted connections on {addr}: {}", log());
        if let Some(https) = https {
            let up = eventually(Duration::from_secs(10), || probe(https)).await;
            assert!(up.is_some(), "edge never accepted connections on https {https}: {}", log());
        }
        (child, addr, control, https)
    }

    /// A control-API request with the test token; `body` is sent as JSON when given.
    pub async fn api(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        self.api_with(method, path, body, &[]).await
    }

    /// A control-API request with extra headers (`("If-Match", "\"3\"")`).
    pub async fn api_with(&self, method: &str, path: &str, body: Option<&str>, headers: &[(&str, &str)]) -> Response {
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {CONTROL_TOKEN}\r\nConnection: close\r\n", self.control);
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let has_ct = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        match body {
            Some(b) => {
                if !has_ct {
                    head.push_str("Content-Type: application/json\r\n");
                }
                head.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len()));
            }
            None => head.push_str("\r\n"),
        }
        raw_request(self.control, &head).await
    }

    fn with_server(dir: &Path, server_extra: &str, body: &str) -> String {
        let state_dir = format!("\"{}\"", dir.join("var").display());
        let defaults = [
            ("http", "\"127.0.0.1:0\""),
            ("state_dir", state_dir.as_str()),
            ("watch_interval_ms", "100"),
            ("connect_timeout_ms", "2000"),
            ("read_timeout_ms", "3000"),
        ];
        let given = |key: &str| server_extra.lines().any(|l| l.split_once('=').is_some_and(|(k, _)| k.trim() == key));
        let mut server = String::from("[server]\n");
        for (k, v) in defaults.iter().filter(|(k, _)| !given(k)) {
            server.push_str(&format!("{k} = {v}\n"));
        }
        server.push_str(server_extra.trim());
        format!("{server}\n\n[control]\nlisten = \"127.0.0.1:0\"\n\n{body}")
    }

    /// Replaces the config file atomically (write + rename), as editors and config
    /// management do.
    pub fn write_config(&self, body: &str) {
        let tmp = self.dir.path().join("edge.toml.tmp");
        std::fs::write(&tmp, Edge::with_server(self.dir.path(), &self.server_extra, body)).expect("write config");
        std::fs::rename(&tmp, &self.config).expect("rename config");
    }

    /// Like [`Edge::write_config`], with other `[server]` keys than the edge started with.
    pub fn write_config_server(&self, server_extra: &str, body: &str) {
        let tmp = self.dir.path().join("edge.toml.tmp");
        std::fs::write(&tmp, Edge::with_server(self.dir.path(), server_extra, body)).expect("write config");
        std::fs::rename(&tmp, &self.config).expect("rename config");
    }

    /// Sends SIGHUP.
    pub fn hup(&self) {
        let ok = Command::new("kill").args(["-HUP", &self.child.id().to_string()]).status().expect("kill").success();
        assert!(ok, "kill -HUP failed");
    }

    /// The edge's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// GET `path` with `Host: host`, Accept: application/json.
    pub async fn get(&self, host: &str, path: &str) -> Response {
        self.request(&format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n")).await
    }

    /// Sends a raw request head (without the final blank line; `Connection: close` is
    /// added) and reads the whole response.
    pub async fn request(&self, head: &str) -> Response {
        raw_request(self.addr, &format!("{head}Connection: close\r\n\r\n")).await
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `code` of an edge JSON error.
    pub fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_default().to_string()
    }
}

/// Writes `raw` and reads until the server closes; parses status, headers, body
/// (Content-Length or chunked).
pub async fn raw_request(addr: SocketAddr, raw: &str) -> Response {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(raw.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await.expect("response timed out").expect("read");
    parse_response(&buf)
}

/// [`raw_request`] that reports a refused or reset connection instead of panicking (a
/// peer that may be killed at any moment).
pub async fn try_raw_request(addr: SocketAddr, raw: &str) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(raw.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    if !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no whole response head"));
    }
    Ok(parse_response(&buf))
}

pub fn parse_response(buf: &[u8]) -> Response {
    let end =
        buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))).collect();
    let rest = &buf[end + 4..];
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_vec() };
    Response { status, headers, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        b = &b[i + 2..];
        if size == 0 || b.len() < size {
            break;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[(size + 2).min(b.len())..];
    }
    out
}

type Body = BoxBody<Bytes, Infallible>;

/// Pending `/stream` controls: (started signal, release wait).
type Streams = Arc<Mutex<Vec<(oneshot::Sender<()>, oneshot::Receiver<()>)>>>;

/// Controls of a streaming response served by an [`Origin`] at `/stream`.
pub struct StreamControl {
    /// Signalled once the first chunk was sent.
    pub started: oneshot::Receiver<()>,
    /// Send to release the rest of the body.
    pub release: oneshot::Sender<()>,
}

/// A real HTTP origin: answers JSON describing the request and who it is, `/stream`
/// with a body held open until released.
pub struct Origin {
    pub addr: SocketAddr,
    pub name: String,
    streams: Streams,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    /// Starts an origin named `name` on `ip:0`.
    pub async fn start(name: &str, ip: &str) -> Origin {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind origin");
        let addr = listener.local_addr().expect("addr");
        let streams: Streams = Arc::default();
        let st = streams.clone();
        let nm = name.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, peer)) = listener.accept().await else { return };
                let st = st.clone();
                let nm = nm.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let st = st.clone();
                        let nm = nm.clone();
                        async move { Ok::<_, Infallible>(Origin::answer(&nm, addr, peer, req, &st).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(sock), svc).await;
                });
            }
        });
        Origin { addr, name: name.to_string(), streams, task }
    }

    /// Prepares the next `/stream` request: returns its controls.
    pub fn expect_stream(&self) -> StreamControl {
        let (started_tx, started_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        self.streams.lock().expect("lock").push((started_tx, release_rx));
        StreamControl { started: started_rx, release: release_tx }
    }

    async fn answer(
        name: &str,
        addr: SocketAddr,
        peer: SocketAddr,
        req: hyper::Request<hyper::body::Incoming>,
        streams: &Mutex<Vec<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
    ) -> hyper::Response<Body> {
        if req.uri().path() == "/stream" {
            let ctl = streams.lock().expect("lock").pop();
            let (tx, mut rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first-chunk;")))).await;
                if let Some((started, release)) = ctl {
                    let _ = started.send(());
                    let _ = release.await;
                }
                for i in 0..100 {
                    let _ = tx.send(Ok(Frame::data(Bytes::from(format!("chunk-{i};"))))).await;
                }
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"end")))).await;
            });
            let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            return hyper::Response::builder()
                .header("content-type", "text/plain")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .expect("response");
        }
        let headers: BTreeMap<String, Vec<String>> = req
            .headers()
            .keys()
            .map(|k| {
                (
                    k.as_str().to_string(),
                    req.headers().get_all(k).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect(),
                )
            })
            .collect();
        let body = serde_json::json!({
            "origin": name,
            "addr": addr.to_string(),
            "peer": peer.ip().to_string(),
            "method": req.method().as_str(),
            "path": req.uri().to_string(),
            "headers": headers,
        });
        let len = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
        let mut body = body;
        body["body_len"] = len.into();
        hyper::Response::builder()
            .header("content-type", "application/json")
            .header("x-origin", name)
            .body(BodyExt::boxed(Full::new(Bytes::from(body.to_string()))))
            .expect("response")
    }
}

/// A WebSocket echo origin on `ip:0`.
pub async fn ws_echo(ip: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use futures_util::{SinkExt, StreamExt};
    let listener = TcpListener::bind((ip, 0)).await.expect("bind ws");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(sock).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// A connection to `addr` from 127.0.0.254, closed at once: the harness's readiness probe.
/// It has a loopback address of its own because the edge may count a closed connection
/// for a moment longer, and no test client should find it against its per-IP cap.
async fn probe(addr: SocketAddr) -> Option<()> {
    let sock = tokio::net::TcpSocket::new_v4().ok()?;
    sock.bind(SocketAddr::from(([127, 0, 0, 254], 0))).ok()?;
    sock.connect(addr).await.ok().map(|_| ())
}

/// An origin on `ip:0` that answers every request of a kept-open connection with
/// `answer`, in two writes split at `split` (one write when `split` is its length), with
/// Nagle's algorithm on, as an application that does not set `TCP_NODELAY`.
pub async fn scripted_origin(ip: &str, answer: Vec<u8>, split: usize) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let answer = Arc::new(answer);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            sock.set_nodelay(false).expect("nagle on");
            let answer = answer.clone();
            tokio::spawn(async move {
                loop {
                    if read_head(&mut sock).await.is_none() {
                        return;
                    }
                    let (first, rest) = answer.split_at(split.min(answer.len()));
                    if sock.write_all(first).await.is_err() || (!rest.is_empty() && sock.write_all(rest).await.is_err()) {
                        return;
                    }
                }
            });
        }
    });
    (port, task)
}

/// Reads from `sock` up to the blank line ending a request head (and what came with it);
/// `None` if the peer closes first.
pub async fn read_head(sock: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut b).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    Some(head)
}

/// An origin on `ip:0` that reads one request head per connection, writes what `answer`
/// makes of it, and closes the connection.
pub async fn one_answer_origin(ip: &str, answer: impl Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let answer = Arc::new(answer);
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut sock).await else { return };
                let _ = sock.write_all(&answer(&head)).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (port, task)
}

/// How many `syscall` calls the edge makes while `work` runs, counted by strace attached
/// to its process (scripts/deps installs strace), and strace's record of them.
pub async fn count_syscalls(edge: &Edge, syscall: &str, work: impl std::future::Future<Output = ()>) -> (usize, String) {
    let out = edge.dir.path().join(format!("strace-{syscall}.txt"));
    let mut strace = Command::new("strace")
        .args(["-f", "-e", &format!("trace={syscall}"), "-o"])
        .arg(&out)
        .args(["-p", &edge.child.id().to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .expect("strace (scripts/deps installs it)");
    // strace names every thread it attached to on stderr before it traces them.
    let mut err = strace.stderr.take().expect("stderr");
    let attached = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut seen = String::new();
        let mut b = [0u8; 256];
        while !seen.contains("attached") {
            match err.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&b[..n])),
            }
        }
        (seen, err)
    });
    let (seen, _err) = tokio::time::timeout(Duration::from_secs(10), attached).await.expect("strace attached in time").expect("join");
    assert!(seen.contains("attached"), "strace could not attach: {seen}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    work.await;
    // SAFETY: signals our own child.
    unsafe { libc::kill(strace.id() as libc::pid_t, libc::SIGINT) };
    strace.wait().expect("strace ends");
    let trace = std::fs::read_to_string(&out).expect("strace output");
    let calls = trace.lines().filter(|l| l.contains(&format!("{syscall}("))).count();
    (calls, trace)
}

/// A free port on 127.0.0.1 for a server whose port another process must know before it
/// starts (Redis, Pebble, an edge on a fixed port). Picked below the kernel's ephemeral
/// range (`ip_local_port_range`, where `connect` and a bind to port 0 take theirs), so no
/// socket of the kernel's choosing can take it between now and the server's bind; a
/// counter keeps this process's picks apart, and each is checked free by binding it.
/// Where the range leaves no room below it, the kernel chooses (bound then released).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const SPAN: u32 = 8192;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(0);
    if low < SPAN + 10_000 {
        return closed_port("127.0.0.1");
    }
    // Test binaries run one after another; each starts at its own place in the span.
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low - SPAN + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    closed_port("127.0.0.1")
}

/// A port on `ip` where nothing listens (bound then closed).
pub fn closed_port(ip: &str) -> u16 {
    let l = std::net::TcpListener::bind((ip, 0)).expect("bind");
    l.local_addr().expect("addr").port()
}

/// Reads one response from a kept-open connection, within `limit`: its status line and
/// the parsed response (body by `Content-Length`, `chunked`, or else to the close).
/// `None` when the connection closed or stalled before a whole response.
pub async fn read_response(s: &mut TcpStream, limit: Duration) -> Option<(String, Response)> {
    tokio::time::timeout(limit, async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = parse_response(&buf[..end]);
        let chunked = head.header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let length = head.header("content-length").and_then(|v| v.parse::<usize>().ok());
        loop {
            let body = &buf[end..];
            let done = match (chunked, length) {
                (true, _) => body.ends_with(b"0\r\n\r\n"),
                (false, Some(n)) => body.len() >= n,
                (false, None) => false,
            };
            if done {
                break;
            }
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                if chunked || length.is_some() {
                    return None;
                }
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let status_line = String::from_utf8_lossy(&buf[..buf.windows(2).position(|w| w == b"\r\n").unwrap_or(0)]).into_owned();
        Some((status_line, parse_response(&buf)))
    })
    .await
    .ok()
    .flatten()
}

/// A WebSocket echo origin on `ip:0` that reports each handshake's request target and
/// `Cookie` header.
#[allow(clippy::result_large_err)] // the callback's type is tungstenite's
pub async fn ws_echo_recording(ip: &str) -> (SocketAddr, tokio::task::JoinHandle<()>, mpsc::UnboundedReceiver<(String, Option<String>)>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response as WsResponse};
    let listener = TcpListener::bind((ip, 0)).await.expect("bind ws");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { return };
            let tx = tx.clone();
            tokio::spawn(async move {
                let record = |req: &Request, resp: WsResponse| {
                    let cookie = req.headers().get("cookie").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                    let _ = tx.send((req.uri().to_string(), cookie));
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(sock, record).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task, rx)
}
