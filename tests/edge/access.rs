//! Access to private previews as CONTRACT §3: `mp_` and `ms_` tokens through the real
//! edge, session cookies, revocation (also of live connections), the password form.

use crate::support::{ws_echo, Edge, Response, PREVIEW_KEY_K1, PREVIEW_KEY_K2, TOKENS_TOML};
use crate::Fixture;
use miosa_edge::access::mint::{self, SigningKey};
use std::time::Duration;

fn now() -> i64 {
    miosa_edge::clock::unix_now()
}

/// An HS256 `mp_` token signed with `k1`.
fn mp(sandbox: &str, port: Option<u16>, iat: i64, exp: i64) -> String {
    mint::preview_token(SigningKey::Hs256(PREVIEW_KEY_K1.as_bytes()), Some("k1"), sandbox, port, iat, exp).expect("mint")
}

/// Pushes a share record through the control API; returns the `ms_` token.
pub(crate) async fn push_share(edge: &Edge, id: &str, sandbox: &str, port: Option<u16>, extra: &str) -> String {
    let (token, sha) = mint::share_token().expect("share token");
    let port = port.map(|p| format!(",\"port\":{p}")).unwrap_or_default();
    let body = format!("{{\"id\":\"{id}\",\"token_sha256\":\"{sha}\",\"sandbox\":\"{sandbox}\"{port}{extra}}}");
    let r = edge.api("PUT", &format!("/v1/share-tokens/{id}"), Some(&body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    token
}

/// `name=value` of the first `Set-Cookie` naming `name`.
pub(crate) fn cookie(r: &Response, name: &str) -> String {
    let line = r
        .headers_named("set-cookie")
        .into_iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no Set-Cookie {name} in {:?}", r.headers));
    line.split(';').next().unwrap_or_default().to_string()
}

pub(crate) fn get(host: &str, path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n{extra}")
}

/// A second sandbox with two private ports (for host binding), and one previewing a
/// WebSocket echo privately.
fn extra_sandboxes(f: &Fixture, ws_port: u16) -> String {
    format!(
        r#"
[[sandboxes]]
id = "priv2"
workspace = "ws_1"
address = "127.0.0.2"
previews = [{{ port = {pp}, access = "private" }}, {{ port = {pa}, access = "private" }}]

[[sandboxes]]
id = "wsbox"
workspace = "ws_1"
address = "127.0.0.5"
previews = [{{ port = {ws_port}, access = "private" }}]
"#,
        pp = f.a_private.addr.port(),
        pa = f.pa(),
    )
}

#[tokio::test]
async fn preview_token_redirect_cookie_and_host_binding() {
    let f = Fixture::start().await;
    let edge = Edge::start(&format!("{TOKENS_TOML}\n{}", f.toml(&extra_sandboxes(&f, 1)))).await;
    let pp = f.a_private.addr.port();
    let host = format!("{pp}-abc12345.sandbox.localhost");
    let t = mp("abc12345", Some(pp), now(), now() + 3600);

    // ?token= → 303 to the same URL without it, plus a host-only session cookie.
    let r = edge.request(&get(&host, &format!("/app/page?x=1&token={t}&y=2"), "")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.header("location"), Some("/app/page?x=1&y=2"), "the token leaves the address bar, other parameters stay");
    let set = r.headers_named("set-cookie");
    assert_eq!(set.len(), 1, "{set:?}");
    let line = set[0];
    assert!(line.starts_with("__Host-miosa_session="), "{line}");
    for attr in ["; Path=/", "; HttpOnly", "; Secure", "; SameSite=Lax"] {
        assert!(line.contains(attr), "{attr} missing: {line}");
    }
    assert!(!line.contains("Domain") && !line.contains("Partitioned"), "{line}");
    let max_age: i64 = line.split("Max-Age=").nth(1).and_then(|v| v.split(';').next()).and_then(|v| v.parse().ok()).expect("Max-Age");
    assert!((3590..=3600).contains(&max_age), "Max-Age is the token's remaining life: {max_age}");
    let session = cookie(&r, "__Host-miosa_session");

    // The cookie opens the preview; the app sees its own cookies, not the edge's.
    let r = edge.request(&get(&host, "/app/page?x=1", &format!("Cookie: app=1; {session}; theme=dark\r\n"))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-origin"), Some("a-private"));
    let h = &r.json()["headers"];
    assert_eq!(h["cookie"], serde_json::json!(["app=1; theme=dark"]), "{h}");
    let r = edge.request(&get(&host, "/", &format!("Cookie: {session}\r\n"))).await;
    assert!(r.json()["headers"].get("cookie").is_none(), "a Cookie header with only the edge's cookie is dropped");

    // Bound to the exact host: another port of the same sandbox, another sandbox.
    for other in [format!("{}-priv2.sandbox.localhost", f.pa()), format!("{pp}-priv2.sandbox.localhost")] {
        let r = edge.request(&get(&other, "/", &format!("Cookie: {session}\r\n"))).await;
        assert_eq!((r.status, r.code()), (401, "preview_auth_required".into()), "{other}");
        let clear = r.headers_named("set-cookie");
        assert!(clear.iter().any(|c| c.starts_with("__Host-miosa_session=;") && c.contains("Max-Age=0")), "cleared: {clear:?}");
    }

    // A tampered cookie is no credential.
    let mut bad = session.clone();
    let last = bad.pop().map(|c| if c == 'A' { 'B' } else { 'A' }).unwrap_or('A');
    bad.push(last);
    let r = edge.request(&get(&host, "/", &format!("Cookie: {bad}\r\n"))).await;
    assert_eq!((r.status, r.code()), (401, "preview_auth_required".into()));

    // Inside a cross-site frame the cookie is partitioned.
    let r = edge.request(&get(&host, &format!("/?token={t}"), "Sec-Fetch-Dest: iframe\r\nSec-Fetch-Site: cross-site\r\n")).await;
    assert_eq!(r.status, 303);
    let line = r.headers_named("set-cookie")[0].to_string();
    assert!(line.contains("; Secure; SameSite=None; Partitioned"), "{line}");
    let r = edge.request(&get(&host, &format!("/?token={t}"), "Sec-Fetch-Dest: iframe\r\nSec-Fetch-Site: same-site\r\n")).await;
    assert!(r.headers_named("set-cookie")[0].contains("SameSite=Lax"));

    // A token for another sandbox or port, or a garbled one, is refused with its code.
    for bad in [mp("priv2", Some(pp), now(), now() + 60), mp("abc12345", Some(pp + 1), now(), now() + 60), "mp_x.y.z".into()] {
        let r = edge.request(&get(&host, &format!("/?token={bad}"), "")).await;
        assert_eq!((r.status, r.code()), (401, "preview_token_invalid".into()), "{bad}");
        assert!(r.header("set-cookie").is_none());
    }
    let r = edge.request(&get(&host, &format!("/?token={}", mp("abc12345", None, now() - 7200, now() - 31)), "")).await;
    assert_eq!((r.status, r.code()), (401, "preview_token_expired".into()));
}

#[tokio::test]
async fn header_token_authorises_one_request_and_plain_http_cookie() {
    let f = Fixture::start().await;
    let edge = Edge::start(&format!("{TOKENS_TOML}\n{}", f.toml(""))).await;
    let pp = f.a_private.addr.port();
    let host = format!("{pp}-abc12345.sandbox.localhost");
    let t = mp("abc12345", None, now(), now() + 600);

    let r = edge
        .request(&get(&host, "/api?token=app-own", &format!("X-Miosa-Token: {t}\r\nAuthorization: Bearer app\r\nX-Miosa-Other: 1\r\n")))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("set-cookie").is_none(), "a header token sets no cookie");
    let j = r.json();
    assert_eq!(j["path"], "/api?token=app-own", "the app's own `token` parameter is not the edge's");
    let h = &j["headers"];
    assert!(h.get("x-miosa-token").is_none() && h.get("x-miosa-other").is_none(), "{h}");
    assert_eq!(h["authorization"], serde_json::json!(["Bearer app"]));

    let r = edge.request(&get(&host, "/", "X-Miosa-Token: mp_garbage\r\n")).await;
    assert_eq!((r.status, r.code()), (401, "preview_token_invalid".into()));
    let r = edge.request(&get(&host, "/", "X-Miosa-Token: ms_nope\r\n")).await;
    assert_eq!((r.status, r.code()), (401, "share_token_invalid".into()));

    // Tenant preview host over plain HTTP (not localhost): the non-Secure variant.
    let tenant = format!("{pp}-abc12345.preview.tenant-one.test");
    let r = edge.request(&get(&tenant, &format!("/?token={t}"), "")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let line = r.headers_named("set-cookie")[0].to_string();
    assert!(line.starts_with("miosa_session=") && !line.contains("Secure") && line.contains("SameSite=Lax"), "{line}");
    let session = cookie(&r, "miosa_session");
    let r = edge.request(&get(&tenant, "/", &format!("Cookie: {session}\r\n"))).await;
    assert_eq!(r.status, 200);
    // The cookie of the tenant host does not open the platform host of the same preview.
    let r = edge.request(&get(&host, "/", &format!("Cookie: __Host-{session}\r\n"))).await;
    assert_eq!(r.status, 401);

    // A public preview takes an edge token out of the URL too, and sets nothing.
    let public = format!("{}-abc12345.sandbox.localhost", f.pa());
    let r = edge.request(&get(&public, &format!("/p?token={t}"), "")).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/p")));
    assert!(r.header("set-cookie").is_none());
    // The access log never shows a token (redacted) — checked in observe.rs.
}

#[tokio::test]
async fn key_rotation_and_unknown_kid() {
    let f = Fixture::start().await;
    let tokens = format!(
        "{TOKENS_TOML}\n[[tokens.preview_keys]]\nkid = \"k2\"\nalg = \"HS256\"\nsecret_env = \"MIOSA_PREVIEW_KEY_K2\"\n\n{}",
        f.toml("")
    );
    let edge = Edge::start(&tokens).await;
    let pp = f.a_private.addr.port();
    let host = format!("{pp}-abc12345.sandbox.localhost");
    let k2 = mint::preview_token(SigningKey::Hs256(PREVIEW_KEY_K2.as_bytes()), Some("k2"), "abc12345", None, now(), now() + 60).unwrap();
    let r = edge.request(&get(&host, "/", &format!("X-Miosa-Token: {k2}\r\n"))).await;
    assert_eq!(r.status, 200, "the second key verifies its tokens");
    let r = edge.request(&get(&host, "/", &format!("X-Miosa-Token: {}\r\n", mp("abc12345", None, now(), now() + 60)))).await;
    assert_eq!(r.status, 200, "the first key still verifies its tokens");
    // With two keys `kid` is required; an unknown one is refused.
    let nokid = mint::preview_token(SigningKey::Hs256(PREVIEW_KEY_K1.as_bytes()), None, "abc12345", None, now(), now() + 60).unwrap();
    let wrong = mint::preview_token(SigningKey::Hs256(PREVIEW_KEY_K1.as_bytes()), Some("k9"), "abc12345", None, now(), now() + 60).unwrap();
    let swapped =
        mint::preview_token(SigningKey::Hs256(PREVIEW_KEY_K1.as_bytes()), Some("k2"), "abc12345", None, now(), now() + 60).unwrap();
    for t in [nokid, wrong, swapped] {
        let r = edge.request(&get(&host, "/", &format!("X-Miosa-Token: {t}\r\n"))).await;
        assert_eq!((r.status, r.code()), (401, "preview_token_invalid".into()));
    }
}

#[tokio::test]
async fn share_tokens_revocation_and_expiry() {
    let f = Fixture::start().await;
    let (ws_addr, _ws) = ws_echo("127.0.0.5").await;
    let edge = Edge::start(&format!("{TOKENS_TOML}\n{}", f.toml(&extra_sandboxes(&f, ws_addr.port())))).await;
    let pp = f.a_private.addr.port();
    let host = format!("{pp}-abc12345.sandbox.localhost");

    let token = push_share(&edge, "sh_1", "abc12345", Some(pp), "").await;
    let r = edge.request(&get(&host, &format!("/?token={token}"), "")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let session = cookie(&r, "__Host-miosa_session");
    let r = edge.request(&get(&host, "/", &format!("Cookie: {session}\r\n"))).await;
    assert_eq!(r.status, 200);
    let r = edge.request(&get(&host, "/", &format!("X-Miosa-Token: {token}\r\n"))).await;
    assert_eq!(r.status, 200, "the share token works as a header too");

    // For another port, or another sandbox: refused.
    let r = edge.request(&get(&format!("{}-priv2.sandbox.localhost", f.pa()), &format!("/?token={token}"), "")).await;
    assert_eq!((r.status, r.code()), (401, "share_token_invalid".into()));

    // Deleting the record revokes the token and the session it opened, on the next request.
    let r = edge.api("DELETE", "/v1/share-tokens/sh_1", None).await;
    assert_eq!(r.status, 200);
    let r = edge.request(&get(&host, "/", &format!("Cookie: {session}\r\n"))).await;
    assert_eq!((r.status, r.code()), (401, "preview_auth_required".into()));
    assert!(r.headers_named("set-cookie").iter().any(|c| c.contains("Max-Age=0")), "the dead session is cleared");
    let r = edge.request(&get(&host, &format!("/?token={token}"), "")).await;
    assert_eq!((r.status, r.code()), (401, "share_token_invalid".into()));

    // Past `expires_at`: share_token_expired.
    let expired = push_share(&edge, "sh_old", "abc12345", None, ",\"expires_at\":\"2020-01-01T00:00:00Z\"").await;
    let r = edge.request(&get(&host, &format!("/?token={expired}"), "")).await;
    assert_eq!((r.status, r.code()), (401, "share_token_expired".into()));

    // Revocation reaches live connections: a WebSocket opened with a share session is
    // closed within 10 seconds of the record's deletion, although it is idle.
    let ws_host = format!("{}-wsbox.sandbox.localhost", ws_addr.port());
    let token = push_share(&edge, "sh_ws", "wsbox", None, "").await;
    let r = edge.request(&get(&ws_host, &format!("/?token={token}"), "")).await;
    let session = cookie(&r, "__Host-miosa_session");
    let mut ws = open_ws(&edge, &ws_host, &session).await;
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text("ping")).await.expect("send");
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("echo in time");
    assert!(matches!(echo, Some(Ok(m)) if m.to_text().unwrap_or("") == "ping"));
    let deleted_at = std::time::Instant::now();
    assert_eq!(edge.api("DELETE", "/v1/share-tokens/sh_ws", None).await.status, 200);
    assert!(ws_closed_within(&mut ws, Duration::from_secs(12)).await, "the WebSocket was not closed within 12 s of the revocation");
    assert!(deleted_at.elapsed() <= Duration::from_secs(10), "closed after {:?}", deleted_at.elapsed());
    let metrics = edge.api("GET", "/metrics", None).await.text();
    assert!(metrics.contains("miosa_edge_revoked_connections_total 1"), "{metrics}");
}

/// Whether the WebSocket is closed (or fails) within `limit`, whatever it receives first.
pub(crate) async fn ws_closed_within(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, limit: Duration) -> bool {
    use futures_util::StreamExt;
    tokio::time::timeout(limit, async {
        loop {
            match ws.next().await {
                Some(Ok(m)) if !m.is_close() => continue,
                _ => break,
            }
        }
    })
    .await
    .is_ok()
}

/// Opens a WebSocket through the edge with a session cookie.
pub(crate) async fn open_ws(edge: &Edge, host: &str, session: &str) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{host}/ws").into_client_request().expect("request");
    req.headers_mut().insert("cookie", session.parse().expect("cookie"));
    let sock = tokio::net::TcpStream::connect(edge.addr).await.expect("connect");
    let (ws, resp) = tokio_tungstenite::client_async(req, sock).await.expect("websocket handshake through the edge");
    assert_eq!(resp.status(), 101);
    ws
}

#[tokio::test]
async fn live_exchanges_end_with_their_share() {
    let f = Fixture::start().await;
    let (ws_addr, _ws) = ws_echo("127.0.0.5").await;
    let edge = Edge::start(&format!("{TOKENS_TOML}\n{}", f.toml(&extra_sandboxes(&f, ws_addr.port())))).await;
    let pp = f.a_private.addr.port();
    let host = format!("{pp}-abc12345.sandbox.localhost");

    // A streaming response opened with a share session is cut when the share is
    // deleted (well before the 3 s upstream read timeout of the test edge).
    let token = push_share(&edge, "sh_stream", "abc12345", None, "").await;
    let session = cookie(&edge.request(&get(&host, &format!("/?token={token}"), "")).await, "__Host-miosa_session");
    let ctl = f.a_private.expect_stream();
    let mut s = tokio::net::TcpStream::connect(edge.addr).await.expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(format!("GET /stream HTTP/1.1\r\nHost: {host}\r\nCookie: {session}\r\n\r\n").as_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), ctl.started).await.expect("stream started").expect("started");
    assert_eq!(edge.api("DELETE", "/v1/share-tokens/sh_stream", None).await.status, 200);
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(12), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the stream was not cut after the share was deleted");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.contains("first-chunk") && !text.contains("end"), "{text}");
    let metrics = edge.api("GET", "/metrics", None).await.text();
    assert!(metrics.contains("miosa_edge_revoked_connections_total 1"), "cut by the revocation, not a timeout: {metrics}");
    drop(ctl.release);

    // A WebSocket opened with a share that expires in 3 s is closed when it expires,
    // idle as it is; the session cookie never outlives the share.
    let ws_host = format!("{}-wsbox.sandbox.localhost", ws_addr.port());
    let expires = miosa_edge::schema::Timestamp(now() + 3).to_rfc3339();
    let token = push_share(&edge, "sh_soon", "wsbox", None, &format!(",\"expires_at\":\"{expires}\"")).await;
    let r = edge.request(&get(&ws_host, &format!("/?token={token}"), "")).await;
    assert_eq!(r.status, 303);
    let max_age: i64 =
        r.headers_named("set-cookie")[0].split("Max-Age=").nth(1).and_then(|v| v.split(';').next()?.parse().ok()).expect("Max-Age");
    assert!(max_age <= 3, "the session ends with the share: Max-Age={max_age}");
    let session = cookie(&r, "__Host-miosa_session");
    let mut ws = open_ws(&edge, &ws_host, &session).await;
    use futures_util::StreamExt;
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the WebSocket outlived its share's expiry by more than 7 s");
    let metrics = edge.api("GET", "/metrics", None).await.text();
    assert!(metrics.contains("miosa_edge_revoked_connections_total 2"), "{metrics}");
}

#[tokio::test]
async fn password_protected_share() {
    let f = Fixture::start().await;
    let edge = Edge::start(&format!("{TOKENS_TOML}\n{}", f.toml(""))).await;
    let pp = f.a_private.addr.port();
    let host = format!("{pp}-abc12345.sandbox.localhost");
    let hash = miosa_edge::access::password::hash("correct horse").unwrap();
    let token = push_share(&edge, "sh_pw", "abc12345", None, &format!(",\"password_hash\":\"{hash}\"")).await;

    // The token alone opens nothing: a pending cookie, then the form (401).
    let r = edge.request(&get(&host, &format!("/deep/link?a=b&token={token}"), "")).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/deep/link?a=b")));
    assert!(r.headers_named("set-cookie").iter().all(|c| !c.starts_with("__Host-miosa_session")), "no session before the password");
    let pending = cookie(&r, "__Host-miosa_share_pending");
    let page = |extra: &str| format!("GET /deep/link?a=b HTTP/1.1\r\nHost: {host}\r\nAccept: text/html\r\nCookie: {pending}\r\n{extra}");
    let r = edge.request(&page("")).await;
    assert_eq!(r.status, 401);
    let html = r.text();
    assert!(html.contains("action=\"/__miosa/share-password\"") && html.contains("name=\"next\" value=\"/deep/link?a=b\""), "{html}");
    let r = edge.get(&host, "/").await;
    assert_eq!((r.status, r.code()), (401, "preview_auth_required".into()));
    let r = edge.request(&get(&host, "/", &format!("Cookie: {pending}\r\n"))).await;
    assert_eq!((r.status, r.code()), (401, "share_password_required".into()), "JSON clients get the code");
    let r = edge.request(&get(&host, "/", &format!("X-Miosa-Token: {token}\r\n"))).await;
    assert_eq!((r.status, r.code()), (401, "share_password_required".into()), "a header cannot skip the password");

    let post = |pw: &str, ip_cookie: &str| {
        let body = format!("password={}&next=%2Fdeep%2Flink%3Fa%3Db", pw.replace(' ', "+"));
        format!(
            "POST /__miosa/share-password HTTP/1.1\r\nHost: {host}\r\nAccept: text/html\r\nCookie: {ip_cookie}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let r = crate::support::raw_request(edge.addr, &post("wrong", &pending)).await;
    assert_eq!(r.status, 401);
    assert!(r.text().contains("not correct"), "{}", r.text());
    let r = crate::support::raw_request(edge.addr, &post("correct horse", &pending)).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/deep/link?a=b")), "{}", r.text());
    let session = cookie(&r, "__Host-miosa_session");
    assert!(r.headers_named("set-cookie").iter().any(|c| c.starts_with("__Host-miosa_share_pending=;")), "pending cleared");
    let r = edge.request(&get(&host, "/deep/link?a=b", &format!("Cookie: {session}\r\n"))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/deep/link?a=b");

    // An open redirect through `next` is refused: it becomes `/`.
    let body = "password=correct+horse&next=%2F%2Fevil.example%2F";
    let raw = format!(
        "POST /__miosa/share-password HTTP/1.1\r\nHost: {host}\r\nCookie: {pending}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = crate::support::raw_request(edge.addr, &raw).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/")));

    // Ten wrong passwords within a minute are answered with the form; the 11th try is 429.
    for i in 0..10 {
        let r = crate::support::raw_request(edge.addr, &post("nope", &pending)).await;
        assert_eq!(r.status, 401, "try {i}");
    }
    let r = crate::support::raw_request(edge.addr, &post("correct horse", &pending)).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    let metrics = edge.api("GET", "/metrics", None).await.text();
    assert!(metrics.contains(r#"miosa_edge_access_checks_total{credential="password",result="denied"} 12"#), "{metrics}");
}

#[tokio::test]
async fn tokens_config_errors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_miosa-edge")).args(["check", "--config"]).arg(&path).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let key = |kid: &str, rest: &str| format!("[[tokens.preview_keys]]\nkid = \"{kid}\"\n{rest}\n\n");
    let hs = "alg = \"HS256\"\nsecret_env = \"MIOSA_TEST_UNSET_VAR_XYZ\"";
    let es = "alg = \"ES256\"\npublic_key_file = \"/nonexistent.pem\"";

    let (ok, err) = check(&format!("[tokens]\n{}", key("n", "alg = \"none\"")));
    assert!(!ok && err.contains("unknown variant `none`"), "{err}");
    let (ok, err) = check(&format!("[tokens]\n{}{}", key("a", hs), key("a", es)));
    assert!(!ok && err.contains(":8:7: tokens.preview_keys[1].kid: is used by another preview key"), "{err}");
    let (ok, err) = check(&format!("[tokens]\n{}{}", key("a", hs), key("b", es)));
    assert!(!ok);
    assert!(err.contains("tokens.preview_keys[0].secret_env: environment variable MIOSA_TEST_UNSET_VAR_XYZ is not set"), "{err}");
    assert!(err.contains("tokens.preview_keys[1].public_key_file: cannot read /nonexistent.pem"), "{err}");
}

#[tokio::test]
async fn cli_minted_tokens_open_the_preview() {
    let f = Fixture::start().await;
    let edge = Edge::start(&format!("{TOKENS_TOML}\n{}", f.toml(""))).await;
    let pp = f.a_private.addr.port();
    let host = format!("{pp}-abc12345.sandbox.localhost");
    let cli = |args: &[&str], stdin: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_miosa-edge"))
            .args(args)
            .env("MIOSA_PREVIEW_KEY_K1", PREVIEW_KEY_K1)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn cli");
        child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
        let out = child.wait_with_output().expect("cli");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let config = edge.config.to_str().expect("utf-8 path").to_string();
    let port = pp.to_string();
    let (ok, token, err) = cli(&["token", "mint", "--config", &config, "--sandbox", "abc12345", "--port", &port, "--ttl", "10m"], "");
    assert!(ok && token.starts_with("mp_"), "{err}");
    let r = edge.request(&get(&host, "/", &format!("X-Miosa-Token: {token}\r\n"))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (ok, _, err) = cli(&["token", "mint", "--config", &config, "--sandbox", "abc12345", "--ttl", "2d"], "");
    assert!(!ok && err.contains("between 1 second and 24 hours"), "{err}");

    let (ok, out, err) = cli(&["token", "share", "--password"], "open sesame\n");
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let (token, sha, hash) = (j["token"].as_str().unwrap(), j["token_sha256"].as_str().unwrap(), j["password_hash"].as_str().unwrap());
    let body = format!("{{\"id\":\"sh_cli\",\"token_sha256\":\"{sha}\",\"sandbox\":\"abc12345\",\"password_hash\":\"{hash}\"}}");
    assert_eq!(edge.api("PUT", "/v1/share-tokens/sh_cli", Some(&body)).await.status, 200);
    let r = edge.request(&get(&host, &format!("/?token={token}"), "")).await;
    let pending = cookie(&r, "__Host-miosa_share_pending");
    let form = "password=open+sesame&next=%2F";
    let raw = format!(
        "POST /__miosa/share-password HTTP/1.1\r\nHost: {host}\r\nCookie: {pending}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len()
    );
    let r = crate::support::raw_request(edge.addr, &raw).await;
    assert_eq!(r.status, 303, "the CLI's password hash verifies: {}", r.text());
    assert!(r.headers_named("set-cookie").iter().any(|c| c.starts_with("__Host-miosa_session=")));
}

#[tokio::test]
async fn keys_rotate_on_reload() {
    let f = Fixture::start().await;
    let edge = Edge::start(&format!("{TOKENS_TOML}\n{}", f.toml(""))).await;
    let pp = f.a_private.addr.port();
    let host = format!("{pp}-abc12345.sandbox.localhost");
    let k2 = mint::preview_token(SigningKey::Hs256(PREVIEW_KEY_K2.as_bytes()), Some("k2"), "abc12345", None, now(), now() + 600).unwrap();
    let r = edge.request(&get(&host, "/", &format!("X-Miosa-Token: {k2}\r\n"))).await;
    assert_eq!((r.status, r.code()), (401, "preview_token_invalid".into()), "k2 is not configured yet");
    edge.write_config(&format!(
        "{TOKENS_TOML}\n[[tokens.preview_keys]]\nkid = \"k2\"\nalg = \"HS256\"\nsecret_env = \"MIOSA_PREVIEW_KEY_K2\"\n\n{}",
        f.toml("")
    ));
    let ok = crate::support::eventually(Duration::from_secs(10), || {
        let req = get(&host, "/", &format!("X-Miosa-Token: {k2}\r\n"));
        let edge = &edge;
        async move { (edge.request(&req).await.status == 200).then_some(()) }
    })
    .await;
    assert!(ok.is_some(), "the key added to the file is used without a restart: {}", edge.log());
}

/// Opens a WebSocket through the edge at `target` (with `cookie`, if any): the handshake
/// response, and the socket when it was upgraded.
async fn try_ws(
    edge: &Edge,
    host: &str,
    target: &str,
    cookie: Option<&str>,
) -> (u16, Vec<String>, Option<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>>) {
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Error};
    let mut req = format!("ws://{host}{target}").into_client_request().expect("request");
    if let Some(c) = cookie {
        req.headers_mut().insert("cookie", c.parse().expect("cookie"));
    }
    let sock = tokio::net::TcpStream::connect(edge.addr).await.expect("connect");
    let set_cookies =
        |h: &http::HeaderMap| h.get_all("set-cookie").iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
    match tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::client_async(req, sock)).await.expect("handshake in time") {
        Ok((ws, resp)) => (resp.status().as_u16(), set_cookies(resp.headers()), Some(ws)),
        Err(Error::Http(resp)) => (resp.status().as_u16(), set_cookies(resp.headers()), None),
        Err(e) => panic!("websocket handshake failed: {e}"),
    }
}

/// A WebSocket upgrade carrying `?token=` is authorised in place (CONTRACT §3): 101, no
/// redirect (a browser's `new WebSocket(url)` follows none), no cookie, and the token is
/// taken out of the target the sandbox sees. Bad tokens still get their 401.
///
/// Before, the upgrade was answered 303 and the browser's handshake failed.
#[tokio::test]
async fn websocket_upgrades_are_authorised_in_place_by_url_tokens() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let f = Fixture::start().await;
    let (ws_addr, _ws, mut seen) = crate::support::ws_echo_recording("127.0.0.5").await;
    let public = format!(
        "\n[[sandboxes]]\nid = \"wspub\"\nworkspace = \"ws_1\"\naddress = \"127.0.0.5\"\npreviews = [{{ port = {}, access = \"public\" }}]\n",
        ws_addr.port()
    );
    let edge = Edge::start(&format!("{TOKENS_TOML}\n{}", f.toml(&format!("{}{public}", extra_sandboxes(&f, ws_addr.port()))))).await;
    let host = format!("{}-wsbox.sandbox.localhost", ws_addr.port());
    let mp_token = mp("wsbox", Some(ws_addr.port()), now(), now() + 600);
    let share = push_share(&edge, "sh_wsurl", "wsbox", None, "").await;

    for (name, token) in [("mp_", mp_token.as_str()), ("ms_", share.as_str())] {
        let (status, cookies, ws) = try_ws(&edge, &host, &format!("/hmr?x=1&token={token}&y=2"), None).await;
        assert_eq!(status, 101, "{name}: the upgrade is authorised in place\n{}", edge.log());
        assert!(cookies.is_empty(), "{name}: no cookie on the 101: {cookies:?}");
        let mut ws = ws.expect("upgraded");
        let (target, cookie) = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.expect("handshake seen").expect("seen");
        assert_eq!(target, "/hmr?x=1&y=2", "{name}: the token never reaches the sandbox");
        assert_eq!(cookie, None, "{name}");
        ws.send(Message::text("hi")).await.expect("send");
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("echo in time");
        assert!(matches!(echo, Some(Ok(m)) if m.to_text().unwrap_or("") == "hi"), "{name}");
        if name == "ms_" {
            // Opened with a share: it ends with the share, like a cookie-opened one.
            assert_eq!(edge.api("DELETE", "/v1/share-tokens/sh_wsurl", None).await.status, 200);
            assert!(ws_closed_within(&mut ws, Duration::from_secs(10)).await, "the share's deletion closes the WebSocket");
        }
    }

    // Bad tokens: the token's 401, and nothing reaches the sandbox.
    for (bad, code) in [(mp("other", None, now(), now() + 60), 401), ("mp_x.y.z".to_string(), 401), (share.clone(), 401)] {
        let (status, _, ws) = try_ws(&edge, &host, &format!("/hmr?token={bad}"), None).await;
        assert_eq!((status, ws.is_none()), (code, true), "{bad}");
    }
    // A public preview: upgraded too, the token taken out.
    let public_host = format!("{}-wspub.sandbox.localhost", ws_addr.port());
    let (status, cookies, _ws) = try_ws(&edge, &public_host, &format!("/p?token={mp_token}"), None).await;
    assert_eq!((status, cookies.len()), (101, 0));
    let (target, _) = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.expect("handshake seen").expect("seen");
    assert_eq!(target, "/p");
    assert!(seen.try_recv().is_err(), "no refused handshake reached the sandbox");

    // A page load with a token is still the 303 that sets the cookie.
    let r = edge.request(&get(&host, &format!("/?token={mp_token}"), "")).await;
    assert_eq!(r.status, 303);
    assert!(r.header("set-cookie").is_some());
}

