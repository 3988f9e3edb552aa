//! A real Redis for fleet tests: Debian's `redis-server` (installed by scripts/deps) on a
//! free loopback port, with a password and append-only persistence, in a temp dir;
//! stopped by PID on drop. [`Redis::stop`] and [`Redis::start_again`] cut and restore it
//! mid-test on the same port and data (the outage cases).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The password every test Redis requires.
pub const PASSWORD: &str = "fleet-test-password";

/// A running `redis-server`.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts `redis-server` on a free port and waits (bounded) until it answers PING.
    /// Panics, pointing at scripts/deps, when it is not installed.
    pub fn start() -> Redis {
        let mut dir = tempfile::tempdir().expect("tempdir");
        for _ in 0..3 {
            let port = super::free_port();
            let mut r = Redis { child: None, port, dir };
            if r.spawn() {
                return r;
            }
            dir = r.take_dir();
        }
        panic!("redis-server did not start three times");
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.take().map(|mut c| {
            let _ = c.kill();
            c.wait()
        });
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The redis-server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--requirepass", PASSWORD])
            .args(["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("redis-server is not installed: run scripts/deps (it installs Debian's redis-server)")
            }
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.ping() {
                return true;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return false;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer within 20 s; its log:\n{}", self.log());
    }

    /// `redis://:PASSWORD@127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://:{PASSWORD}@127.0.0.1:{}/0", self.port)
    }

    fn ping(&self) -> bool {
        self.cmd(&["PING"]).is_some_and(|r| r.trim() == "PONG")
    }

    /// Runs a command with `redis-cli` (authenticated); `None` when it cannot connect.
    pub fn cmd(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--no-auth-warning", "-a", PASSWORD])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
    }

    /// Stops the server (SIGTERM by PID, waits for the exit).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data (after [`Redis::stop`]).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        assert!(self.spawn(), "redis-server did not start again on port {}; its log:\n{}", self.port, self.log());
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
