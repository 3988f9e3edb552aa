//! Live reload (SIGHUP and file watch) and `miosa-edge check`.

use crate::support::{eventually, Edge};
use crate::Fixture;
use std::process::Command;
use std::time::Duration;

#[tokio::test]
async fn file_change_is_picked_up_without_a_signal() {
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    let host = format!("{}-newbox.sandbox.localhost", f.pb());
    assert_eq!(edge.get(&host, "/").await.status, 404);
    let extra = format!("[[sandboxes]]\nid = \"newbox\"\nworkspace = \"ws_2\"\naddress = \"127.0.0.3\"\npreviews = [{{ port = {}, access = \"public\" }}]\n", f.pb());
    edge.write_config(&f.toml(&extra));
    let r = eventually(Duration::from_secs(10), || async {
        let r = edge.get(&host, "/").await;
        (r.status == 200).then_some(r)
    })
    .await
    .expect("the watcher applied the new file");
    assert_eq!(r.json()["origin"], "b-public");
}

#[tokio::test]
async fn broken_reload_keeps_the_old_table_and_says_where() {
    let f = Fixture::start().await;
    let edge = Edge::start(&f.toml("")).await;
    let host = format!("{}-abc12345.sandbox.localhost", f.pa());
    assert_eq!(edge.get(&host, "/").await.status, 200);

    // A dangling reference and a bad address: refused, every error logged with its
    // key path and line:column; the old routes keep serving.
    let bad = f
        .toml("[[sandboxes]]\nid = \"bad\"\nworkspace = \"ws_nope\"\naddress = \"127.0.0.3\"\n")
        .replace("id = \"abc12345\"", "id = \"abc12345\"\n# comment");
    edge.write_config(&bad);
    edge.hup();
    let logged = eventually(Duration::from_secs(10), || async {
        let log = edge.log();
        log.contains("config reload refused").then_some(log)
    })
    .await
    .expect("the refusal is logged");
    let written = std::fs::read_to_string(&edge.config).expect("config");
    let line = written.lines().position(|l| l.starts_with("workspace = \"ws_nope\"")).map(|i| i + 1).unwrap_or(0);
    assert!(logged.contains("sandboxes[3].workspace"), "{logged}");
    assert!(logged.contains(&format!("line={line}")), "line {line} in {logged}");
    assert!(logged.contains("still serving the previous routing table"));
    let r = edge.get(&host, "/").await;
    assert_eq!(r.status, 200, "old table still serving");
    assert_eq!(r.json()["origin"], "a-public");

    // A syntax error too.
    edge.write_config("[[sandboxes]\nid = ");
    edge.hup();
    eventually(Duration::from_secs(10), || async { (edge.log().matches("config reload refused").count() >= 2).then_some(()) })
        .await
        .expect("second refusal logged");
    assert_eq!(edge.get(&host, "/").await.status, 200);

    // And a good file afterwards is applied.
    edge.write_config(&f.toml("").replace(&format!("{{ port = {}, access = \"public\" }},", f.pa()), ""));
    edge.hup();
    eventually(Duration::from_secs(10), || async { (edge.get(&host, "/").await.status == 404).then_some(()) })
        .await
        .expect("good reload applied");
}

