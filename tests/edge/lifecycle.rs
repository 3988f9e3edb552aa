//! Process lifecycle: SIGTERM lets in-flight requests finish; `run --upgrade` plus
//! SIGQUIT to the old process hands the listening sockets over under load with zero
//! failed requests.

use crate::support::{eventually, free_port, raw_request, CONTROL_TOKEN, SESSION_KEY};
use crate::Fixture;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts `miosa-edge run --config <config> [--upgrade]`; the stdout "listening" line is
/// reported through the returned flag once printed.
fn spawn(config: &Path, log: &Path, upgrade: bool) -> (Child, Arc<AtomicBool>) {
    let mut cmd = edge_command(config, log);
    if upgrade {
        cmd.arg("--upgrade");
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
    let out = child.stdout.take().expect("stdout");
    let up = Arc::new(AtomicBool::new(false));
    let u = up.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("miosa-edge listening") {
                u.store(true, Ordering::SeqCst);
            }
        }
    });
    (child, up)
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status().expect("kill").success());
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// `miosa-edge run --config <config>`, its stderr appended to `log`.
fn edge_command(config: &Path, log: &Path) -> Command {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_miosa-edge"));
    cmd.args(["run", "--config"])
        .arg(config)
        .env("MIOSA_EDGE_LOG", "info")
        .env("MIOSA_EDGE_CONTROL_TOKEN", CONTROL_TOKEN)
        .env("MIOSA_EDGE_SESSION_KEY", SESSION_KEY)
        .stderr(log);
    cmd
}

struct Setup {
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    http: SocketAddr,
    control: SocketAddr,
}

fn setup(body: &str) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let (http, control) = (free_port(), free_port());
    let config = dir.path().join("edge.toml");
    let text = format!(
        // One proxy thread: the single-threaded scheduler's start, hand-over and stops.
        "[server]\nhttp = \"127.0.0.1:{http}\"\nstate_dir = \"{}\"\nwatch_interval_ms = 0\nthreads = 1\n\n[control]\nlisten = \"127.0.0.1:{control}\"\n\n{body}",
        dir.path().join("var").display()
    );
    std::fs::write(&config, text).expect("config");
    let log = dir.path().join("edge.log");
    Setup { config, log, http: SocketAddr::from(([127, 0, 0, 1], http)), control: SocketAddr::from(([127, 0, 0, 1], control)), _dir: dir }
}

