//! Waking suspended sandboxes (CONTRACT §8): one hook call however many requests
//! wait, requests held until the control plane pushes `running` and then proxied to the
//! pushed address; failing or slow hooks answer 503 `sandbox_starting` without holding
//! other sandboxes.
//!
//! The hook is a real HTTP server on loopback that behaves like a control plane: on a
//! call it answers, and (for sandboxes it can start) pushes the sandbox as running
//! through the edge's control API a little later.

use crate::support::{eventually, raw_request, Edge, Origin, Response, CONTROL_TOKEN};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the hook does when asked to wake a sandbox.
#[derive(Clone)]
enum Behaviour {
    /// Answers 200, then, once `gate` is open and `delay` has passed, pushes `sandbox`
    /// (a JSON object with `state: running`) with `PUT /v1/sandboxes/{id}`.
    Start { sandbox: serde_json::Value, delay: Duration, gate: Option<watch::Receiver<bool>> },
    /// Answers this status and does nothing else.
    Status(u16),
    /// Does not answer for a long time.
    Hang,
}

/// One call the hook received.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    content_type: String,
    body: String,
}

/// A control plane's wake hook on loopback.
struct Hook {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    /// The edge's control API, known once the edge is up.
    control: Arc<OnceLock<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hook {
    async fn start(behaviours: HashMap<String, Behaviour>) -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hook");
        let addr = listener.local_addr().expect("addr");
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let control: Arc<OnceLock<SocketAddr>> = Arc::default();
        let behaviours = Arc::new(behaviours);
        let (c, ctl) = (calls.clone(), control.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                let (c, ctl, behaviours) = (c.clone(), ctl.clone(), behaviours.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (c, ctl, behaviours) = (c.clone(), ctl.clone(), behaviours.clone());
                        async move { Ok::<_, Infallible>(Hook::answer(req, &c, &ctl, &behaviours).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(sock), svc).await;
                });
            }
        });
        Hook { addr, calls, control, task }
    }

    async fn answer(
        req: hyper::Request<hyper::body::Incoming>,
        calls: &Mutex<Vec<Call>>,
        control: &Arc<OnceLock<SocketAddr>>,
        behaviours: &HashMap<String, Behaviour>,
    ) -> hyper::Response<Full<Bytes>> {
        let method = req.method().to_string();
        let path = req.uri().to_string();
        let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let body = String::from_utf8_lossy(&body).into_owned();
        calls.lock().expect("lock").push(Call { method, path, content_type, body: body.clone() });
        let id = serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["sandbox"].as_str().map(str::to_string));
        let status = match id.and_then(|id| behaviours.get(&id).cloned()) {
            Some(Behaviour::Start { sandbox, delay, gate }) => {
                let control = control.clone();
                tokio::spawn(async move {
                    if let Some(mut gate) = gate {
                        let _ = gate.wait_for(|open| *open).await;
                    }
                    tokio::time::sleep(delay).await;
                    let Some(control) = control.get().copied() else { return };
                    let r = put_sandbox(control, &sandbox).await;
                    assert_eq!(r.status, 200, "the push failed: {}", r.text());
                });
                200
            }
            Some(Behaviour::Status(s)) => s,
            Some(Behaviour::Hang) => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                200
            }
            None => 404,
        };
        hyper::Response::builder().status(status).body(Full::new(Bytes::from_static(b"{}"))).expect("response")
    }

    fn url(&self) -> String {
        format!("http://{}/v1/wake", self.addr)
    }

    fn calls_for(&self, id: &str) -> Vec<Call> {
        let want = format!(r#"{{"sandbox":"{id}"}}"#);
        self.calls.lock().expect("lock").iter().filter(|c| c.body == want).cloned().collect()
    }
}

/// `PUT /v1/sandboxes/{id}` on the control API, as the control plane does.
async fn put_sandbox(control: SocketAddr, sandbox: &serde_json::Value) -> Response {
    let id = sandbox["id"].as_str().unwrap_or_default();
    let body = sandbox.to_string();
    let raw = format!(
        "PUT /v1/sandboxes/{id} HTTP/1.1\r\nHost: {control}\r\nAuthorization: Bearer {CONTROL_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw_request(control, &raw).await
}

fn sandbox(id: &str, address: &str, port: u16, state: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "workspace": "ws_w",
        "address": address,
        "state": state,
        "previews": [{"port": port, "access": "public"}],
    })
}

