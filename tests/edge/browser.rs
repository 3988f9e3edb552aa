//! Access tokens in a real browser (CONTRACT §3): headless Chromium, driven over the
//! DevTools protocol, opens a page of another site that frames a private preview with
//! `?token=mp_…` or `?token=ms_…`. Inside the cross-site frame the app's page, its
//! script (a subresource), a same-origin `fetch` and a WebSocket must all work on the
//! session cookie the edge sets with its 303; the token must leave the address bar;
//! deleting a share record must close the frame's WebSocket and turn the next load
//! into the branded 401 page; and the app must never see a token, an `X-Miosa-*`
//! header or the edge's cookie.
//!
//! The frame reports to the embedding page with `postMessage`; the test reads
//! `window.results` of the top page with `Runtime.evaluate`, and reads the frame's own
//! document through its out-of-process-iframe session (`Target.setAutoAttach`).

mod cdp;
mod servers;

use crate::support::{eventually, Edge, PREVIEW_KEY_K1, TOKENS_TOML};
use cdp::{Chromium, Page};
use serde_json::{json, Value};
use servers::{App, Embedder, API_BODY, WS_MESSAGE};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The sandbox every test previews.
const SANDBOX: &str = "abc12345";

/// The edge's cookie, under both of its names (CONTRACT §3).
const COOKIE_NAMES: [&str; 2] = ["__Host-miosa_session", "miosa_session"];

/// Bound for the frame to load and report (page, fetch, WebSocket echo).
const FLOW_LIMIT: Duration = Duration::from_secs(20);

/// The edge configuration: the test keys (`TOKENS_TOML`, from the env variables `Edge`
/// sets), one workspace and the sandbox previewing the app's port privately.
fn config(app_port: u16) -> String {
    format!(
        r#"{TOKENS_TOML}
[branding]
name = "MIOSA"

[[workspaces]]
id = "ws_1"
slug = "one"

[[sandboxes]]
id = "{SANDBOX}"
workspace = "ws_1"
address = "127.0.0.1"
previews = [{{ port = {app_port}, access = "private" }}]
"#
    )
}

/// Unpadded base64url.
fn b64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// An `mp_` token: an HS256 JWT (kid `k1`) for `port` of [`SANDBOX`], valid one hour.
/// Signed here with `ring`, independently of the edge's JWT library.
fn preview_token(port: u16) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": "k1"});
    let claims = json!({"sub": SANDBOX, "port": port, "iat": now, "exp": now + 3600});
    let signed = format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, PREVIEW_KEY_K1.as_bytes());
    let sig = ring::hmac::sign(&key, signed.as_bytes());
    format!("mp_{signed}.{}", b64url(sig.as_ref()))
}

/// A fresh `ms_` token (192 random bits: 32 base64url characters) and its
/// `token_sha256`.
fn share_token() -> (String, String) {
    use ring::rand::SecureRandom;
    let mut raw = [0u8; 24];
    ring::rand::SystemRandom::new().fill(&mut raw).expect("random");
    let token = format!("ms_{}", b64url(&raw));
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hex = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    (token, hex)
}

/// The app, the edge in front of it, and a browser.
struct World {
    app: App,
    edge: Edge,
    chromium: Chromium,
}

impl World {
    async fn start() -> World {
        let app = App::start("127.0.0.1").await;
        let config = config(app.addr.port());
        let (edge, chromium) = tokio::join!(Edge::start(&config), Chromium::launch());
        World { app, edge, chromium }
    }

    /// `{port}-abc12345.sandbox.localhost:{edge port}`.
    fn host(&self) -> String {
        format!("{}-{SANDBOX}.sandbox.localhost:{}", self.app.addr.port(), self.edge.addr.port())
    }

    /// The preview's root URL, without token.
    fn preview_url(&self) -> String {
        format!("http://{}/", self.host())
    }

    /// The frame's messages so far: `[{origin, data}]`.
    async fn results(&self, page: &Page<'_>) -> Vec<Value> {
        match page.evaluate("window.results").await {
            Ok(Value::Array(v)) => v,
            _ => Vec::new(),
        }
    }

