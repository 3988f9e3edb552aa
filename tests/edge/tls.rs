//! The TLS listener as CONTRACT §9, without ACME: certificates from `certs_dir` made by a
//! test CA, picked by SNI (exact, one-label wildcard, default), hot reload of the
//! directory, ALPN and protocol versions, and the plain listener's redirect.

use crate::support::pebble::{
    cert_info, certificates, certs_dir, install_pair, is_default, metric, served_cert, tls_connect, tls_get, tls_get_opts, tls_toml,
    unix_now, TestCa, TlsOpts,
};
use crate::support::{eventually, Edge, Response};
use crate::Fixture;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `[server]` keys: a TLS listener on a free port.
const HTTPS: &str = "https = \"127.0.0.1:0\"";

/// The `errors` entry of `/v1/certificates` for a certs_dir entry.
fn error_for(certs: &serde_json::Value, entry: &str) -> Option<serde_json::Value> {
    certs["errors"].as_array()?.iter().find(|e| e["entry"] == entry).cloned()
}

#[tokio::test]
async fn sni_picks_exact_then_wildcard_then_default() {
    let f = Fixture::start().await;
    let ca = TestCa::new("miosa-edge test CA");
    let (_certs, dir) = certs_dir();
    let exact_host = format!("{}-abc12345.sandbox.localhost", f.pa());
    let exact = ca.issue(&[&exact_host]);
    let wild = ca.issue(&["*.sandbox.localhost"]);
    let tenant = ca.issue(&["app.customer.test"]);
    install_pair(&dir, "exact", &exact);
    install_pair(&dir, "wild", &wild);
    // Indexed by the names it carries, not by the directory's name.
    install_pair(&dir, "not-the-name", &tenant);
    let edge = Edge::start_opts(HTTPS, &[], &format!("{}{}", tls_toml(&dir, true), f.toml(""))).await;
    let https = edge.https();

    // Exact name: verifies against the test CA, reaches the sandbox, which is told https.
    let r = tls_get(https, Some(&exact_host), &exact_host, "/x?y=1", Some(ca.roots()), &["http/1.1"])
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", edge.log()));
    assert_eq!(r.info.cert().serial, exact.serial, "the exact certificate wins over the wildcard");
    assert_eq!(r.response.status, 200, "{}", r.response.text());
    let j = r.response.json();
    assert_eq!(j["origin"], "a-public");
    assert_eq!(j["path"], "/x?y=1");
    assert_eq!(j["headers"]["x-forwarded-proto"], serde_json::json!(["https"]), "{j}");

    // One label under the wildcard.
    let wild_host = format!("{}-zzz99.sandbox.localhost", f.pb());
    let r = tls_get(https, Some(&wild_host), &wild_host, "/", Some(ca.roots()), &[]).await.expect("wildcard handshake verifies");
    assert_eq!(r.info.cert().serial, wild.serial);
    assert_eq!(r.response.json()["origin"], "b-public");

    // By SAN, whatever the directory is called.
    let r = tls_get(https, Some("app.customer.test"), "app.customer.test", "/", Some(ca.roots()), &[])
        .await
        .expect("tenant handshake verifies");
    assert_eq!(r.info.cert().serial, tenant.serial);
    assert_eq!(r.response.status, 200);
    assert!(["d1", "d2"].contains(&r.response.json()["origin"].as_str().unwrap_or_default()), "{}", r.response.text());

    // The default: no SNI, unknown names, two labels under the wildcard, the wildcard's
    // bare parent. Always the same self-signed certificate, never a tenant's.
    let default = served_cert(https, None).await.expect("handshake without SNI");
    assert!(is_default(&default), "no SNI gets the default: {default:?}");
    assert_eq!(default.issuer_cn, default.subject_cn, "the default is self-signed: {default:?}");
    for name in ["localhost", "*.sandbox.localhost", "*.apps.localhost"] {
        assert!(default.names.iter().any(|n| n == name), "default names {:?} lack {name}", default.names);
    }
    for sni in ["unknown.example.org", "a.b.sandbox.localhost", &format!("x.{exact_host}"), "sandbox.localhost", "customer.test"] {
        let c = served_cert(https, Some(sni)).await.unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(c.serial, default.serial, "{sni} gets the default, got {c:?}");
    }
    let verified = tls_connect(https, &TlsOpts::verified("unknown.example.org", ca.roots())).await;
    assert!(verified.is_err(), "the default does not verify against the tenant CA");

    // Generated into the state directory.
    let current = edge.dir.path().join("var/default-cert/current");
    let files: Vec<_> = std::fs::read_dir(&current).map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(!files.is_empty(), "default certificate in {}", current.display());

    // The control API lists what is served, in CONTRACT §4's shape, the default included.
    let certs = certificates(&edge).await;
    let rfc3339 = |t: i64| miosa_edge::schema::Timestamp(t).to_rfc3339();
    let list = certs["certificates"].as_array().expect("certificates array");
    assert_eq!(list.len(), 4, "{certs}");
    let dflt = list.iter().find(|c| c["source"] == "default").unwrap_or_else(|| panic!("default not listed: {certs}"));
    let mut names: Vec<String> = serde_json::from_value(dflt["names"].clone()).expect("default names");
    let mut want = default.names.clone();
    names.sort();
    want.sort();
    assert_eq!(names, want, "{certs}");
    assert_eq!(dflt["not_after"], rfc3339(default.not_after), "{dflt}");
    assert!(dflt["entry"].is_null() && dflt["last_error"].is_null(), "{dflt}");
    assert!(certs.get("managed").is_none() && certs.get("budget").is_none(), "no [acme], no managed/budget: {certs}");
    assert_eq!(certs["errors"], serde_json::json!([]), "{certs}");
    for (entry, leaf, name) in
        [("exact", &exact, exact_host.as_str()), ("wild", &wild, "*.sandbox.localhost"), ("not-the-name", &tenant, "app.customer.test")]
    {
        let c = list.iter().find(|c| c["entry"] == entry).unwrap_or_else(|| panic!("{entry} not listed: {certs}"));
        let info = cert_info(&leaf.der);
        assert_eq!(c["names"], serde_json::json!([name]), "{c}");
        assert_eq!(c["issuer"], "miosa-edge test CA", "{c}");
        assert_eq!((c["source"].as_str(), c["last_error"].as_str()), (Some("file"), None), "the operator's files: {c}");
        assert_eq!((&c["not_before"], &c["not_after"]), (&rfc3339(info.not_before).into(), &rfc3339(info.not_after).into()), "{c}");
        let renew_after = info.not_before + (info.not_after - info.not_before) * 2 / 3;
        let got = c["renew_after"].as_str().and_then(|t| miosa_edge::schema::Timestamp::parse_rfc3339(t).ok()).map(|t| t.0);
        assert!(got.is_some_and(|r| (r - renew_after).abs() <= 1), "renew_after at 2/3 of life ({renew_after}): {c}");
    }

    // And the metrics carry each certificate's expiry.
    let m = edge.api("GET", "/metrics", None).await.text();
    let exp = metric(&m, "miosa_edge_certificate_expiry_seconds", "cert=\"exact\"");
    assert_eq!(exp.map(|v| v as i64), Some(cert_info(&exact.der).not_after), "{m}");
}