fn config(hook: &Hook, timeout_ms: u64) -> String {
    format!("[wake]\nurl = \"{}\"\ntimeout_ms = {timeout_ms}\n\n[[workspaces]]\nid = \"ws_w\"\nslug = \"w\"\n", hook.url())
}

/// A counter in the edge's `/metrics` text (0 when absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0)
}

/// GET with `accept`, timed from the first byte sent.
async fn timed_get(edge: SocketAddr, host: &str, accept: &str) -> (Response, Duration) {
    let t0 = Instant::now();
    let r = raw_request(edge, &format!("GET / HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n")).await;
    (r, t0.elapsed())
}

#[tokio::test]
async fn two_hundred_waiters_cause_one_wake_call_and_all_succeed() {
    // Suspended at an address where nothing listens; the control plane brings it back
    // at another one (where the origin runs): requests must go to the pushed address.
    let origin = Origin::start("woken", "127.0.0.6").await;
    let port = origin.addr.port();
    let (gate_tx, gate) = watch::channel(false);
    let running = sandbox("wakeme", "127.0.0.6", port, "running");
    let hook = Hook::start(HashMap::from([(
        "wakeme".to_string(),
        Behaviour::Start { sandbox: running, delay: Duration::from_millis(300), gate: Some(gate) },
    )]))
    .await;
    let edge = Edge::start(&config(&hook, 10_000)).await;
    let _ = hook.control.set(edge.control);
    let r = edge.api("PUT", "/v1/sandboxes/wakeme", Some(&sandbox("wakeme", "127.0.0.9", port, "suspended").to_string())).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let host = format!("{port}-wakeme.sandbox.localhost");
    let sent = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (host, sent, addr) = (host.clone(), sent.clone(), edge.addr);
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                let req = format!("GET /w HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\nConnection: close\r\n\r\n");
                s.write_all(req.as_bytes()).await.expect("write");
                sent.fetch_add(1, Ordering::SeqCst);
                let mut buf = Vec::new();
                tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await.expect("response timed out").expect("read");
                crate::support::parse_response(&buf)
            })
        })
        .collect();
    // The control plane pushes `running` only after every request is on its way, so
    // all 200 are held (300 ms after the last one is sent).
    let all_sent = eventually(Duration::from_secs(10), || {
        let sent = sent.clone();
        async move { (sent.load(Ordering::SeqCst) == 200).then_some(()) }
    })
    .await;
    assert!(all_sent.is_some(), "the requests were not all sent");
    gate_tx.send_replace(true);

    for t in tasks {
        let r = t.await.expect("task");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["origin"], "woken");
        assert_eq!(r.json()["path"], "/w");
    }
    let calls = hook.calls.lock().expect("lock").clone();
    assert_eq!(calls.len(), 1, "exactly one wake call: {calls:?}");
    assert_eq!(calls[0].method, "POST");
    assert_eq!(calls[0].path, "/v1/wake");
    assert_eq!(calls[0].content_type, "application/json");
    assert_eq!(calls[0].body, r#"{"sandbox":"wakeme"}"#);

    let m = edge.api("GET", "/metrics", None).await.text();
    assert_eq!(metric(&m, r#"miosa_edge_wake_calls_total{result="ok"}"#), 1, "{m}");
    assert_eq!(metric(&m, r#"miosa_edge_wake_calls_total{result="error"}"#), 0);
    assert_eq!(metric(&m, r#"miosa_edge_wake_waits_total{result="woken"}"#), 200);
    assert_eq!(metric(&m, r#"miosa_edge_wake_waits_total{result="timeout"}"#), 0);

    // Running now: served directly, no further call.
    assert_eq!(edge.get(&host, "/").await.json()["origin"], "woken");
    assert_eq!(hook.calls.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn failing_and_slow_hooks_answer_starting_and_never_block_other_sandboxes() {
    const TIMEOUT_MS: u64 = 1500;
    let origin = Origin::start("woken-2", "127.0.0.7").await;
    let port = origin.addr.port();
    let hook = Hook::start(HashMap::from([
        (
            "wakeme".to_string(),
            Behaviour::Start { sandbox: sandbox("wakeme", "127.0.0.7", port, "running"), delay: Duration::from_millis(200), gate: None },
        ),
        ("broken".to_string(), Behaviour::Status(500)),
        ("hang".to_string(), Behaviour::Hang),
        // The hook accepts, but the control plane never pushes the sandbox.
        ("silent".to_string(), Behaviour::Status(202)),
    ]))
    .await;
    let edge = Edge::start(&config(&hook, TIMEOUT_MS)).await;
    let _ = hook.control.set(edge.control);
    for id in ["wakeme", "broken", "hang", "silent"] {
        let r = edge.api("PUT", &format!("/v1/sandboxes/{id}"), Some(&sandbox(id, "127.0.0.7", port, "suspended").to_string())).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let host = |id: &str| format!("{port}-{id}.sandbox.localhost");
    let json = "application/json";

    let (h_hang, h_silent, h_wakeme, h_broken) = (host("hang"), host("silent"), host("wakeme"), host("broken"));
    let (hang, silent, wakeme, broken, broken_html) = tokio::join!(
        timed_get(edge.addr, &h_hang, json),
        timed_get(edge.addr, &h_silent, json),
        timed_get(edge.addr, &h_wakeme, json),
        timed_get(edge.addr, &h_broken, json),
        timed_get(edge.addr, &h_broken, "text/html,*/*"),
    );
    let timeout = Duration::from_millis(TIMEOUT_MS);

    // The sandbox whose hook works is served while the others still wait.
    assert_eq!(wakeme.0.status, 200, "{}", wakeme.0.text());
    assert_eq!(wakeme.0.json()["origin"], "woken-2");
    assert!(wakeme.1 < hang.1, "a hanging hook delayed another sandbox: {:?} vs {:?}", wakeme.1, hang.1);

    // Past the timeout: 503 sandbox_starting with Retry-After.
    for (what, (r, took)) in [("hang", &hang), ("silent", &silent)] {
        assert_eq!((r.status, r.code()), (503, "sandbox_starting".into()), "{what}: {}", r.text());
        assert!(r.header("retry-after").is_some(), "{what}");
        assert!(*took >= timeout - Duration::from_millis(100), "{what} answered after {took:?}, before the timeout");
    }
    // A failing hook is answered the same way, without waiting for the timeout; the
    // browser gets the page that retries by itself.
    assert_eq!((broken.0.status, broken.0.code()), (503, "sandbox_starting".into()), "{}", broken.0.text());
    assert!(broken.0.header("retry-after").is_some());
    assert!(broken.1 < timeout, "a failed hook call still held the request for {:?}", broken.1);
    assert_eq!(broken_html.0.status, 503);
    assert!(broken_html.0.header("content-type").unwrap_or_default().starts_with("text/html"));
    assert!(broken_html.0.text().contains("http-equiv=\"refresh\""));
    assert!(broken_html.0.header("retry-after").is_some());

    // One call per sandbox (two broken requests at most two, if the second came after
    // the failed call's back-off), each with the sandbox id as its body.
    for id in ["wakeme", "hang", "silent"] {
        assert_eq!(hook.calls_for(id).len(), 1, "{id}");
    }
    assert!((1..=2).contains(&hook.calls_for("broken").len()));
    let all = hook.calls.lock().expect("lock").len();
    let broken_calls = hook.calls_for("broken").len();
    assert_eq!(all, 3 + broken_calls, "no other bodies");

    // The hanging call fails at its own timeout; everything is counted.
    let m = eventually(Duration::from_secs(10), || async {
        let m = edge.api("GET", "/metrics", None).await.text();
        (metric(&m, r#"miosa_edge_wake_calls_total{result="error"}"#) >= 2).then_some(m)
    })
    .await
    .expect("the failed calls are counted");
    assert_eq!(metric(&m, r#"miosa_edge_wake_calls_total{result="ok"}"#), 2, "{m}");
    assert_eq!(metric(&m, r#"miosa_edge_wake_calls_total{result="error"}"#), 1 + broken_calls as u64);
    assert_eq!(metric(&m, r#"miosa_edge_wake_waits_total{result="woken"}"#), 1);
    let timed_out = metric(&m, r#"miosa_edge_wake_waits_total{result="timeout"}"#);
    let failed = metric(&m, r#"miosa_edge_wake_waits_total{result="failed"}"#);
    // `hang` ends by its deadline or by its call's timeout, whichever fires first.
    assert!(timed_out >= 1 && failed >= 2 && timed_out + failed == 4, "timeout {timed_out}, failed {failed}");
    let log = edge.log();
    assert!(log.contains("wake hook failed") && log.contains("broken"), "the failure is logged: {log}");
}

/// `[wake]` reloads live (CONTRACT §10): added to a running edge, suspended sandboxes
/// are woken through it; its `timeout_ms` and `url` changed, the new ones apply; removed,
/// they answer 503 at once again. Before, the waker was built once at start: a
/// reload only logged "takes effect on restart".
#[tokio::test]
async fn wake_section_reloads_live() {
    let origin = Origin::start("woken-live", "127.0.0.6").await;
    let port = origin.addr.port();
    let hook = Hook::start(HashMap::from([
        (
            "wakeme".to_string(),
            Behaviour::Start { sandbox: sandbox("wakeme", "127.0.0.6", port, "running"), delay: Duration::from_millis(100), gate: None },
        ),
        ("silent".to_string(), Behaviour::Status(202)),
    ]))
    .await;
    let base = "[[workspaces]]\nid = \"ws_w\"\nslug = \"w\"\n";
    let edge = Edge::start(base).await;
    let _ = hook.control.set(edge.control);
    for id in ["wakeme", "silent"] {
        let r = edge.api("PUT", &format!("/v1/sandboxes/{id}"), Some(&sandbox(id, "127.0.0.9", port, "suspended").to_string())).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let host = |id: &str| format!("{port}-{id}.sandbox.localhost");
    let json = "application/json";

    // No [wake]: 503 at once, no call.
    let (r, _) = timed_get(edge.addr, &host("wakeme"), json).await;
    assert_eq!((r.status, r.code()), (503, "sandbox_starting".into()), "{}", r.text());
    assert!(hook.calls.lock().expect("lock").is_empty());

    // [wake] added: the sandbox is woken and served.
    edge.write_config(&config(&hook, 10_000));
    let r = eventually(Duration::from_secs(15), || async {
        let (r, _) = timed_get(edge.addr, &host("wakeme"), json).await;
        (r.status == 200).then_some(r)
    })
    .await
    .unwrap_or_else(|| panic!("the added [wake] was never used\n{}", edge.log()));
    assert_eq!(r.json()["origin"], "woken-live");
    assert_eq!(hook.calls_for("wakeme").len(), 1);

    // timeout_ms changed: a sandbox the control plane never pushes is held for the new
    // timeout (1 s), not the old one (10 s).
    edge.write_config(&config(&hook, 1000));
    let held = eventually(Duration::from_secs(30), || async {
        let (r, took) = timed_get(edge.addr, &host("silent"), json).await;
        (r.status == 503 && took < Duration::from_secs(5)).then_some(took)
    })
    .await
    .unwrap_or_else(|| panic!("the new timeout_ms was never used\n{}", edge.log()));
    assert!(held >= Duration::from_millis(900), "held {held:?}, the hook was called: {:?}", hook.calls_for("silent"));

    // [wake] removed: 503 at once again, and no further call.
    let calls = hook.calls.lock().expect("lock").len();
    edge.write_config(base);
    eventually(Duration::from_secs(15), || async {
        let (r, took) = timed_get(edge.addr, &host("silent"), json).await;
        (r.status == 503 && took < Duration::from_millis(500)).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("the removed [wake] is still used\n{}", edge.log()));
    let (r, took) = timed_get(edge.addr, &host("silent"), json).await;
    assert_eq!((r.status, r.code()), (503, "sandbox_starting".into()));
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert!(hook.calls.lock().expect("lock").len() <= calls + 1, "calls after removal");
    assert!(!edge.log().contains("takes effect on restart"), "{}", edge.log());
}
