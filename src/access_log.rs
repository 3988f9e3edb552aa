//! The structured access log: one JSON object per request, off by default.
//!
//! Lines are formatted on the proxy thread and handed to the writer service through a
//! bounded channel; when the writer falls behind, lines are dropped and counted
//! (`miosa_edge_access_log_dropped_total`) rather than slowing requests down. Query
//! values of `token` are redacted: tokens never reach the log.

use crate::services::{Service, Shutdown};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running access log: proxy threads queue lines, the [`AccessLogWriter`] service
/// writes them.
pub struct AccessLog {
    tx: SyncSender<String>,
    /// Shared by the logs that replace each other on config reloads.
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessLog")
    }
}

/// Writes the queued lines to their target (a blocking loop on the services' blocking
/// pool), flushing after each batch, until every [`AccessLog`] handle is gone.
pub struct AccessLogWriter {
    /// The target and the queue, taken when the service starts.
    out: Mutex<Option<Pending>>,
}

type Pending = (Box<dyn Write + Send>, Receiver<String>);

impl AccessLog {
    /// Opens `target` (`stdout`, or a file path appended to): the log, and the writer to
    /// start as a service.
    pub fn open(target: &str) -> std::io::Result<(AccessLog, AccessLogWriter)> {
        let out: Box<dyn Write + Send> = if target == "stdout" {
            Box::new(std::io::stdout())
        } else {
            Box::new(std::fs::OpenOptions::new().create(true).append(true).open(target)?)
        };
        let (tx, rx) = sync_channel::<String>(65_536);
        Ok((AccessLog { tx, dropped: Arc::default() }, AccessLogWriter { out: Mutex::new(Some((out, rx))) }))
    }

    /// Queues one line (without waiting).
    pub fn write(&self, mut line: String) {
        line.push('\n');
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts its dropped lines on `counter` (the one of the log it replaces).
    pub fn counting_on(mut self, counter: Arc<AtomicU64>) -> Self {
        self.dropped = counter;
        self
    }

    /// Where this log counts its dropped lines.
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[async_trait::async_trait]
impl Service for AccessLogWriter {
    fn name(&self) -> &'static str {
        "access log"
    }

    /// Runs until the last [`AccessLog`] is dropped, not at shutdown: requests still
    /// draining after the shutdown signal are logged too.
    async fn run(self: Arc<Self>, _shutdown: Shutdown) {
        let Some((mut out, rx)) = self.out.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        let written = tokio::task::spawn_blocking(move || {
            let mut buf = std::io::BufWriter::with_capacity(64 * 1024, &mut out);
            loop {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(line) => {
                        let _ = buf.write_all(line.as_bytes());
                        // Drain what is queued, then flush once.
                        while let Ok(l) = rx.try_recv() {
                            let _ = buf.write_all(l.as_bytes());
                        }
                        let _ = buf.flush();
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        let _ = buf.flush();
                        return;
                    }
                }
            }
        });
        if let Err(e) = written.await {
            tracing::error!(error = %e, "the access log writer failed");
        }
    }
}

/// One request's line: fixed field names, the target redacted.
#[derive(Debug)]
pub struct Entry<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub host: Option<&'a str>,
    /// The request target as sent (`token` values are redacted in the line).
    pub target: &'a [u8],
    /// The route kind (`preview`, `deployment`, `edge`, `storage`).
    pub route: &'a str,
    pub workspace: Option<&'a str>,
    pub deployment: Option<&'a str>,
    pub sandbox: Option<&'a str>,
    pub bucket: Option<&'a str>,
    pub status: u16,
    /// Body bytes sent to the client.
    pub bytes: u64,
    pub duration: Duration,
    pub upstream: Option<std::net::SocketAddr>,
}

impl Entry<'_> {
    /// The JSON object of this entry, one line.
    pub fn line(&self) -> String {
        serde_json::json!({
            "ts": now_rfc3339_ms(),
            "request_id": self.request_id,
            "method": self.method,
            "host": self.host,
            "path": redact(&String::from_utf8_lossy(self.target)),
            "route": self.route,
            "workspace": self.workspace,
            "deployment": self.deployment,
            "sandbox": self.sandbox,
            "bucket": self.bucket,
            "status": self.status,
            "bytes": self.bytes,
            "duration_ms": self.duration.as_secs_f64() * 1000.0,
            "upstream": self.upstream.map(|a| a.to_string()),
        })
        .to_string()
    }
}

/// `path` with the value of every credential in its query — `token`, and a presigned
/// URL's `X-Amz-Signature` — replaced by `REDACTED`.
pub fn redact(path: &str) -> std::borrow::Cow<'_, str> {
    let secret = |k: &str| k.eq_ignore_ascii_case("token") || k.eq_ignore_ascii_case("x-amz-signature");
    let Some((p, q)) = path.split_once('?') else { return path.into() };
    if !q.split('&').any(|kv| kv.split('=').next().is_some_and(secret)) {
        return path.into();
    }
    let q: Vec<String> = q
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if secret(k) => format!("{k}=REDACTED"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{p}?{}", q.join("&")).into()
}

/// Now as RFC 3339 with milliseconds, UTC.
pub fn now_rfc3339_ms() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = crate::schema::Timestamp(now.as_secs() as i64).to_rfc3339();
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), now.subsec_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_redacted() {
        assert_eq!(redact("/a?token=mp_secret&x=1"), "/a?token=REDACTED&x=1");
        assert_eq!(redact("/a?x=1&TOKEN=ms_s"), "/a?x=1&TOKEN=REDACTED");
        assert_eq!(redact("/a?tokens=1"), "/a?tokens=1");
        assert_eq!(redact("/plain"), "/plain");
    }

    #[test]
    fn lines_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let (log, writer) = AccessLog::open(path.to_str().unwrap()).unwrap();
        let services = crate::services::Services::new().unwrap();
        services.start(Arc::new(writer));
        log.write("{\"a\":1}".into());
        log.write("{\"a\":2}".into());
        let mut text = String::new();
        for _ in 0..100 {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(text, "{\"a\":1}\n{\"a\":2}\n");
        assert_eq!(log.dropped(), 0);
        drop(log);
        services.stop();
        let ts = now_rfc3339_ms();
        assert!(ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
    }
}