#[test]
fn check_reports_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[workspaces]]\nid = \"w\"\nslug = \"s\"\n\n[[sandboxes]]\nid = \"a\"\nworkspace = \"w\"\naddress = \"10.0.3\"\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_miosa-edge")).args(["check", "--config"]).arg(&path).output().expect("run check");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:8:11: sandboxes[0].address:", path.display())), "{err}");
    assert!(err.contains("is not an IP address"));

    // Several semantic errors are all reported.
    std::fs::write(&path, "[[sandboxes]]\nid = \"a\"\nworkspace = \"w\"\naddress = \"10.0.0.1\"\n\n[[sandboxes]]\nid = \"a\"\nworkspace = \"w\"\naddress = \"10.0.0.2\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_miosa-edge")).args(["check", "--config"]).arg(&path).output().expect("run check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains(":3:13: sandboxes[0].workspace: workspace `w` does not exist"), "{err}");
    assert!(err.contains(":7:6: sandboxes[1].id"), "{err}");
    assert!(err.contains("3 error(s)"), "{err}");

    // Every error, not only the first: a bad value in [branding] and one in a sandbox.
    std::fs::write(
        &path,
        "[branding]\naccent_color = \"blue\"\n\n[[workspaces]]\nid = \"w\"\nslug = \"s\"\n\n[[sandboxes]]\nid = \"a\"\nworkspace = \"w\"\naddress = \"10.0.3\"\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_miosa-edge")).args(["check", "--config"]).arg(&path).output().expect("run check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains(&format!("{}:2:16: branding.accent_color: `blue` must be #rgb or #rrggbb", path.display())), "{err}");
    assert!(err.contains(&format!("{}:11:11: sandboxes[0].address: `10.0.3` is not an IP address", path.display())), "{err}");
    assert!(err.contains("2 error(s)"), "{err}");

    // A good file passes; so does the shipped example and the embedded default.
    for good in ["config/edge.example.toml", "config/dev.toml", "config/edge.container.toml"] {
        let out = Command::new(env!("CARGO_BIN_EXE_miosa-edge"))
            .args(["check", "--config", good])
            .env("MIOSA_PREVIEW_KEY_K1", crate::support::PREVIEW_KEY_K1)
            .output()
            .expect("run check");
        assert!(out.status.success(), "{good}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `[control] max_body_bytes` reloads live (CONTRACT §10); `[control] listen` needs a
/// restart and says so. Before, any `[control]` change took effect on restart only.
#[tokio::test]
async fn control_max_body_reloads_live() {
    let f = Fixture::start().await;
    let edge = Edge::start_with("max_body_bytes = 2048", &f.toml("")).await;
    let body = format!("{{\"id\":\"bigbody\",\"workspace\":\"ws_1\",\"address\":\"127.0.0.3\"}}{}", " ".repeat(3000));
    let r = edge.api("PUT", "/v1/sandboxes/bigbody", Some(&body)).await;
    assert_eq!((r.status, r.code()), (413, "payload_too_large".into()), "{}", r.text());

    edge.write_config(&format!("max_body_bytes = 8192\n\n{}", f.toml("")));
    let r = eventually(Duration::from_secs(10), || async {
        let r = edge.api("PUT", "/v1/sandboxes/bigbody", Some(&body)).await;
        (r.status != 413).then_some(r)
    })
    .await
    .unwrap_or_else(|| panic!("the new max_body_bytes was never applied\n{}", edge.log()));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!edge.log().contains("takes effect on restart"), "{}", edge.log());
}

/// `[server]` timeouts and the per-IP cap reload live (CONTRACT §10): the per-IP cap
/// (`crate::front`), the whole-head deadline and the upstream read timeout apply to the
/// next connection or request. Before, each took effect on restart only.
#[tokio::test]
async fn server_limits_reload_live() {
    use crate::hostile::{connect_from, read_until_closed};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start().await;
    // An upstream that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let body = f.toml(&format!(
        "[[sandboxes]]\nid = \"silent1\"\nworkspace = \"ws_2\"\naddress = \"127.0.0.1\"\npreviews = [{{ port = {silent_port}, access = \"public\" }}]\n"
    ));
    let before = "max_connections_per_ip = 1\nclient_header_timeout_ms = 60000\nread_timeout_ms = 30000";
    let edge = Edge::start_opts(before, &[], &body).await;
    let host = format!("{}-abc12345.sandbox.localhost", f.pa());
    let keep_alive = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    // The harness's readiness probe comes from an address of its own (support.rs), so the
    // first connection from 127.0.0.1 is within the cap of 1.
    let mut first = connect_from([127, 0, 0, 1], edge.addr).await.expect("connect");
    first.write_all(keep_alive.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 64 << 10];
    let n = tokio::time::timeout(Duration::from_secs(5), first.read(&mut buf)).await.expect("answer in time").expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "a first, kept-alive connection: {}", String::from_utf8_lossy(&buf[..n]));
    let second = |ip: [u8; 4]| {
        let raw = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let addr = edge.addr;
        async move {
            let mut s = connect_from(ip, addr).await.ok()?;
            let _ = s.write_all(raw.as_bytes()).await;
            Some(read_until_closed(&mut s, Duration::from_secs(5)).await)
        }
    };
    let x = second([127, 0, 0, 1]).await.expect("connect");
    assert!(x.closed && x.bytes.is_empty(), "a second connection under a cap of 1: {}", x.text());

    let after = "max_connections_per_ip = 3\nclient_header_timeout_ms = 1000\nread_timeout_ms = 500";
    edge.write_config_server(after, &body);
    eventually(Duration::from_secs(10), || async { second([127, 0, 0, 1]).await.filter(|x| x.status() == 200).map(|_| ()) })
        .await
        .unwrap_or_else(|| panic!("the new max_connections_per_ip was never applied\n{}", edge.log()));

    // The whole-head deadline: a head that never ends is cut after about 1 s, not 60.
    let mut s = connect_from([127, 0, 0, 4], edge.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.expect("write");
    let x = read_until_closed(&mut s, Duration::from_secs(8)).await;
    assert!(x.closed && x.took < Duration::from_secs(5), "an unfinished head still open after {:?}", x.took);

    // The upstream read timeout: a silent upstream answers 504 after about 0.5 s, not 30.
    let start = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), edge.get(&format!("{silent_port}-silent1.sandbox.localhost"), "/"))
        .await
        .expect("the silent upstream was waited on past 10 s");
    assert!(r.status >= 500 && start.elapsed() < Duration::from_secs(5), "{} after {:?}", r.status, start.elapsed());
    assert!(!edge.log().contains("takes effect on restart"), "{}", edge.log());
    held.abort();
    drop(first);
}