    /// Polls the frame's messages until `done` holds; panics after `limit` with
    /// everything a reader needs to see why, or as soon as a document from the
    /// preview host was answered with an error status (it will not report then).
    async fn wait_for(&self, page: &Page<'_>, limit: Duration, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        let origin = format!("http://{}/", self.host());
        loop {
            let results = self.results(page).await;
            if done(&results) {
                return results;
            }
            let refused = self.chromium.cdp.events().into_iter().find(|e| {
                let r = &e.params["response"];
                e.method == "Network.responseReceived"
                    && e.params["type"] == "Document"
                    && r["url"].as_str().is_some_and(|u| u.starts_with(&origin))
                    && r["status"].as_u64().is_some_and(|s| s >= 400)
            });
            if let Some(e) = refused {
                panic!("{what}: the frame's document got {}\n{}", e.params["response"]["status"], self.report(page).await);
            }
            if Instant::now() > deadline {
                panic!("{what}: not within {limit:?}\n{}", self.report(page).await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Diagnostics: frame messages, browser cookies, cookies the browser blocked,
    /// audit issues, what the app received, and the tails of both logs.
    async fn report(&self, page: &Page<'_>) -> String {
        let cdp = &self.chromium.cdp;
        let cookies = cdp.call(None, "Storage.getCookies", json!({})).await.map(|c| c["cookies"].clone());
        let mut responses = Vec::new();
        let mut blocked = Vec::new();
        let mut issues = Vec::new();
        for e in cdp.events() {
            match e.method.as_str() {
                "Network.responseReceived" => responses.push(format!("{} {}", e.params["response"]["status"], e.params["response"]["url"])),
                "Network.responseReceivedExtraInfo" if e.params["blockedCookies"].as_array().is_some_and(|a| !a.is_empty()) => {
                    blocked.push(json!({"response": e.params["blockedCookies"], "headers": e.params["headers"]}))
                }
                "Network.requestWillBeSentExtraInfo" => {
                    let b: Vec<&Value> = e.params["associatedCookies"]
                        .as_array()
                        .map(|a| a.iter().filter(|c| c["blockedReasons"].as_array().is_some_and(|r| !r.is_empty())).collect())
                        .unwrap_or_default();
                    if !b.is_empty() {
                        blocked.push(json!({"request": b}));
                    }
                }
                "Audits.issueAdded" => issues.push(e.params["issue"].clone()),
                _ => {}
            }
        }
        let seen: Vec<String> = self.app.seen().iter().map(|s| format!("{} {:?}", s.path, s.headers)).collect();
        let edge_log = self.edge.log();
        let edge_tail: Vec<&str> = edge_log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        format!(
            "frame messages: {}\nframe sessions: {:?}\nresponses seen by the tab:\n  {}\nbrowser cookies: {}\nblocked cookies: {}\naudit issues: {}\napp received:\n  {}\nedge log (tail):\n{}\nchromium stderr (tail):\n{}",
            Value::Array(self.results(page).await),
            page.frame_sessions(),
            responses.join("\n  "),
            cookies.map(|c| c.to_string()).unwrap_or_else(|e| e),
            Value::Array(blocked),
            Value::Array(issues),
            seen.join("\n  "),
            edge_tail.join("\n"),
            self.chromium.stderr_tail(20),
        )
    }

    /// Opens an embedder page framing `frame_src` and waits until the app in the
    /// frame has reported its page load, its fetch and its WebSocket echo; then checks
    /// what it reported (messages from the preview origin, no token in `location`,
    /// `/api/data` 200 with the app's body, the echo).
    async fn open_framed<'a>(&'a self, frame_src: &str) -> (Page<'a>, Embedder) {
        let embedder = Embedder::start(frame_src).await;
        let page = self.chromium.new_page().await;
        page.navigate(&embedder.url()).await;
        let results = self
            .wait_for(&page, FLOW_LIMIT, "the framed app's page, script, fetch and WebSocket echo", |r| {
                ["loaded", "api", "ws-echo"].iter().all(|t| find(r, t).is_some())
            })
            .await;
        let origin = format!("http://{}", self.host());
        for r in &results {
            assert_eq!(r["origin"], origin.as_str(), "a message from another origin than the preview: {r}");
        }
        let href = find(&results, "loaded").expect("loaded")["href"].as_str().unwrap_or_default().to_string();
        assert_eq!(href, self.preview_url(), "the frame's final location must be the URL without token");
        let api = find(&results, "api").expect("api");
        assert_eq!((api["status"].as_u64(), api["body"].as_str()), (Some(200), Some(API_BODY)), "fetch('/api/data') in the frame: {api}");
        assert_eq!(find(&results, "ws-echo").expect("ws-echo")["data"], WS_MESSAGE, "the frame's WebSocket echo");
        assert!(find(&results, "ws-error").is_none(), "the frame's WebSocket failed: {}", Value::Array(results.clone()));
        (page, embedder)
    }

    /// The browser holds the edge's cookie for the preview host as CONTRACT §3 says a
    /// token from a cross-site frame sets it: host-only, Secure, HttpOnly,
    /// SameSite=None, partitioned under the embedding site.
    async fn assert_partitioned_cookie(&self, page: &Page<'_>) {
        let all = self.chromium.cdp.call(None, "Storage.getCookies", json!({})).await.expect("Storage.getCookies");
        let host = self.host().split(':').next().unwrap_or_default().to_string();
        let ours: Vec<&Value> = all["cookies"]
            .as_array()
            .map(|a| a.iter().filter(|c| COOKIE_NAMES.contains(&c["name"].as_str().unwrap_or_default())).collect())
            .unwrap_or_default();
        assert_eq!(ours.len(), 1, "exactly one edge session cookie in the browser\n{}", self.report(page).await);
        let c = ours[0];
        assert_eq!(c["name"], "__Host-miosa_session", "cookie name on a .localhost host: {c}");
        assert_eq!(c["domain"], host.as_str(), "host-only cookie for the preview host: {c}");
        assert_eq!(
            (&c["path"], &c["secure"], &c["httpOnly"], &c["sameSite"]),
            (&json!("/"), &json!(true), &json!(true), &json!("None")),
            "{c}"
        );
        assert_eq!(c["partitionKey"]["topLevelSite"], "http://127.0.0.1", "cookie partitioned under the embedding site: {c}");
    }

    /// The credential firewall, checked where it matters: the app never received a
    /// `token` parameter, an `X-Miosa-*` header or the edge's cookie — and it did
    /// receive the page, the script, the fetch and the WebSocket handshake.
    fn assert_firewall(&self) {
        let seen = self.app.seen();
        for path in ["/", "/app.js", "/api/data", "/ws"] {
            assert!(seen.iter().any(|s| s.path == path), "the app never received {path}: {seen:#?}");
        }
        for s in &seen {
            let query = s.path.split_once('?').map(|(_, q)| q).unwrap_or("");
            assert!(!query.split('&').any(|p| p.starts_with("token=")), "a token reached the app: {}", s.path);
            for (name, value) in &s.headers {
                assert!(!name.to_ascii_lowercase().starts_with("x-miosa-"), "{name} reached the app on {}", s.path);
                if name.eq_ignore_ascii_case("cookie") {
                    let names: Vec<&str> = value.split(';').filter_map(|c| c.split('=').next()).map(str::trim).collect();
                    assert!(!names.iter().any(|n| COOKIE_NAMES.contains(n)), "the edge's cookie reached the app on {}: {value}", s.path);
                }
            }
        }
    }
}

#[test]
fn base64url_matches_rfc4648() {
    let cases: [(&[u8], &str); 8] = [
        (b"", ""),
        (b"f", "Zg"),
        (b"fo", "Zm8"),
        (b"foo", "Zm9v"),
        (b"foob", "Zm9vYg"),
        (b"fooba", "Zm9vYmE"),
        (b"foobar", "Zm9vYmFy"),
        (&[0xfb, 0xff], "-_8"),
    ];
    for (raw, encoded) in cases {
        assert_eq!(b64url(raw), encoded, "{raw:?}");
    }
}

/// The first message of type `kind`.
fn find<'a>(results: &'a [Value], kind: &str) -> Option<&'a Value> {
    results.iter().map(|r| &r["data"]).find(|d| d["type"] == kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_token_opens_a_cross_site_frame() {
    let w = World::start().await;
    let token = preview_token(w.app.addr.port());
    let (page, _embedder) = w.open_framed(&format!("{}?token={token}", w.preview_url())).await;
    w.assert_partitioned_cookie(&page).await;
    w.assert_firewall();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_link_in_a_cross_site_frame_is_revoked_live() {
    let w = World::start().await;
    let (token, sha) = share_token();
    let record = json!({"id": "sh_1", "token_sha256": sha, "sandbox": SANDBOX, "port": w.app.addr.port()});
    let r = w.edge.api("PUT", "/v1/share-tokens/sh_1", Some(&record.to_string())).await;
    assert_eq!(r.status, 200, "PUT share record: {}", r.text());

    let (page, _embedder) = w.open_framed(&format!("{}?token={token}", w.preview_url())).await;
    w.assert_partitioned_cookie(&page).await;
    let requests_before = w.app.seen().len();
    assert!(
        find(&w.results(&page).await, "ws-closed").is_none(),
        "the frame's WebSocket closed before any revocation\n{}",
        w.report(&page).await
    );

    // Revocation reaches the open WebSocket within 10 s.
    let r = w.edge.api("DELETE", "/v1/share-tokens/sh_1", None).await;
    assert_eq!(r.status, 200, "DELETE share record: {}", r.text());
    w.wait_for(&page, Duration::from_secs(10), "the frame's WebSocket closed by the edge after the share record was deleted", |r| {
        find(r, "ws-closed").is_some()
    })
    .await;

    // Reloading the frame (no token now) shows the edge's branded 401 page.
    let nav = format!("document.getElementById('preview').src = {}; true", json!(w.preview_url()));
    page.evaluate(&nav).await.expect("navigate the frame");
    let expr = "({ href: location.href, html: document.documentElement ? document.documentElement.outerHTML : '' })";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let frames = page.evaluate_in_frames(expr).await;
        let shown = frames.iter().map(|(_, v)| v).find(|v| {
            let html = v["html"].as_str().unwrap_or_default();
            v["href"] == w.preview_url().as_str()
                && ["preview_auth_required", "share_token_invalid"].iter().any(|c| html.contains(&format!("Error <code>{c}</code>")))
        });
        if shown.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let docs: Vec<String> = frames.iter().map(|(s, v)| format!("{s}: {v}")).collect();
            panic!(
                "the reloaded frame does not show the branded 401 page within 10 s\nframe documents:\n{}\n{}",
                docs.join("\n"),
                w.report(&page).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The refused cookie is cleared in the browser too: in a cross-site frame that
    // takes a clearing Set-Cookie with `SameSite=None; Partitioned` (Chromium ignores
    // one without, and keeps the partitioned cookie).
    let cleared = eventually(Duration::from_secs(2), || async {
        let all = w.chromium.cdp.call(None, "Storage.getCookies", json!({})).await.ok()?;
        let left = all["cookies"].as_array()?.iter().any(|c| COOKIE_NAMES.contains(&c["name"].as_str().unwrap_or_default()));
        (!left).then_some(())
    })
    .await;
    assert!(cleared.is_some(), "the revoked session cookie is still in the browser after the 401\n{}", w.report(&page).await);
    assert_eq!(w.app.seen().len(), requests_before, "after revocation nothing may reach the app: {:#?}", &w.app.seen()[requests_before..]);
    assert!(
        w.results(&page).await.iter().filter(|r| r["data"]["type"] == "loaded").nth(1).is_none(),
        "the app loaded again in the frame after revocation"
    );
    w.assert_firewall();
}