/// The session an `mp_` token opens ends at its `exp` (CONTRACT §3): a live WebSocket
/// opened with it — by a URL token, the session cookie or the header — is closed within
/// 10 s of `exp`, idle as it is.
///
/// Before, only share-opened exchanges were watched: these lived on.
#[tokio::test]
async fn preview_token_websockets_end_at_exp() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let f = Fixture::start().await;
    let (ws_addr, _ws) = ws_echo("127.0.0.5").await;
    let edge = Edge::start(&format!("{TOKENS_TOML}\n{}", f.toml(&extra_sandboxes(&f, ws_addr.port())))).await;
    let host = format!("{}-wsbox.sandbox.localhost", ws_addr.port());
    let exp = now() + 3;
    let token = mp("wsbox", None, now(), exp);
    let r = edge.request(&get(&host, &format!("/?token={token}"), "")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let session = cookie(&r, "__Host-miosa_session");

    let by_cookie = open_ws(&edge, &host, &session).await;
    let (status, _, by_url) = try_ws(&edge, &host, &format!("/ws?token={token}"), None).await;
    assert_eq!(status, 101);
    let mut req = format!("ws://{host}/ws").into_client_request().expect("request");
    req.headers_mut().insert("x-miosa-token", token.parse().expect("header"));
    let sock = tokio::net::TcpStream::connect(edge.addr).await.expect("connect");
    let (by_header, _) = tokio_tungstenite::client_async(req, sock).await.expect("handshake with the header token");

    let exp_instant = std::time::Instant::now() + Duration::from_secs((exp - now()).max(0) as u64);
    for (name, mut ws) in [("cookie", by_cookie), ("url token", by_url.expect("upgraded")), ("header", by_header)] {
        let left = (exp_instant + Duration::from_secs(10)).saturating_duration_since(std::time::Instant::now());
        assert!(ws_closed_within(&mut ws, left).await, "{name}: the WebSocket outlived its token's exp by more than 10 s");
    }
    let metrics = edge.api("GET", "/metrics", None).await.text();
    assert!(metrics.contains("miosa_edge_revoked_connections_total 3"), "{metrics}");
}
