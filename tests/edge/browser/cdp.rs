//! A small Chrome DevTools Protocol client for the browser tests: launches headless
//! Chromium on a fresh profile, connects to its browser-level WebSocket endpoint and
//! speaks CDP with flattened sessions (one socket; page and frame commands carry a
//! `sessionId`).
//!
//! Only what the tests need: commands with bounded waits, a log of every event, pages
//! created with `Target.createTarget`, and cross-site frames (OOPIFs) reached through
//! `Target.setAutoAttach`. Chromium's process group is killed and its profile removed
//! on drop, also when a test panics.

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Where CI installs Chromium (`scripts/deps`).
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Bound for one CDP command.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A headless Chromium process with a CDP connection to its browser target.
pub struct Chromium {
    child: Child,
    /// Chromium's stderr, line by line (for failure messages).
    stderr: Arc<Mutex<Vec<String>>>,
    /// The connection to the browser endpoint.
    pub cdp: Cdp,
    /// Removed after the process is gone (field drop order: after `Drop::drop`).
    _profile: tempfile::TempDir,
}

impl Chromium {
    /// Starts `/usr/bin/chromium` headless on a fresh profile and connects to it.
    /// Panics with a clear message when Chromium is not installed or does not start
    /// within 20 s.
    pub async fn launch() -> Chromium {
        assert!(
            std::path::Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: the browser tests need Chromium (run scripts/deps, which installs the Debian packages chromium and chromium-driver)"
        );
        let profile = tempfile::Builder::new().prefix("miosa-edge-chromium-").tempdir().expect("chromium profile dir");
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                "--host-resolver-rules=MAP *.localhost 127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so drop can kill the renderers and helpers too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {CHROMIUM}: {e}"));

        // Read stderr until the end (a full pipe would block Chromium), reporting the
        // DevTools endpoint once it appears.
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = oneshot::channel::<String>();
        let pipe = child.stderr.take().expect("chromium stderr");
        let lines = stderr.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url.trim().to_string());
                    }
                }
                lines.lock().expect("stderr lock").push(line);
            }
        });
        // From here on, a panic drops `chromium` and so kills the process group.
        let mut chromium = Chromium { child, stderr, cdp: Cdp::empty(), _profile: profile };
        let url = match tokio::time::timeout(Duration::from_secs(20), rx).await {
            Ok(Ok(url)) => url,
            _ => panic!("chromium printed no DevTools endpoint within 20 s; stderr:\n{}", chromium.stderr_tail(40)),
        };
        chromium.cdp = Cdp::connect(&url).await;
        chromium
    }

    /// The last `n` lines Chromium wrote to stderr, without its D-Bus noise (no
    /// session bus in CI containers).
    pub fn stderr_tail(&self, n: usize) -> String {
        let lines = self.stderr.lock().expect("stderr lock");
        let useful: Vec<&str> = lines.iter().map(String::as_str).filter(|l| !l.contains(":ERROR:dbus/")).collect();
        useful[useful.len().saturating_sub(n)..].join("\n")
    }

    /// Opens a new tab on `about:blank`, attached with its own session, with `Page`,
    /// `Runtime`, `Network` and `Audits` enabled, and auto-attaching to its cross-site
    /// frames (their sessions appear as `Target.attachedToTarget` events).
    pub async fn new_page(&self) -> Page<'_> {
        let cdp = &self.cdp;
        let target = cdp.call(None, "Target.createTarget", json!({"url": "about:blank"})).await.expect("Target.createTarget");
        let target = target["targetId"].as_str().expect("targetId").to_string();
        let attached =
            cdp.call(None, "Target.attachToTarget", json!({"targetId": target, "flatten": true})).await.expect("Target.attachToTarget");
        let session = attached["sessionId"].as_str().expect("sessionId").to_string();
        for method in ["Page.enable", "Runtime.enable", "Network.enable", "Audits.enable"] {
            cdp.call(Some(&session), method, json!({})).await.unwrap_or_else(|e| panic!("{method}: {e}"));
        }
        cdp.call(Some(&session), "Target.setAutoAttach", json!({"autoAttach": true, "waitForDebuggerOnStart": false, "flatten": true}))
            .await
            .expect("Target.setAutoAttach");
        Page { cdp, session }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The group id is Chromium's pid (process_group(0)); the group holds only the
        // processes this test started.
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CDP event as received.
#[derive(Debug, Clone)]
pub struct Event {
    /// The session it came from (`None`: the browser target).
    pub session: Option<String>,
    /// E.g. `Target.attachedToTarget`.
    pub method: String,
    /// The event's `params`.
    pub params: Value,
}

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

/// One CDP connection: numbered commands answered through a reader task, every event
/// kept in order.
pub struct Cdp {
    sink: Option<tokio::sync::Mutex<Sink>>,
    next_id: AtomicU64,
    pending: Pending,
    events: Arc<Mutex<Vec<Event>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Cdp {
    fn drop(&mut self) {
        if let Some(r) = &self.reader {
            r.abort();
        }
    }
}

impl Cdp {
    fn empty() -> Cdp {
        Cdp { sink: None, next_id: AtomicU64::new(1), pending: Arc::default(), events: Arc::default(), reader: None }
    }