#[tokio::test]
async fn certs_dir_changes_are_served_without_restart() {
    let f = Fixture::start().await;
    let ca = TestCa::new("miosa-edge test CA");
    let (_certs, dir) = certs_dir();
    let mut edge = Edge::start_opts(HTTPS, &[], &format!("{}{}", tls_toml(&dir, true), f.toml(""))).await;
    let https = edge.https();
    let pid = edge.child.id();
    let host = "hot.customer.test";
    let default = served_cert(https, Some(host)).await.expect("handshake");
    assert!(is_default(&default), "nothing for {host} yet: {default:?}");

    let serial_for = |name: &'static str| async move { served_cert(https, Some(name)).await.ok().map(|c| c.serial) };

    // Added after the start.
    let first = ca.issue(&[host]);
    install_pair(&dir, "hot", &first);
    eventually(Duration::from_secs(10), || async { (serial_for(host).await? == first.serial).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("added pair never served\n{}", edge.log()));
    tls_connect(https, &TlsOpts::verified(host, ca.roots())).await.expect("the added certificate verifies");

    // Replaced.
    let second = ca.issue(&[host]);
    install_pair(&dir, "hot", &second);
    eventually(Duration::from_secs(10), || async { (serial_for(host).await? == second.serial).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("replaced pair never served\n{}", edge.log()));

    // Broken PEM: reported, the previous certificate keeps serving.
    let before = unix_now();
    std::fs::write(dir.join("hot/fullchain.pem"), "-----BEGIN CERTIFICATE-----\nnot*base64!\n-----END CERTIFICATE-----\n").expect("write");
    let err = eventually(Duration::from_secs(10), || async { error_for(&certificates(&edge).await, "hot") })
        .await
        .unwrap_or_else(|| panic!("broken pair never reported\n{}", edge.log()));
    assert!(err["error"].as_str().is_some_and(|e| !e.is_empty()), "{err}");
    assert!(err["at"].as_i64().is_some_and(|at| at >= before - 1 && at <= unix_now() + 1), "{err}");
    for _ in 0..3 {
        assert_eq!(serial_for(host).await, Some(second.serial.clone()), "the previous certificate keeps serving");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    // A key that does not match its certificate: reported, not served.
    let (k1, k2) = (rcgen::KeyPair::generate().expect("key"), rcgen::KeyPair::generate().expect("key"));
    let now = time::OffsetDateTime::now_utc();
    let mismatched =
        ca.issue_for_key(&["mismatch.customer.test"], now - time::Duration::hours(1), now + time::Duration::days(30), &k1, &k2);
    install_pair(&dir, "mismatch", &mismatched);
    let err = eventually(Duration::from_secs(10), || async { error_for(&certificates(&edge).await, "mismatch") })
        .await
        .unwrap_or_else(|| panic!("mismatched key never reported\n{}", edge.log()));
    assert!(err["error"].as_str().is_some_and(|e| !e.is_empty()), "{err}");
    let c = served_cert(https, Some("mismatch.customer.test")).await.expect("handshake");
    assert!(is_default(&c), "a pair whose key does not match is not served: {c:?}");
    assert_eq!(serial_for(host).await, Some(second.serial.clone()));

    // Fixing the broken entry serves the fix and clears its error.
    let third = ca.issue(&[host]);
    install_pair(&dir, "hot", &third);
    let fixed = eventually(Duration::from_secs(10), || async {
        (serial_for(host).await? == third.serial && error_for(&certificates(&edge).await, "hot").is_none()).then_some(())
    })
    .await;
    if fixed.is_none() {
        panic!("fixed pair not served or its error not cleared: {}\n{}", certificates(&edge).await, edge.log());
    }

    assert_eq!(edge.child.id(), pid);
    assert!(edge.child.try_wait().expect("try_wait").is_none(), "the edge was not restarted and is still running");
}

#[tokio::test]
async fn alpn_prefers_h2_and_tls12_and_tls13_both_work() {
    let f = Fixture::start().await;
    let ca = TestCa::new("miosa-edge test CA");
    let (_certs, dir) = certs_dir();
    install_pair(&dir, "wild", &ca.issue(&["*.sandbox.localhost"]));
    let edge = Edge::start_opts(HTTPS, &[], &format!("{}{}", tls_toml(&dir, true), f.toml(""))).await;
    let https = edge.https();
    let host = format!("{}-abc12345.sandbox.localhost", f.pa());
    let opts = |alpn: &[&[u8]], versions: Vec<&'static rustls::SupportedProtocolVersion>| TlsOpts {
        sni: Some(host.clone()),
        roots: Some(ca.roots()),
        alpn: alpn.iter().map(|a| a.to_vec()).collect(),
        versions,
    };

    // h2 offered: h2, whichever order the client lists, and the server speaks it.
    for offer in [&[&b"h2"[..], b"http/1.1"][..], &[b"http/1.1", b"h2"]] {
        let (mut s, info) = tls_connect(https, &opts(offer, vec![])).await.unwrap_or_else(|e| panic!("{e}\n{}", edge.log()));
        assert_eq!(info.alpn.as_deref(), Some(&b"h2"[..]), "offer {offer:?}");
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.expect("h2 preface");
        let mut frame = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut frame)).await.expect("h2 answer timed out").expect("read h2 frame");
        assert_eq!(frame[3], 0x4, "the server's first HTTP/2 frame is SETTINGS: {frame:?}");
    }

    // http/1.1 only, and no ALPN at all: HTTP/1.1.
    let r = tls_get_opts(https, &opts(&[b"http/1.1"], vec![]), &host, "/").await.expect("http/1.1");
    assert_eq!(r.info.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(r.response.json()["origin"], "a-public");
    let r = tls_get_opts(https, &opts(&[], vec![]), &host, "/").await.expect("no alpn");
    assert_eq!(r.info.alpn, None);
    assert_eq!(r.response.status, 200);

    // TLS 1.2 only and TLS 1.3 only clients.
    let check = |r: Result<crate::support::pebble::TlsResponse, String>, want: rustls::ProtocolVersion| {
        let r = r.unwrap_or_else(|e| panic!("{want:?}: {e}"));
        assert_eq!(r.info.version, Some(want));
        assert_eq!(r.response.status, 200, "{}", r.response.text());
        assert_eq!(r.response.json()["headers"]["x-forwarded-proto"], serde_json::json!(["https"]));
    };
    check(tls_get_opts(https, &opts(&[b"http/1.1"], vec![&rustls::version::TLS12]), &host, "/").await, rustls::ProtocolVersion::TLSv1_2);
    check(tls_get_opts(https, &opts(&[b"http/1.1"], vec![&rustls::version::TLS13]), &host, "/").await, rustls::ProtocolVersion::TLSv1_3);
    let (_, info) = tls_connect(https, &opts(&[b"h2", b"http/1.1"], vec![&rustls::version::TLS12])).await.expect("tls 1.2 with h2");
    assert_eq!((info.version, info.alpn.as_deref()), (Some(rustls::ProtocolVersion::TLSv1_2), Some(&b"h2"[..])));
}

#[tokio::test]
async fn plain_http_redirects_to_https_except_acme_challenges() {
    let f = Fixture::start().await;
    let (_certs, dir) = certs_dir();
    let edge = Edge::start_opts(HTTPS, &[], &format!("{}{}", tls_toml(&dir, true), f.toml(""))).await;
    let tls_port = edge.https().port();
    let location = |r: &Response| r.header("location").map(str::to_string);

    let r = edge.request("GET /a?b=1 HTTP/1.1\r\nHost: 3000-x.sandbox.localhost\r\n").await;
    assert_eq!(r.status, 308, "{}", r.text());
    assert_eq!(location(&r), Some(format!("https://3000-x.sandbox.localhost:{tls_port}/a?b=1")));

    // The plain port in Host is not carried over; other methods are redirected too.
    let host = format!("{}-abc12345.sandbox.localhost", f.pa());
    let r = edge.request(&format!("GET /p/q HTTP/1.1\r\nHost: {host}:{}\r\n", edge.addr.port())).await;
    assert_eq!((r.status, location(&r)), (308, Some(format!("https://{host}:{tls_port}/p/q"))));
    let r = edge.request(&format!("POST /form HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n")).await;
    assert_eq!((r.status, location(&r)), (308, Some(format!("https://{host}:{tls_port}/form"))));

    // ACME challenge paths are not redirected: an unknown token is routed normally.
    let r =
        edge.request("GET /.well-known/acme-challenge/unknown HTTP/1.1\r\nHost: app.customer.test\r\nAccept: application/json\r\n").await;
    assert_ne!(r.status, 308, "{:?}", r.headers);
    assert!(location(&r).is_none(), "{:?}", r.headers);
    assert_eq!(r.status, 200, "routed to the deployment: {}", r.text());
    assert_eq!(r.json()["path"], "/.well-known/acme-challenge/unknown");
    let r =
        edge.request(&format!("GET /.well-known/acme-challenge/unknown HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["origin"], "a-public");
    let r = edge.request("GET /.well-known/acme-challenge/unknown HTTP/1.1\r\nHost: 3000-x.sandbox.localhost\r\n").await;
    assert!(r.status != 308 && location(&r).is_none(), "{} {:?}", r.status, r.headers);
}

#[tokio::test]
async fn redirect_http_false_keeps_plain_http_serving() {
    let f = Fixture::start().await;
    let (_certs, dir) = certs_dir();
    let edge = Edge::start_opts(HTTPS, &[], &format!("{}{}", tls_toml(&dir, false), f.toml(""))).await;
    let host = format!("{}-abc12345.sandbox.localhost", f.pa());
    let r = edge.get(&host, "/a?b=1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["origin"], "a-public");
    assert_eq!(r.json()["headers"]["x-forwarded-proto"], serde_json::json!(["http"]));
    let r = tls_get(edge.https(), Some(&host), &host, "/", None, &[]).await.expect("TLS still served");
    assert_eq!(r.response.json()["headers"]["x-forwarded-proto"], serde_json::json!(["https"]));
}

/// The edge makes TLS handshakes itself (`front::Front`): completed ones are counted by
/// version and timed, failed ones counted by reason, a client that stalls is closed at
/// `[tls] handshake_timeout_ms`, and a connection still handshaking already holds its
/// place under `max_connections_per_ip`.
///
/// With pingora's own TLS listener (before), none of these were counted, every failure
/// was an ERROR log line, a stalled handshake was held for 60 s, and handshaking
/// connections were not under the per-IP cap.
#[tokio::test]
async fn handshakes_are_counted_bounded_and_capped() {
    use crate::hostile::{connect_from, read_until_closed};
    let f = Fixture::start().await;
    let ca = TestCa::new("miosa-edge test CA");
    let (_certs, dir) = certs_dir();
    install_pair(&dir, "wild", &ca.issue(&["*.sandbox.localhost"]));
    let toml = tls_toml(&dir, true).replace("[tls]\n", "[tls]\nhandshake_timeout_ms = 2000\n");
    let edge = Edge::start_opts(&format!("{HTTPS}\nmax_connections_per_ip = 3"), &[], &format!("{toml}{}", f.toml(""))).await;
    let https = edge.https();
    let host = format!("{}-abc12345.sandbox.localhost", f.pa());
    let count = |text: &str, name: &str, label: &str| metric(text, name, label).unwrap_or(0.0);

    // Completed: TLS 1.3 and TLS 1.2, each answered.
    for v in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let opts = TlsOpts { versions: vec![v], ..TlsOpts::verified(&host, ca.roots()) };
        let r = tls_get_opts(https, &opts, &host, "/").await.unwrap_or_else(|e| panic!("{e}\n{}", edge.log()));
        assert_eq!(r.response.status, 200, "{}", r.response.text());
    }
    // Plain HTTP sent to the TLS port: not TLS, closed.
    let mut s = tokio::net::TcpStream::connect(https).await.expect("connect");
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await.expect("write");
    let x = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(x.closed && !x.bytes.starts_with(b"HTTP/"), "plain HTTP on the TLS port: closed {} {:?}", x.closed, x.bytes);
    // A client that refuses the certificate (it trusts another CA) sends an alert.
    let other = TestCa::new("another CA");
    assert!(tls_connect(https, &TlsOpts::verified(&host, other.roots())).await.is_err(), "the client must refuse the certificate");
    // A client that connects and leaves before saying anything.
    drop(tokio::net::TcpStream::connect(https).await.expect("connect"));

    // Three silent connections from 127.0.0.3 hold its three places while they handshake:
    // a fourth is closed at once, long before the handshake timeout would close it.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(connect_from([127, 0, 0, 3], https).await.expect("connect from 127.0.0.3"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = connect_from([127, 0, 0, 3], https).await.expect("connect");
    let x = read_until_closed(&mut fourth, Duration::from_secs(5)).await;
    assert!(x.closed && x.took < Duration::from_millis(1500), "fourth: closed {} after {:?}", x.closed, x.took);
    // The silent ones are closed at the handshake timeout (2 s), not pingora's 60 s.
    let started = std::time::Instant::now();
    for s in &mut silent {
        let x = read_until_closed(s, Duration::from_secs(10)).await;
        assert!(x.closed && x.bytes.is_empty(), "a stalled handshake must be closed, got {:?} after {:?}", x.bytes, x.took);
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1200) && waited < Duration::from_secs(8), "stalled handshakes closed after {waited:?}");

    let text = crate::support::pebble::metrics(&edge).await;
    let tls = "miosa_edge_tls_handshakes_total";
    let failed = "miosa_edge_tls_handshake_failures_total";
    assert!(count(&text, tls, r#"version="1.3""#) >= 1.0, "{text}");
    assert!(count(&text, tls, r#"version="1.2""#) >= 1.0, "{text}");
    assert!(count(&text, "miosa_edge_tls_handshake_duration_seconds_count", "") >= 2.0, "{text}");
    assert!(count(&text, failed, r#"reason="malformed""#) >= 1.0, "{text}");
    assert!(count(&text, failed, r#"reason="alert""#) >= 1.0, "{text}");
    assert!(count(&text, failed, r#"reason="closed""#) >= 1.0, "{text}");
    assert_eq!(count(&text, failed, r#"reason="timeout""#), 3.0, "{text}");
    assert!(count(&text, "miosa_edge_connections_over_ip_cap_total", "") >= 1.0, "{text}");
    // Failed handshakes are not errors of the edge: nothing at ERROR in its log.
    assert!(!edge.log().contains("ERROR"), "{}", edge.log());
}

/// With TLS on, the plain listener redirects only hosts the edge routes (CONTRACT §9): a
/// host it does not route gets 404 `unknown_host`, never a redirect echoing that host,
/// and the connection stays open across redirects and pages alike, a POST's small body
/// included.
///
/// Before, every host got a 308 to `https://` on itself, and the connection was closed
/// after a redirect of a request with a body.
#[tokio::test]
async fn plain_listener_redirects_only_routed_hosts_and_keeps_the_connection() {
    use crate::support::read_response;
    let f = Fixture::start().await;
    let (_certs, dir) = certs_dir();
    let edge = Edge::start_opts(HTTPS, &[], &format!("{}{}", tls_toml(&dir, true), f.toml(""))).await;
    let tls_port = edge.https().port();
    let routed = format!("{}-abc12345.sandbox.localhost", f.pa());
    let mut s = tokio::net::TcpStream::connect(edge.addr).await.expect("connect");
    for round in 0..2 {
        for (host, accept) in [(routed.as_str(), "application/json"), ("evil.example", "application/json"), ("evil.example", "text/html")] {
            let req = format!("GET /a?b=1 HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("round {round}, {host}: connection closed: {e}"));
            let (_, r) = read_response(&mut s, Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("round {round}, {host}: no response on the kept-open connection"));
            if host == routed {
                assert_eq!(r.status, 308, "{}", r.text());
                assert_eq!(r.header("location"), Some(format!("https://{routed}:{tls_port}/a?b=1").as_str()));
            } else {
                assert_eq!(r.status, 404, "an unrouted host is not redirected: {:?}", r.headers);
                assert!(r.header("location").is_none(), "{:?}", r.headers);
                if accept == "application/json" {
                    assert_eq!(r.code(), "unknown_host");
                } else {
                    assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/html")), "{:?}", r.headers);
                }
            }
            assert!(r.header("connection").is_none_or(|c| !c.eq_ignore_ascii_case("close")), "{host}: {:?}", r.headers);
        }
        // A POST with a body: the client sends it again to https://.
        s.write_all(format!("POST /form HTTP/1.1\r\nHost: {routed}\r\nContent-Length: 11\r\n\r\nfield=value").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("round {round}, POST: connection closed: {e}"));
        let (_, r) = read_response(&mut s, Duration::from_secs(10)).await.unwrap_or_else(|| panic!("round {round}: no answer to the POST"));
        assert_eq!((r.status, r.header("location")), (308, Some(format!("https://{routed}:{tls_port}/form").as_str())));
        assert!(r.header("connection").is_none_or(|c| !c.eq_ignore_ascii_case("close")), "POST: {:?}", r.headers);
    }
}

/// `[tls]` reloads live (CONTRACT §10): `redirect_http`, `certs_dir` and
/// `handshake_timeout_ms` apply to a running edge; a `certs_dir` that cannot be opened
/// refuses the whole file, and the last good configuration keeps serving. Before, only
/// the routing sections reloaded and `[tls]` needed a restart.
#[tokio::test]
async fn tls_section_reloads_live() {
    use crate::hostile::read_until_closed;
    let f = Fixture::start().await;
    let ca = TestCa::new("miosa-edge test CA");
    let (_a, dir_a) = certs_dir();
    let (b, dir_b) = certs_dir();
    let host = "live.customer.test";
    let leaf = ca.issue(&[host]);
    install_pair(&dir_b, "live", &leaf);
    let edge = Edge::start_opts(HTTPS, &[], &format!("{}{}", tls_toml(&dir_a, false), f.toml(""))).await;
    let https = edge.https();
    let routed = format!("{}-abc12345.sandbox.localhost", f.pa());
    assert_eq!(edge.get(&routed, "/").await.status, 200);
    assert!(is_default(&served_cert(https, Some(host)).await.expect("handshake")));

    // Redirect on, the other certs_dir, a 1 s handshake timeout.
    let toml = tls_toml(&dir_b, true).replace("[tls]\n", "[tls]\nhandshake_timeout_ms = 1000\n");
    edge.write_config(&format!("{toml}{}", f.toml("")));
    eventually(Duration::from_secs(10), || async { (edge.get(&routed, "/").await.status == 308).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("redirect_http = true never applied\n{}", edge.log()));
    let served = served_cert(https, Some(host)).await.expect("handshake");
    assert_eq!(served.serial, leaf.serial, "the new certs_dir is served");
    let mut s = tokio::net::TcpStream::connect(https).await.expect("connect");
    let x = read_until_closed(&mut s, Duration::from_secs(8)).await;
    assert!(x.closed && x.took < Duration::from_secs(4), "a stalled handshake closed after {:?} (default 10 s)", x.took);

    // certs_dir under a file: cannot be opened, the whole file is refused (the redirect
    // stays on, the certificate stays served).
    let file = b.path().join("a-file");
    std::fs::write(&file, "x").expect("write");
    edge.write_config(&format!("{}{}", tls_toml(&file.join("certs"), false), f.toml("")));
    let log = eventually(Duration::from_secs(10), || async {
        let log = edge.log();
        log.contains("config reload refused").then_some(log)
    })
    .await
    .unwrap_or_else(|| panic!("the bad certs_dir was not refused\n{}", edge.log()));
    assert!(log.contains("tls.certs_dir"), "{log}");
    assert_eq!(edge.get(&routed, "/").await.status, 308);
    assert_eq!(served_cert(https, Some(host)).await.expect("handshake").serial, leaf.serial);
    assert!(!log.contains("takes effect on restart"), "{log}");
}

/// The edge chooses the cipher suite in its own order, AES-128-GCM first, whatever the
/// client lists first (rustls's and OpenSSL's clients list AES-256-GCM-SHA384 first, whose
/// SHA-384 costs the edge more per handshake than SHA-256: src/server.rs `tls_config`).
#[tokio::test]
async fn the_edge_chooses_aes_128_gcm_whatever_the_client_lists_first() {
    let f = Fixture::start().await;
    let (_certs, dir) = certs_dir();
    let edge = Edge::start_opts(HTTPS, &[], &format!("{}{}", tls_toml(&dir, false), f.toml(""))).await;
    for (version, want) in
        [(&rustls::version::TLS13, "TLS13_AES_128_GCM_SHA256"), (&rustls::version::TLS12, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")]
    {
        let opts = TlsOpts { sni: Some("localhost".into()), versions: vec![version], ..TlsOpts::default() };
        let (_, info) = tls_connect(edge.https(), &opts).await.unwrap_or_else(|e| panic!("{e}\n{}", edge.log()));
        assert_eq!(info.suite.map(|s| format!("{s:?}")).as_deref(), Some(want), "{version:?}");
    }
}
