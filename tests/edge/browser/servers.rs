//! The two HTTP servers of the browser tests: the preview [`App`] (the sandbox's dev
//! server: a page, its script, a JSON API and a WebSocket echo, recording every
//! request that reaches it) and the [`Embedder`] (another site whose page frames the
//! preview and collects the frame's `postMessage` reports in `window.results`).

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

/// What `/api/data` answers.
pub const API_BODY: &str = r#"{"data":"from-the-app"}"#;

/// What the app's script sends over its WebSocket (and expects echoed).
pub const WS_MESSAGE: &str = "hello-through-the-edge";

/// The app's page: its only logic is in `/app.js`, a subresource, so a passing test
/// proves subresources load after the token redirect.
const APP_HTML: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>preview app</title></head>
<body><h1 id="app">preview app</h1><script src="/app.js"></script></body></html>
"#;

/// Reports to the embedding page: `loaded` (with the final `location.href`), `api`
/// (status and body of a same-origin fetch), `ws-open`, `ws-echo`, `ws-error`,
/// `ws-closed` (with the close code).
const APP_JS: &str = r#"(function () {
  function post(m) { parent.postMessage(m, '*'); }
  post({ type: 'loaded', href: location.href });
  fetch('/api/data')
    .then(function (r) { return r.text().then(function (t) { post({ type: 'api', status: r.status, body: t }); }); })
    .catch(function (e) { post({ type: 'api', status: 0, body: String(e) }); });
  var ws = new WebSocket('ws://' + location.host + '/ws');
  ws.onopen = function () { post({ type: 'ws-open' }); ws.send('{WS_MESSAGE}'); };
  ws.onmessage = function (e) { post({ type: 'ws-echo', data: String(e.data) }); };
  ws.onerror = function () { post({ type: 'ws-error' }); };
  ws.onclose = function (e) { post({ type: 'ws-closed', code: e.code }); };
})();
"#;

type Resp = hyper::Response<Full<Bytes>>;

fn respond(status: u16, content_type: &str, body: impl Into<Bytes>) -> Resp {
    hyper::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(body.into()))
        .expect("response")
}

/// One request as the app received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Path and query.
    pub path: String,
    /// Every header as received (names lower-case), repeated names kept.
    pub headers: Vec<(String, String)>,
}

/// The preview app on `ip:0`.
pub struct App {
    /// Where it listens (the sandbox address and preview port).
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    /// Starts the app: `/` (page), `/app.js`, `/api/data` ([`API_BODY`]) and `/ws`
    /// (WebSocket echo); anything else 404.
    pub async fn start(ip: &str) -> App {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind app");
        let addr = listener.local_addr().expect("app addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(App::answer(req, &log)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(sock), svc).with_upgrades().await;
                });
            }
        });
        App { addr, seen, task }
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }

    fn answer(mut req: hyper::Request<hyper::body::Incoming>, log: &Mutex<Vec<Seen>>) -> Resp {
        let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
        let headers =
            req.headers().iter().map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect();
        log.lock().expect("seen lock").push(Seen { path, headers });
        match req.uri().path() {
            "/" => respond(200, "text/html; charset=utf-8", APP_HTML),
            "/app.js" => respond(200, "text/javascript", APP_JS.replace("{WS_MESSAGE}", WS_MESSAGE)),
            "/api/data" => respond(200, "application/json", API_BODY),
            "/ws" => {
                let Some(key) = req.headers().get("sec-websocket-key").map(|k| derive_accept_key(k.as_bytes())) else {
                    return respond(400, "text/plain", "websocket only");
                };
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    let Ok(upgraded) = upgrade.await else { return };
                    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
                    while let Some(Ok(msg)) = ws.next().await {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                });
                hyper::Response::builder()
                    .status(101)
                    .header("connection", "Upgrade")
                    .header("upgrade", "websocket")
                    .header("sec-websocket-accept", key)
                    .body(Full::new(Bytes::new()))
                    .expect("response")
            }
            _ => respond(404, "text/plain", "not found"),
        }
    }
}

/// The embedding site on `127.0.0.1:0`: `/` is a page with one `<iframe id="preview">`
/// and a `message` listener that appends `{origin, data}` to `window.results`.
pub struct Embedder {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Embedder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Embedder {
    /// Starts the embedder whose page frames `frame_src`.
    pub async fn start(frame_src: &str) -> Embedder {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind embedder");
        let addr = listener.local_addr().expect("embedder addr");
        let src = frame_src.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;");
        let page: Bytes = format!(
            r#"<!doctype html>
<html><head><meta charset="utf-8"><title>embedder</title>
<script>
window.results = [];
window.addEventListener('message', function (e) {{ window.results.push({{ origin: e.origin, data: e.data }}); }});
</script></head>
<body><iframe id="preview" src="{src}" width="800" height="600"></iframe></body></html>
"#
        )
        .into();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                let page = page.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let page = page.clone();
                        async move {
                            Ok::<_, Infallible>(match req.uri().path() {
                                "/" => respond(200, "text/html; charset=utf-8", page),
                                _ => respond(404, "text/plain", "not found"),
                            })
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(sock), svc).await;
                });
            }
        });
        Embedder { addr, task }
    }

    /// The page's URL.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}