    /// Connects to a `ws://127.0.0.1:PORT/devtools/browser/…` endpoint.
    async fn connect(url: &str) -> Cdp {
        let authority = url.strip_prefix("ws://").and_then(|r| r.split('/').next()).unwrap_or_else(|| panic!("odd DevTools url {url}"));
        let tcp = TcpStream::connect(authority).await.unwrap_or_else(|e| panic!("connect to DevTools {authority}: {e}"));
        let (ws, _) = tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::client_async(url, tcp))
            .await
            .expect("DevTools handshake timed out")
            .unwrap_or_else(|e| panic!("DevTools handshake {url}: {e}"));
        let (sink, mut stream) = ws.split();
        let pending: Pending = Arc::default();
        let events: Arc<Mutex<Vec<Event>>> = Arc::default();
        let (p, ev) = (pending.clone(), events.clone());
        let reader = tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                if let Some(id) = v["id"].as_u64() {
                    let answer = match v.get("error") {
                        Some(e) => Err(format!("{} ({})", e["message"].as_str().unwrap_or("error"), e)),
                        None => Ok(v["result"].clone()),
                    };
                    if let Some(tx) = pending.lock().expect("pending lock").remove(&id) {
                        let _ = tx.send(answer);
                    }
                } else if let Some(method) = v["method"].as_str() {
                    let session = v["sessionId"].as_str().map(str::to_string);
                    events.lock().expect("events lock").push(Event { session, method: method.to_string(), params: v["params"].clone() });
                }
            }
            // Connection gone: fail whoever still waits.
            for (_, tx) in pending.lock().expect("pending lock").drain() {
                let _ = tx.send(Err("DevTools connection closed".into()));
            }
        });
        Cdp { sink: Some(tokio::sync::Mutex::new(sink)), next_id: AtomicU64::new(1), pending: p, events: ev, reader: Some(reader) }
    }

    /// Sends `method` with `params` (to `session`, or the browser target when `None`)
    /// and waits up to 10 s for its result. `Err` carries Chromium's error message.
    pub async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Result<Value, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        let sink = self.sink.as_ref().ok_or("not connected")?;
        sink.lock().await.send(Message::text(msg.to_string())).await.map_err(|e| format!("send {method}: {e}"))?;
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(answer)) => answer.map_err(|e| format!("{method}: {e}")),
            Ok(Err(_)) => Err(format!("{method}: DevTools connection closed")),
            Err(_) => {
                self.pending.lock().expect("pending lock").remove(&id);
                Err(format!("{method}: no answer within {CALL_TIMEOUT:?}"))
            }
        }
    }

    /// Every event received so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("events lock").clone()
    }
}

/// A tab attached with its own flattened session.
pub struct Page<'a> {
    /// The browser connection the session lives on.
    pub cdp: &'a Cdp,
    /// The tab's session id.
    pub session: String,
}

impl Page<'_> {
    /// Navigates the tab and waits (up to 20 s) for its load event.
    pub async fn navigate(&self, url: &str) {
        let seen = self.cdp.events().len();
        let r = self.cdp.call(Some(&self.session), "Page.navigate", json!({"url": url})).await.expect("Page.navigate");
        assert!(r.get("errorText").is_none(), "navigation to {url} failed: {r}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let loaded = self.cdp.events()[seen..]
                .iter()
                .any(|e| e.session.as_deref() == Some(self.session.as_str()) && e.method == "Page.loadEventFired");
            if loaded {
                return;
            }
            assert!(Instant::now() < deadline, "{url} did not fire its load event within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Evaluates `expr` in the tab's main frame; the value (JSON), or the exception.
    pub async fn evaluate(&self, expr: &str) -> Result<Value, String> {
        evaluate(self.cdp, &self.session, expr).await
    }

    /// Sessions of this tab's cross-site frames (OOPIFs) that are still attached,
    /// newest first.
    pub fn frame_sessions(&self) -> Vec<String> {
        let mut live: Vec<String> = Vec::new();
        for e in self.cdp.events() {
            match e.method.as_str() {
                "Target.attachedToTarget"
                    if e.session.as_deref() == Some(self.session.as_str()) && e.params["targetInfo"]["type"] == "iframe" =>
                {
                    live.push(e.params["sessionId"].as_str().unwrap_or_default().to_string());
                }
                "Target.detachedFromTarget" => {
                    let gone = e.params["sessionId"].as_str().unwrap_or_default();
                    live.retain(|s| s != gone);
                }
                _ => {}
            }
        }
        live.reverse();
        live
    }

    /// Evaluates `expr` in every attached cross-site frame; `(session, value)` of those
    /// where it succeeded.
    pub async fn evaluate_in_frames(&self, expr: &str) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for s in self.frame_sessions() {
            if let Ok(v) = evaluate(self.cdp, &s, expr).await {
                out.push((s, v));
            }
        }
        out
    }
}

/// `Runtime.evaluate` in `session`'s default context, awaiting promises, returning
/// the value by JSON (`Null` for `undefined`).
pub async fn evaluate(cdp: &Cdp, session: &str, expr: &str) -> Result<Value, String> {
    let r = cdp.call(Some(session), "Runtime.evaluate", json!({"expression": expr, "returnByValue": true, "awaitPromise": true})).await?;
    if let Some(ex) = r.get("exceptionDetails") {
        return Err(format!("exception: {ex}"));
    }
    Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
}