/// `[server] watch_interval_ms` reloads live: an edge started without the file watch
/// (0, SIGHUP only) watches the file once a reload turns it on.
#[tokio::test]
async fn watch_interval_reloads_live() {
    let f = Fixture::start().await;
    let edge = Edge::start_opts("watch_interval_ms = 0", &[], &f.toml("")).await;
    let host = format!("{}-newbox.sandbox.localhost", f.pb());
    edge.write_config_server("watch_interval_ms = 100", &f.toml(""));
    edge.hup();
    eventually(Duration::from_secs(10), || async { edge.log().contains("config reloaded").then_some(()) })
        .await
        .expect("the SIGHUP reload");
    let extra = format!("[[sandboxes]]\nid = \"newbox\"\nworkspace = \"ws_2\"\naddress = \"127.0.0.3\"\npreviews = [{{ port = {}, access = \"public\" }}]\n", f.pb());
    edge.write_config_server("watch_interval_ms = 100", &f.toml(&extra));
    eventually(Duration::from_secs(10), || async { (edge.get(&host, "/").await.status == 200).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("the file watch never started\n{}", edge.log()));
    assert!(!edge.log().contains("takes effect on restart"), "{}", edge.log());
}

/// `[log] access` reloads live: turned on to a file, moved to another file, a file that
/// cannot be opened refuses the whole reload (the old log keeps writing), and off.
#[tokio::test]
async fn access_log_reloads_live() {
    let f = Fixture::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (one, two) = (dir.path().join("one.log"), dir.path().join("two.log"));
    let edge = Edge::start(&f.toml("")).await;
    let host = format!("{}-abc12345.sandbox.localhost", f.pa());
    let logged = |path: &std::path::Path, marker: &str| std::fs::read_to_string(path).unwrap_or_default().contains(marker);

    edge.write_config(&format!("[log]\naccess = \"{}\"\n\n{}", one.display(), f.toml("")));
    eventually(Duration::from_secs(10), || async {
        edge.get(&host, "/first").await;
        logged(&one, "/first").then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("the access log was never turned on\n{}", edge.log()));

    // A target that cannot be opened: the whole file is refused, the old log kept.
    let bad = dir.path().join("no-such-dir").join("x.log");
    edge.write_config(&format!("[log]\naccess = \"{}\"\n\n{}", bad.display(), f.toml("")));
    eventually(Duration::from_secs(10), || async { edge.log().contains("config reload refused").then_some(()) })
        .await
        .unwrap_or_else(|| panic!("the bad target was not refused\n{}", edge.log()));
    assert!(edge.log().contains("log.access"), "{}", edge.log());
    edge.get(&host, "/still-one").await;
    eventually(Duration::from_secs(5), || async { logged(&one, "/still-one").then_some(()) })
        .await
        .expect("the old log keeps writing after a refused reload");

    edge.write_config(&format!("[log]\naccess = \"{}\"\n\n{}", two.display(), f.toml("")));
    eventually(Duration::from_secs(10), || async {
        edge.get(&host, "/second").await;
        logged(&two, "/second").then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("the access log never moved\n{}", edge.log()));
    edge.get(&host, "/after-move").await;
    eventually(Duration::from_secs(5), || async { logged(&two, "/after-move").then_some(()) }).await.expect("the new log writes");
    assert!(!logged(&one, "/after-move"), "the old file still written to");

    edge.write_config(&f.toml(""));
    eventually(Duration::from_secs(10), || async {
        let before = std::fs::read_to_string(&two).unwrap_or_default();
        edge.get(&host, "/third").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        (std::fs::read_to_string(&two).unwrap_or_default() == before).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("the access log was never turned off\n{}", edge.log()));
    assert!(!edge.log().contains("takes effect on restart"), "{}", edge.log());
}

/// `[dns] nameservers` reloads live: domain verification asks the new nameservers
/// (two silent UDP sockets stand for them; the one configured last receives the query).
#[tokio::test]
async fn dns_nameservers_reload_live() {
    let (old, new) = (std::net::UdpSocket::bind("127.0.0.1:0").expect("udp"), std::net::UdpSocket::bind("127.0.0.1:0").expect("udp"));
    for s in [&old, &new] {
        s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    }
    let dns = |s: &std::net::UdpSocket| format!("[dns]\nnameservers = [\"{}\"]\n\n", s.local_addr().expect("addr"));
    let f = Fixture::start().await;
    let edge = Edge::start(&format!("{}{}", dns(&old), f.toml(""))).await;
    edge.write_config(&format!("{}{}", dns(&new), f.toml("")));
    eventually(Duration::from_secs(10), || async { edge.log().contains("config reloaded").then_some(()) })
        .await
        .unwrap_or_else(|| panic!("never reloaded\n{}", edge.log()));
    let r = edge.api("POST", "/v1/domains/verify", Some(r#"{"host":"preview.tenant-one.test","kind":"preview"}"#)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut buf = [0u8; 512];
    assert!(new.recv_from(&mut buf).is_ok(), "the new nameserver was never asked\n{}", edge.log());
    assert!(old.recv_from(&mut buf).is_err(), "the old nameserver was still asked");
    assert!(!edge.log().contains("takes effect on restart"), "{}", edge.log());
}
