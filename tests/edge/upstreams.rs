//! Runtime instances of dynamic releases: an instance killed under load loses no GET;
//! all instances failing their health check answer 503 `no_healthy_instance`, and one
//! coming back is used again without a restart.

use crate::support::{eventually, raw_request, Edge};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

/// An instance that can be killed: its listener and every open connection are dropped
/// at once (the peer sees resets), as when the process dies.
struct Instance {
    addr: SocketAddr,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
    served: Arc<AtomicUsize>,
}

impl Instance {
    async fn start(name: &'static str, addr: SocketAddr) -> Instance {
        let listener = TcpListener::bind(addr).await.expect("bind instance");
        let addr = listener.local_addr().expect("addr");
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let served = Arc::new(AtomicUsize::new(0));
        let (t, s) = (tasks.clone(), served.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else { return };
                let s = s.clone();
                let conn = tokio::spawn(async move {
                    // Minimal HTTP/1.1, one request per connection: every request the edge
                    // sends is on a fresh connection, so a kill hits requests in flight that
                    // only the edge's own retry can save (not pingora's retry of reused
                    // pooled connections).
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            s.fetch_add(1, Ordering::Relaxed);
                            // a little work, so requests overlap with the kill
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            let body = format!("{{\"instance\":\"{name}\"}}");
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = sock.write_all(resp.as_bytes()).await;
                            return;
                        }
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
                t.lock().unwrap().push(conn.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        Instance { addr, tasks, served }
    }

    fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config(instances: &[&Instance], health: &str) -> String {
    let list: Vec<String> = instances.iter().map(|i| format!("\"{}\"", i.addr)).collect();
    format!(
        r#"[[workspaces]]
id = "ws_1"
slug = "one"

[[deployments]]
id = "dep_1"
workspace = "ws_1"
name = "web"
domains = [{{ host = "app.customer.test", verified = true }}]
active_version = "v1"

[[deployments.versions]]
id = "v1"
release = {{ kind = "dynamic", instances = [{}]{health} }}
"#,
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_one_of_three_instances_under_load_loses_no_get() {
    let ip = "127.0.0.5";
    let a = Instance::start("a", format!("{ip}:0").parse().unwrap()).await;
    let b = Instance::start("b", format!("{ip}:0").parse().unwrap()).await;
    let c = Instance::start("c", format!("{ip}:0").parse().unwrap()).await;
    let edge = Edge::start(&config(&[&a, &b, &c], "")).await;
    let ok = edge.get("app.customer.test", "/").await;
    assert_eq!(ok.status, 200, "{}", ok.text());

    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 150;
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (addr, done) = (edge.addr, done.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..PER_CLIENT {
                let r =
                    raw_request(addr, "GET / HTTP/1.1\r\nHost: app.customer.test\r\nAccept: application/json\r\nConnection: close\r\n\r\n")
                        .await;
                if r.status != 200 {
                    failures.push(format!("{} {}", r.status, r.text()));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    let killed = eventually(Duration::from_secs(30), || {
        let done = done.clone();
        async move { (done.load(Ordering::Relaxed) >= CLIENTS * PER_CLIENT / 4).then_some(()) }
    })
    .await;
    assert!(killed.is_some(), "load never got going");
    b.kill();
    // Aborting takes effect at each task's next await: let a task that was between its
    // read and its count finish counting before taking the figure.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b_at_kill = b.served.load(Ordering::Relaxed);
    let mut failures = Vec::new();
    for cl in clients {
        failures.extend(cl.await.expect("client"));
    }
    assert!(
        failures.is_empty(),
        "{} of {} GETs failed: {:?}\n{}",
        failures.len(),
        CLIENTS * PER_CLIENT,
        &failures[..failures.len().min(5)],
        edge.log()
    );
    assert!(b_at_kill > 0, "b served nothing before it was killed");
    assert_eq!(b.served.load(Ordering::Relaxed), b_at_kill, "a killed instance cannot serve");
    assert!(a.served.load(Ordering::Relaxed) > 0 && c.served.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_instances_unhealthy_answer_503_and_one_coming_back_recovers() {
    let ip = "127.0.0.5";
    let a = Instance::start("a", format!("{ip}:0").parse().unwrap()).await;
    let b = Instance::start("b", format!("{ip}:0").parse().unwrap()).await;
    let (a_addr, b_addr) = (a.addr, b.addr);
    let hc =
        ", health_check = { path = \"/healthz\", interval_ms = 200, timeout_ms = 150, healthy_threshold = 1, unhealthy_threshold = 2 }";
    let edge = Edge::start(&config(&[&a, &b], hc)).await;
    assert_eq!(edge.get("app.customer.test", "/").await.status, 200);

    a.kill();
    b.kill();
    drop((a, b));
    let down = eventually(Duration::from_secs(10), || async {
        let r = edge.get("app.customer.test", "/").await;
        (r.status == 503 && r.code() == "no_healthy_instance").then_some(r)
    })
    .await
    .unwrap_or_else(|| panic!("never 503 no_healthy_instance: {}", edge.log()));
    assert!(down.header("retry-after").is_some() || down.status == 503);
    // the branded page for browsers
    let page = edge.request("GET / HTTP/1.1\r\nHost: app.customer.test\r\nAccept: text/html\r\n").await;
    assert_eq!(page.status, 503);
    assert!(page.text().contains("<html") || page.text().contains("<!doctype"), "{}", page.text());

    // One instance comes back on its address: used again, no restart, no push.
    let back = Instance::start("b2", b_addr).await;
    let up = eventually(Duration::from_secs(10), || async {
        let r = edge.get("app.customer.test", "/").await;
        (r.status == 200).then_some(r)
    })
    .await
    .unwrap_or_else(|| panic!("never recovered: {}", edge.log()));
    assert!(up.text().contains("b2"), "{}", up.text());
    // the other is still down: every request goes to the one that came back
    for _ in 0..10 {
        let r = edge.get("app.customer.test", "/").await;
        assert_eq!(r.status, 200);
        assert!(r.text().contains("b2"), "{}", r.text());
    }
    assert!(back.served.load(Ordering::Relaxed) >= 11);
    let metrics = edge.api("GET", "/metrics", None).await.text();
    assert!(metrics.contains("miosa_edge_instance_health_transitions_total{to=\"unhealthy\"} 2"), "{metrics}");
    let _ = a_addr;
}