async fn until_up(up: &AtomicBool, addr: SocketAddr, log: &Path) {
    let ok = eventually(Duration::from_secs(30), || async {
        (up.load(Ordering::SeqCst) && tokio::net::TcpStream::connect(addr).await.is_ok()).then_some(())
    })
    .await;
    assert!(ok.is_some(), "edge did not come up: {}", std::fs::read_to_string(log).unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_hands_the_sockets_over_under_load_without_a_failed_request() {
    let f = Fixture::start().await;
    let s = setup(&f.toml(""));
    let host = format!("{}-abc12345.sandbox.localhost", f.pa());
    let (mut old, old_up) = spawn(&s.config, &s.log, false);
    until_up(&old_up, s.http, &s.log).await;

    // Bounded load: 4 clients, a new connection per request, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::<String>::new())));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, host, addr) = (stop.clone(), ok.clone(), failed.clone(), host.clone(), s.http);
        clients.push(tokio::spawn(async move {
            for _ in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let r = raw_request(addr, &format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")).await;
                if r.status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.lock().unwrap().push(format!("{} {}", r.status, r.text()));
                }
            }
        }));
    }
    let warm = eventually(Duration::from_secs(20), || async { (ok.load(Ordering::Relaxed) >= 200).then_some(()) }).await;
    assert!(warm.is_some(), "no load");

    // The new binary waits for the sockets; SIGQUIT makes the old one send them and drain.
    let (mut new, new_up) = spawn(&s.config, &s.log, true);
    let sock = s.config.parent().unwrap().join("var/upgrade.sock");
    let ready = eventually(Duration::from_secs(20), || async { sock.exists().then_some(()) }).await;
    assert!(ready.is_some(), "the new process never listened for the sockets: {}", std::fs::read_to_string(&s.log).unwrap_or_default());
    let before = ok.load(Ordering::Relaxed);
    signal(&old, "QUIT");
    until_up(&new_up, s.http, &s.log).await;
    let old_status = tokio::task::spawn_blocking(move || wait_exit(&mut old, Duration::from_secs(30))).await.unwrap();
    assert!(
        old_status.is_some_and(|st| st.success()),
        "old process: {old_status:?}\n{}",
        std::fs::read_to_string(&s.log).unwrap_or_default()
    );
    // Load goes on against the new process alone for a moment.
    let after_exit = ok.load(Ordering::Relaxed);
    let more = eventually(Duration::from_secs(20), || async { (ok.load(Ordering::Relaxed) >= after_exit + 200).then_some(()) }).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client");
    }
    let failed = failed.lock().unwrap().clone();
    let served = ok.load(Ordering::Relaxed);
    assert!(more.is_some(), "the new process did not serve after the old one exited");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the upgrade: {:?}",
        failed.len(),
        served + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(served > before + 200, "served {served}, {before} before the upgrade");
    eprintln!("upgrade under load: {served} requests, 0 failed ({before} before SIGQUIT, {after_exit} when the old process exited)");
    // The control API moved too.
    let h = raw_request(s.control, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(h.status, 200);
    signal(&new, "TERM");
    let st = tokio::task::spawn_blocking(move || wait_exit(&mut new, Duration::from_secs(30))).await.unwrap();
    assert!(st.is_some_and(|st| st.success()), "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_lets_a_request_in_flight_finish() {
    let f = Fixture::start().await;
    let s = setup(&f.toml(""));
    let host = format!("{}-abc12345.sandbox.localhost", f.pa());
    let (mut edge, up) = spawn(&s.config, &s.log, false);
    until_up(&up, s.http, &s.log).await;

    let ctl = f.a_public.expect_stream();
    let mut conn = tokio::net::TcpStream::connect(s.http).await.expect("connect");
    conn.write_all(format!("GET /stream HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("write");
    tokio::time::timeout(Duration::from_secs(10), ctl.started).await.expect("stream started").expect("started");

    signal(&edge, "TERM");
    // New connections are refused once the listener is closed...
    let closed =
        eventually(Duration::from_secs(10), || async { tokio::net::TcpStream::connect(s.http).await.is_err().then_some(()) }).await;
    assert!(closed.is_some(), "still accepting after SIGTERM");
    // ...while the request in flight completes.
    ctl.release.send(()).expect("release");
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut body)).await.expect("in-flight response timed out").expect("read");
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("chunk-99;") && text.contains("end"), "the in-flight response was cut: {text}");
    let st = tokio::task::spawn_blocking(move || wait_exit(&mut edge, Duration::from_secs(20))).await.unwrap();
    assert!(st.is_some_and(|st| st.success()), "exit: {st:?}\n{}", std::fs::read_to_string(&s.log).unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_files_limit_is_raised_to_the_hard_one() {
    use std::os::unix::process::CommandExt;
    let s = setup("");
    let (_, hard) = miosa_edge::files::open_files_limit().expect("this process's open files limit");
    assert!(hard > 256, "the hard limit ({hard}) leaves nothing to raise");
    let mut cmd = edge_command(&s.config, &s.log);
    cmd.stdout(Stdio::null());
    // SAFETY: only setrlimit (async-signal-safe) between fork and exec. The soft limit
    // of a shell's default (1024) or lower, under the same hard limit.
    unsafe {
        cmd.pre_exec(move || {
            let l = libc::rlimit { rlim_cur: 256, rlim_max: hard };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = cmd.spawn().expect("spawn");
    let up = eventually(Duration::from_secs(30), || async { tokio::net::TcpStream::connect(s.http).await.ok().map(|_| ()) }).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).expect("limits");
    let _ = child.kill();
    let _ = child.wait();
    assert!(up.is_some(), "edge did not come up: {}", std::fs::read_to_string(&s.log).unwrap_or_default());
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files line");
    let soft: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(soft, [hard.to_string(), hard.to_string()], "{line}");
}

/// A pipe whose buffer is full: a process given its write end as stdout blocks on its
/// first write until the read end is read.
fn full_pipe() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two new descriptors, owned below and by nothing else.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0, "pipe2");
    let (read, write) = unsafe { (std::fs::File::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) };
    let mut w = std::fs::File::from(write);
    // Non-blocking while it is filled (the write end only).
    // SAFETY: fcntl on a descriptor owned by `w`.
    assert_eq!(unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&w), libc::F_SETFL, libc::O_NONBLOCK) }, 0, "fcntl");
    loop {
        match std::io::Write::write(&mut w, &[b'.'; 4096]) {
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the pipe: {e}"),
        }
    }
    // Blocking again, for the edge: a non-blocking stdout would fail its write instead.
    // SAFETY: fcntl on a descriptor owned by `w`.
    assert_eq!(unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&w), libc::F_SETFL, 0) }, 0, "fcntl");
    (read, w.into())
}

