//! Every metric name and its registration, in one place.
//!
//! Label sets are small and fixed, so each combination is resolved once at start-up
//! into a plain counter: the request path increments an atomic, never hashes a label.
//! The registry is exposed by the control API's `/metrics` (CONTRACT §4).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// What a request was routed to, for the `route` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// A sandbox preview.
    Preview = 0,
    /// A deployment.
    Deployment = 1,
    /// Answered by the edge itself before routing (unknown host, bad request).
    Edge = 2,
    /// Storage: public objects and the S3 endpoint (CONTRACT §12).
    Storage = 3,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        ["preview", "deployment", "edge", "storage"][self as usize]
    }
}

const KINDS: [RouteKind; 4] = [RouteKind::Preview, RouteKind::Deployment, RouteKind::Edge, RouteKind::Storage];
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// Why an upstream attempt failed, for the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamFailure {
    Refused = 0,
    Timeout = 1,
    Reset = 2,
    Other = 3,
}

const FAILURES: [&str; 4] = ["refused", "timeout", "reset", "other"];

/// The credential a private-preview request presented, for the `credential` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credential {
    /// An `mp_` token (query or header).
    PreviewToken = 0,
    /// An `ms_` token (query or header).
    ShareToken = 1,
    /// The edge's session cookie.
    Session = 2,
    /// A share password posted to the form.
    Password = 3,
    /// Nothing usable.
    None = 4,
}

const CREDENTIALS: [&str; 5] = ["preview_token", "share_token", "session", "password", "none"];

/// How a request held for a suspended sandbox ended, for the `result` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeWait {
    /// The control plane pushed the sandbox as running: the request went on.
    Woken = 0,
    /// `[wake] timeout_ms` passed: 503 `sandbox_starting`.
    Timeout = 1,
    /// The wake hook call failed: 503 `sandbox_starting` at once.
    Failed = 2,
}

const WAKE_WAITS: [&str; 3] = ["woken", "timeout", "failed"];

/// Why a TLS handshake failed, for the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not finished within `[tls] handshake_timeout_ms`.
    Timeout = 0,
    /// The client closed or reset the connection during the handshake.
    Closed = 1,
    /// What the client sent is not TLS, or not well-formed TLS (plain HTTP to the TLS port).
    Malformed = 2,
    /// No protocol version, cipher suite or key exchange in common.
    Incompatible = 3,
    /// The client sent a fatal alert: usually it refused the certificate.
    Alert = 4,
    /// Any other TLS or I/O error.
    Other = 5,
}

const HANDSHAKE_FAILURES: [&str; 6] = ["timeout", "closed", "malformed", "incompatible", "alert", "other"];
/// Protocol versions of completed handshakes, for the `version` label.
const TLS_VERSIONS: [&str; 3] = ["1.2", "1.3", "other"];

/// The edge's metrics.
pub struct Metrics {
    pub registry: Registry,
    requests: Vec<IntCounter>,
    durations: Vec<Histogram>,
    upstream_failures: Vec<IntCounter>,
    wake_calls_ok: IntCounter,
    wake_calls_err: IntCounter,
    wake_waits: Vec<IntCounter>,
    reload_ok: IntCounter,
    reload_err: IntCounter,
    writes_ok: IntCounter,
    writes_rejected: IntCounter,
    access: Vec<IntCounter>,
    /// Live connections (WebSockets, streams) cut because their share was revoked or expired.
    pub revoked_connections: IntCounter,
    /// HTTP/2 connections closed for a flood of PING or SETTINGS frames.
    pub h2_floods: IntCounter,
    /// Client connections closed at once because their IP address held
    /// `[server] max_connections_per_ip` connections already.
    pub connections_over_ip_cap: IntCounter,
    release_fetch_ok: IntCounter,
    release_fetch_err: IntCounter,
    /// Static releases unpacked in the cache.
    pub releases_cached: IntGauge,
    /// Bytes of unpacked static releases in the cache.
    pub release_cache_bytes: IntGauge,
    /// Generation of the routing table being served.
    pub generation: IntGauge,
    /// Sandboxes in the routing table being served.
    pub sandboxes: IntGauge,
    /// notAfter (Unix seconds) of each certificate served, by store entry.
    pub certificate_expiry: prometheus::GaugeVec,
    /// ACME orders, by result (success, failure).
    pub acme_orders: IntCounterVec,
    /// What is left of each CA rate limit the edge budgets against.
    pub acme_budget: prometheus::IntGaugeVec,
    /// Fleet mode: 1 while this node's link to Redis works.
    pub cluster_connected: IntGauge,
    /// Fleet mode: the fleet's generation as last seen in Redis.
    pub cluster_generation: IntGauge,
    /// Fleet mode: how far behind the fleet's log this node applies (seconds).
    pub cluster_lag_seconds: prometheus::Gauge,
    /// Fleet mode: records of the fleet's log this node's state refused (passed over).
    pub cluster_refused: IntCounter,
    /// Fleet mode: values read from Redis that did not parse (skipped or refused).
    pub cluster_bad_input: IntCounter,
    health_up: IntCounter,
    health_down: IntCounter,
    tls_handshakes: Vec<IntCounter>,
    tls_handshake_failures: Vec<IntCounter>,
    tls_handshake_duration: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    // Names are constants of this module and registered once, so a clash is a
    // programming error caught by the unit test below, not an input.
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    c
}