/// The HTTP port is the edge's from the moment it is checked at start until the server
/// serves it: binding it, letting go and binding again left a gap in which another
/// socket could take it (an edge on port 0 in the tests once announced a port it never
/// served). The edge is held on its "listening" line, after everything is set up and
/// before the server runs, by a stdout pipe that is full: the port takes connections
/// and cannot be bound by anyone else then, and the connection made meanwhile is served
/// once the edge goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_is_held_from_start_until_it_is_served() {
    let s = setup("");
    let (mut stdout, write_end) = full_pipe();
    let mut child = edge_command(&s.config, &s.log).stdout(Stdio::from(write_end)).spawn().expect("spawn");
    let held = eventually(Duration::from_secs(30), || async { tokio::net::TcpStream::connect(s.http).await.ok() }).await;
    let taken = std::net::TcpListener::bind(s.http).map(|_| ()).map_err(|e| e.kind());
    let drain = std::thread::spawn(move || std::io::Read::read_to_end(&mut stdout, &mut Vec::new()));
    let answer = match held {
        Some(mut conn) => {
            conn.write_all(b"GET / HTTP/1.1\r\nHost: nowhere.localhost\r\nConnection: close\r\n\r\n").await.expect("write");
            crate::support::read_response(&mut conn, Duration::from_secs(20)).await.map(|(_, r)| r.status)
        }
        None => None,
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = drain.join();
    let log = std::fs::read_to_string(&s.log).unwrap_or_default();
    assert_eq!(taken, Err(std::io::ErrorKind::AddrInUse), "the port was free while the edge was held: {log}");
    assert_eq!(answer, Some(404), "the connection made while the edge was held: {log}");
}

/// An edge whose stdout has no reader any more (a pipe into a program that exited)
/// goes on serving: its "listening" line is not worth stopping for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_whose_stdout_is_gone_goes_on() {
    let s = setup("");
    let (stdout, write_end) = full_pipe();
    drop(stdout);
    let mut child = edge_command(&s.config, &s.log).stdout(Stdio::from(write_end)).spawn().expect("spawn");
    let raw = "GET / HTTP/1.1\r\nHost: nowhere.localhost\r\nConnection: close\r\n\r\n";
    let status =
        eventually(Duration::from_secs(30), || async { crate::support::try_raw_request(s.http, raw).await.ok().map(|r| r.status) }).await;
    let exited = child.try_wait().expect("try_wait");
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&s.log).unwrap_or_default();
    assert_eq!((status, exited), (Some(404), None), "{log}");
}