/// A counter family, registered in `r`.
fn counters(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric definition: {e}")))
}

/// A counter, registered in `r`.
fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric definition: {e}")))
}

/// A gauge, registered in `r`.
fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric definition: {e}")))
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let req = counters(
            &registry,
            "miosa_edge_requests_total",
            "Requests answered, by route kind and status class.",
            &["route", "status_class"],
        );
        let dur = register(
            &registry,
            prometheus::HistogramVec::new(
                HistogramOpts::new(
                    "miosa_edge_request_duration_seconds",
                    "Time from request header to the end of the response, by route kind.",
                )
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                &["route"],
            )
            .unwrap_or_else(|e| panic!("metric definition: {e}")),
        );
        let fail = counters(
            &registry,
            "miosa_edge_upstream_failures_total",
            "Failed attempts to reach a sandbox or instance, by reason.",
            &["reason"],
        );
        let wake_calls = counters(
            &registry,
            "miosa_edge_wake_calls_total",
            "Calls of the [wake] hook for suspended sandboxes, by result (ok, error).",
            &["result"],
        );
        let wake_waits = counters(
            &registry,
            "miosa_edge_wake_waits_total",
            "Requests held for a suspended sandbox, by how the wait ended (woken, timeout, failed).",
            &["result"],
        );
        let reloads = counters(&registry, "miosa_edge_config_reloads_total", "Config file reloads, by result (ok, error).", &["result"]);
        let writes =
            counters(&registry, "miosa_edge_state_writes_total", "Control-API state writes, by result (ok, rejected).", &["result"]);
        let generation = gauge(&registry, "miosa_edge_state_generation", "Generation of the routing table being served.");
        let sandboxes = gauge(&registry, "miosa_edge_sandboxes", "Sandboxes in the routing table being served.");
        let access = counters(
            &registry,
            "miosa_edge_access_checks_total",
            "Access decisions on private previews, by credential presented and result (granted, denied).",
            &["credential", "result"],
        );
        let revoked_connections = counter(
            &registry,
            "miosa_edge_revoked_connections_total",
            "Live connections (WebSockets, streams) closed because the share token that opened them was revoked or expired.",
        );
        let connections_over_ip_cap = counter(
            &registry,
            "miosa_edge_connections_over_ip_cap_total",
            "Client connections closed at once because their IP address already held [server] max_connections_per_ip connections.",
        );
        let h2_floods = counter(
            &registry,
            "miosa_edge_h2_floods_total",
            "HTTP/2 connections closed because the client sent PING or SETTINGS frames past the budget (a flood).",
        );
        let release_fetches = counters(
            &registry,
            "miosa_edge_release_fetches_total",
            "Static release fetches (download, verify, unpack, index), by result (ok, error).",
            &["result"],
        );
        let releases_cached = gauge(&registry, "miosa_edge_releases_cached", "Static releases unpacked in the cache.");
        let release_cache_bytes = gauge(&registry, "miosa_edge_release_cache_bytes", "Bytes of unpacked static releases in the cache.");
        let certificate_expiry = register(
            &registry,
            prometheus::GaugeVec::new(
                Opts::new("miosa_edge_certificate_expiry_seconds", "notAfter of each certificate served (Unix seconds), by store entry."),
                &["cert"],
            )
            .unwrap_or_else(|e| panic!("metric definition: {e}")),
        );
        let acme_orders = counters(&registry, "miosa_edge_acme_orders_total", "ACME orders, by result (success, failure).", &["result"]);
        let acme_budget = register(
            &registry,
            prometheus::IntGaugeVec::new(
                Opts::new(
                    "miosa_edge_acme_budget_remaining",
                    "What is left of each CA rate limit (the tightest registered domain or hostname for per-name limits).",
                ),
                &["limit"],
            )
            .unwrap_or_else(|e| panic!("metric definition: {e}")),
        );
        let health = counters(
            &registry,
            "miosa_edge_instance_health_transitions_total",
            "Runtime instances taken out of rotation by their health check, or back in, by direction (unhealthy, healthy).",
            &["to"],
        );
        let tls_handshakes = counters(
            &registry,
            "miosa_edge_tls_handshakes_total",
            "Completed TLS handshakes on [server] https, by protocol version.",
            &["version"],
        );
        let tls_failures = counters(
            &registry,
            "miosa_edge_tls_handshake_failures_total",
            "TLS handshakes that did not complete, by reason (timeout, closed, malformed, incompatible, alert, other).",
            &["reason"],
        );
        let tls_duration = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "miosa_edge_tls_handshake_duration_seconds",
                    "Time from a connection's accept to its completed TLS handshake (includes the client's round trips).",
                )
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]),
            )
            .unwrap_or_else(|e| panic!("metric definition: {e}")),
        );
        let cluster_connected = gauge(&registry, "miosa_edge_cluster_connected", "Fleet mode: 1 while this node reaches Redis, else 0.");
        let cluster_generation =
            gauge(&registry, "miosa_edge_cluster_generation", "Fleet mode: the fleet's state generation as last seen in Redis.");
        let cluster_lag_seconds = register(
            &registry,
            prometheus::Gauge::new(
                "miosa_edge_cluster_lag_seconds",
                "Fleet mode: age of the newest fleet write this node has applied when it was applied (0 when caught up).",
            )
            .unwrap_or_else(|e| panic!("metric definition: {e}")),
        );
        let cluster_refused = counter(
            &registry,
            "miosa_edge_cluster_refused_total",
            "Fleet mode: fleet writes this node's state refused (a collision with its TOML routes), passed over whole.",
        );
        let cluster_bad_input = counter(
            &registry,
            "miosa_edge_cluster_bad_input_total",
            "Fleet mode: values read from Redis that did not parse (foreign keys, truncated records), skipped or refused.",
        );
        let mut requests = Vec::new();
        for k in KINDS {
            for c in CLASSES {
                requests.push(req.with_label_values(&[k.as_str(), c]));
            }
        }
        Metrics {
            requests,
            durations: KINDS.iter().map(|k| dur.with_label_values(&[k.as_str()])).collect(),
            upstream_failures: FAILURES.iter().map(|r| fail.with_label_values(&[*r])).collect(),
            wake_calls_ok: wake_calls.with_label_values(&["ok"]),
            wake_calls_err: wake_calls.with_label_values(&["error"]),
            wake_waits: WAKE_WAITS.iter().map(|r| wake_waits.with_label_values(&[*r])).collect(),
            reload_ok: reloads.with_label_values(&["ok"]),
            reload_err: reloads.with_label_values(&["error"]),
            writes_ok: writes.with_label_values(&["ok"]),
            writes_rejected: writes.with_label_values(&["rejected"]),
            access: CREDENTIALS.iter().flat_map(|c| ["granted", "denied"].map(|r| access.with_label_values(&[*c, r]))).collect(),
            revoked_connections,
            connections_over_ip_cap,
            h2_floods,
            release_fetch_ok: release_fetches.with_label_values(&["ok"]),
            release_fetch_err: release_fetches.with_label_values(&["error"]),
            releases_cached,
            release_cache_bytes,
            generation,
            sandboxes,
            certificate_expiry,
            acme_orders,
            acme_budget,
            cluster_connected,
            cluster_generation,
            cluster_lag_seconds,
            cluster_refused,
            cluster_bad_input,
            health_up: health.with_label_values(&["healthy"]),
            health_down: health.with_label_values(&["unhealthy"]),
            tls_handshakes: TLS_VERSIONS.iter().map(|v| tls_handshakes.with_label_values(&[*v])).collect(),
            tls_handshake_failures: HANDSHAKE_FAILURES.iter().map(|r| tls_failures.with_label_values(&[*r])).collect(),
            tls_handshake_duration: tls_duration,
            registry,
        }
    }

    /// An instance changed health (active checks).
    pub fn health_transition(&self, healthy: bool) {
        if healthy { &self.health_up } else { &self.health_down }.inc();
    }

    /// Counts one completed TLS handshake; `version` as rustls names it (`TLSv1_3`).
    pub fn tls_handshake(&self, version: &str, seconds: f64) {
        let i = match version {
            "TLSv1_2" => 0,
            "TLSv1_3" => 1,
            _ => 2,
        };
        self.tls_handshakes[i].inc();
        self.tls_handshake_duration.observe(seconds);
    }

    /// Counts one TLS handshake that did not complete.
    pub fn tls_handshake_failure(&self, reason: HandshakeFailure) {
        self.tls_handshake_failures[reason as usize].inc();
    }

    /// Counts one answered request.
    pub fn request(&self, kind: RouteKind, status: u16, seconds: f64) {
        let class = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            500..=599 => 4,
            _ => 5,
        };
        self.requests[kind as usize * CLASSES.len() + class].inc();
        self.durations[kind as usize].observe(seconds);
    }

    /// Counts one failed upstream attempt.
    pub fn upstream_failure(&self, reason: UpstreamFailure) {
        self.upstream_failures[reason as usize].inc();
    }

    /// Counts one call of the wake hook.
    pub fn wake_call(&self, ok: bool) {
        if ok { &self.wake_calls_ok } else { &self.wake_calls_err }.inc();
    }

    /// Counts one request held for a suspended sandbox, by how its wait ended.
    pub fn wake_wait(&self, result: WakeWait) {
        self.wake_waits[result as usize].inc();
    }

    /// Counts one access decision on a private preview.
    pub fn access(&self, credential: Credential, granted: bool) {
        self.access[credential as usize * 2 + usize::from(!granted)].inc();
    }

    /// Counts one static release fetch.
    pub fn release_fetch(&self, ok: bool) {
        if ok { &self.release_fetch_ok } else { &self.release_fetch_err }.inc();
    }

    /// Counts one config reload.
    pub fn reload(&self, ok: bool) {
        if ok { &self.reload_ok } else { &self.reload_err }.inc();
    }

    /// Counts one control-API state write.
    pub fn state_write(&self, ok: bool) {
        if ok { &self.writes_ok } else { &self.writes_rejected }.inc();
    }

    /// Reload counts so far: (ok, error).
    pub fn reload_counts(&self) -> (u64, u64) {
        (self.reload_ok.get(), self.reload_err.get())
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = enc.encode_utf8(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_counts() {
        let m = Metrics::new();
        m.request(RouteKind::Preview, 200, 0.001);
        m.request(RouteKind::Edge, 404, 0.0001);
        m.upstream_failure(UpstreamFailure::Refused);
        m.wake_call(false);
        m.wake_wait(WakeWait::Woken);
        m.reload(false);
        m.access(Credential::ShareToken, false);
        m.access(Credential::Session, true);
        m.tls_handshake("TLSv1_3", 0.002);
        m.tls_handshake("SSLv3", 0.002);
        m.tls_handshake_failure(HandshakeFailure::Malformed);
        let text = m.render();
        assert!(text.contains(r#"miosa_edge_tls_handshakes_total{version="1.3"} 1"#), "{text}");
        assert!(text.contains(r#"miosa_edge_tls_handshakes_total{version="other"} 1"#));
        assert!(text.contains(r#"miosa_edge_tls_handshake_failures_total{reason="malformed"} 1"#));
        assert!(text.contains(r#"miosa_edge_tls_handshake_failures_total{reason="timeout"} 0"#));
        assert!(text.contains("miosa_edge_tls_handshake_duration_seconds_count 2"));
        assert!(text.contains(r#"miosa_edge_requests_total{route="preview",status_class="2xx"} 1"#), "{text}");
        assert!(text.contains(r#"miosa_edge_requests_total{route="edge",status_class="4xx"} 1"#));
        assert!(text.contains(r#"miosa_edge_upstream_failures_total{reason="refused"} 1"#));
        assert!(text.contains(r#"miosa_edge_wake_calls_total{result="error"} 1"#), "{text}");
        assert!(text.contains(r#"miosa_edge_wake_waits_total{result="woken"} 1"#));
        assert!(text.contains(r#"miosa_edge_wake_waits_total{result="timeout"} 0"#));
        assert!(text.contains(r#"miosa_edge_config_reloads_total{result="error"} 1"#));
        assert!(text.contains("miosa_edge_request_duration_seconds_bucket"));
        assert!(text.contains(r#"miosa_edge_access_checks_total{credential="share_token",result="denied"} 1"#), "{text}");
        assert!(text.contains(r#"miosa_edge_access_checks_total{credential="session",result="granted"} 1"#));
        assert!(text.contains(r#"miosa_edge_access_checks_total{credential="session",result="denied"} 0"#));
        assert_eq!(m.reload_counts(), (0, 1));
    }
}
