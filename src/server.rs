//! Start-up: config → the last acknowledged state → the background services → the
//! pingora server with the proxy service, until a signal stops it.

use crate::access_log::AccessLog;
use crate::cluster::certs::{CertFleet, FleetStore, RedisCertStore};
use crate::config::Config;
use crate::control::{resolve_token, secret_file, ControlApi, ControlError};
use crate::metrics::Metrics;
use crate::proxy::{EdgeProxy, Live, ProxyOptions, SharedLive, TlsFront};
use crate::releases::Releases;
use crate::reload::{Apply, Commit, ReloadService, Reloader};
use crate::schema::Kind;
use crate::services::Services;
use crate::store::{OpenError, Store};
use crate::tls::{default_cert, CertStore, DirStore, SniResolver, WatchService, Watcher};
use crate::upstream::health::HealthChecker;
use crate::usage::Usage;
use pingora::listeners::tls::Acceptor;
use pingora::proxy::http_proxy;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::listening::Service;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the routing state: {0}")]
    State(#[from] OpenError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot open the access log {target}: {source}")]
    AccessLog {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch SIGHUP for config reloads: {0}")]
    Reload(#[source] std::io::Error),
    #[error("cannot start the background services' runtime: {0}")]
    Services(#[source] std::io::Error),
    #[error("static.store: {0}")]
    ReleaseStore(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("cannot start the static release cache: {0}")]
    Releases(#[source] std::io::Error),
    #[error("wake.url: {0}")]
    Wake(#[from] crate::hook::HookUrlError),
    #[error("tls: {0}")]
    Tls(String),
    #[error("upgrade: {0}")]
    Upgrade(String),
    #[error("{0}")]
    Cluster(String),
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("acme: {0}")]
    Acme(String),
}

/// A listener bound before the server runs, so a busy port is a clear error (not a
/// panic inside the server) and port 0 is resolved to the port announced; the socket is
/// then handed to pingora as it is ([`Server::adopt_tcp_listener`]), so the port is
/// never let go in between for another socket to take. With `upgrade` nothing is bound:
/// the old process hands its sockets over.
fn bind_listener(addr: SocketAddr, upgrade: bool) -> Result<(SocketAddr, Option<TcpListener>), StartError> {
    if upgrade {
        return Ok((addr, None));
    }
    let l = TcpListener::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
    let actual = l.local_addr().map_err(|source| StartError::Bind { addr, source })?;
    Ok((actual, Some(l)))
}

/// Serves `addr` on `service` with the socket [`bind_listener`] bound for it, if any.
fn listen_on<A>(server: &Server, service: &mut Service<A>, addr: SocketAddr, bound: Option<TcpListener>) -> Result<(), StartError> {
    let name = addr.to_string();
    service.add_tcp(&name);
    match bound {
        Some(l) => server.adopt_tcp_listener(&name, l).map_err(|source| StartError::Bind { addr, source }),
        None => Ok(()),
    }
}

/// The control listener, bound once the previous process let go of it (upgrade).
fn bind_control(addr: SocketAddr, upgrade: bool) -> Result<TcpListener, StartError> {
    let deadline = std::time::Instant::now() + UPGRADE_CONTROL_WAIT;
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if upgrade && e.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => return Err(StartError::Bind { addr, source }),
        }
    }
}

/// How long an upgrading process waits for the old one to release the control port.
const UPGRADE_CONTROL_WAIT: Duration = Duration::from_secs(30);

/// Raises the soft limit on open descriptors to the hard one, as Go programs (Caddy) do
/// at start and nginx's `worker_rlimit_nofile` is set for: every proxied connection
/// takes two descriptors and the releases keep up to
/// [`crate::releases::serve::KEPT_OPEN_MAX`] files open, and a
/// soft limit of 1024 (the usual default outside systemd units) would refuse
/// connections long before anything else runs out. Returns the limit in force.
pub fn raise_open_files_limit() -> libc::rlim_t {
    let Some((soft, hard)) = crate::files::open_files_limit() else { return 0 };
    if soft >= hard {
        return soft;
    }
    let raised = libc::rlimit { rlim_cur: hard, rlim_max: hard };
    // SAFETY: setrlimit with a valid resource and a pointer to a live rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        tracing::debug!(from = soft, to = hard, "open files limit raised");
        return hard;
    }
    tracing::warn!(limit = soft, "cannot raise the open files limit");
    soft
}

/// Runs the edge until it is told to stop: SIGTERM graceful (stop accepting, finish
/// in-flight requests), SIGQUIT graceful with the listening sockets handed to a process
/// started with `upgrade`, SIGINT fast.
pub fn run(mut cfg: Config, upgrade: bool) -> Result<(), StartError> {
    if upgrade {
        for (key, addr) in
            [("server.http", Some(cfg.server.http)), ("server.https", cfg.server.https), ("control.listen", Some(cfg.control.listen))]
        {
            if addr.is_some_and(|a| a.port() == 0) {
                return Err(StartError::Upgrade(format!("{key} must name a port to take over, not 0")));
            }
        }
    }
    raise_open_files_limit();
    let threads = match cfg.server.threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(10),
        upgrade_sock: cfg.server.state_dir.join("upgrade.sock").display().to_string(),
        // One proxy thread runs tokio's single-threaded scheduler (pingora's NoSteal of
        // one): no work-stealing queues, no idle worker woken per task (~1% fewer
        // instructions; benches/load/RESULTS.md, sixth session). Several keep work
        // stealing: without it pingora places every HTTP/2 stream on a random thread, away
        // from its connection's, which was not measured here.
        work_stealing: threads > 1,
        ..Default::default()
    };
    if let Err(e) = std::fs::create_dir_all(&cfg.server.state_dir) {
        return Err(StartError::StateDir { path: cfg.server.state_dir.clone(), source: e });
    }
    let opt = pingora::server::configuration::Opt { upgrade, ..Default::default() };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    // With `upgrade`, this waits for the old process's sockets (sent on its SIGQUIT);
    // everything below (state, control port) is taken after that, so no acknowledged
    // write of the old process is missed.
    server.bootstrap();
    let control_listener = bind_control(cfg.control.listen, upgrade)?;
    load_session_key(&mut cfg)?;

    let services = Services::new().map_err(StartError::Services)?;
    let metrics = Arc::new(Metrics::new());
    // [cluster]: a node with no state of its own starts from the fleet's snapshot.
    let cluster = crate::cluster::Cluster::new(&cfg, metrics.clone()).map_err(StartError::Cluster)?;
    if let Some(c) = &cluster {
        c.prepare();
    }
    // The last acknowledged control-plane state is loaded before anything listens.
    let store = Arc::new(Store::open(&cfg, metrics.clone(), true)?);
    if let Some(c) = &cluster {
        // Writes go through the fleet's log; every node follows it.
        c.attach(&store);
        services.start(Arc::new(crate::cluster::Follower { cluster: c.clone(), store: store.clone() }));
        services.start(Arc::new(crate::cluster::Beats { cluster: c.clone(), store: store.clone() }));
    }
    let routes = store.routes();
    services.start(Arc::new(crate::store::Compactor(store.clone())));
    let usage = Arc::new(Usage::open(cfg.server.state_dir.join("usage.json")));
    services.start(Arc::new(crate::usage::UsageSaver(usage.clone())));
    // [cluster]: this node's usage counts go to the fleet's every second.
    let fleet_usage = cluster.as_ref().map(|c| Arc::new(crate::cluster::counters::FleetUsage::new(c.clone(), usage.clone())));
    if let Some(f) = &fleet_usage {
        services.start(Arc::new(crate::cluster::counters::UsageFlusher(f.clone())));
    }
    let access_log = match cfg.log.access.as_str() {
        "off" => None,
        target => {
            let (log, writer) = AccessLog::open(target).map_err(|source| StartError::AccessLog { target: target.to_string(), source })?;
            services.start(Arc::new(writer));
            Some(Arc::new(log))
        }
    };

    let access_log_dropped = access_log.as_ref().map(|l| l.dropped_counter()).unwrap_or_default();

    // Taken over sockets are not bound again; fresh ones are bound now (port 0 resolved).
    let (http, http_socket) = bind_listener(cfg.server.http, upgrade)?;
    let (https, https_socket) = match cfg.server.https {
        Some(addr) => bind_listener(addr, upgrade).map(|(a, l)| (Some(a), l))?,
        None => (None, None),
    };
    // [cluster]: the fleet's certificates, ACME account, ledger, locks and challenges.
    let cert_fleet = match &cluster {
        Some(c) => {
            let seal_key = cfg.cluster.as_ref().and_then(|x| x.seal_key.as_deref());
            Some(CertFleet::new(c.clone(), seal_key).map_err(StartError::Cluster)?)
        }
        None => None,
    };
    // TLS: the default certificate, then certs_dir (and the fleet's certificates),
    // watched; handshakes read the index.
    let watch_interval = Arc::new(AtomicU64::new(watch_interval_ms(&cfg, cert_fleet.is_some())));
    let certs = match https {
        Some(_) => {
            let store = cert_store(&cfg, cert_fleet.as_ref())?;
            let watcher = certificates(&cfg, &metrics, store)?;
            services.start(Arc::new(WatchService { watcher: watcher.clone(), interval_ms: watch_interval.clone() }));
            Some(watcher)
        }
        None => None,
    };
    let http01 = Arc::new(crate::acme::Http01::default());
    if let Some(fleet) = &cert_fleet {
        // Any node answers the HTTP-01 challenges of any node's orders, with or
        // without [acme].
        services.start(Arc::new(crate::acme::fleet::TokenFollower { fleet: fleet.clone(), http01: http01.clone() }));
    }
    services.start(Arc::new(HealthChecker::new(routes.clone(), store.subscribe_to(Kind::Deployment), metrics.clone())));
    // [static]: releases are fetched as soon as a version names them, and served here.
    let release_store = crate::releases::store::open(&cfg.static_.store).map_err(StartError::ReleaseStore)?;
    let releases = Releases::new(
        &cfg.static_,
        &cfg.server.state_dir,
        release_store,
        routes.clone(),
        store.subscribe_to(Kind::Deployment),
        metrics.clone(),
        services.handle(),
    )
    .map_err(StartError::Releases)?;
    services.start(releases.clone());
    let acme_inputs = certs.as_ref().map(|watcher| AcmeInputs {
        state_dir: cfg.server.state_dir.clone(),
        watcher: watcher.clone(),
        store: store.clone(),
        http01: http01.clone(),
        metrics: metrics.clone(),
        fleet: cert_fleet.clone(),
        starter: services.starter(),
    });
    let acme = match (&cfg.acme, &acme_inputs) {
        (Some(a), Some(inputs)) => Some(inputs.build(a, cfg.dns.nameservers.as_deref()).map_err(StartError::Acme)?),
        _ => None,
    };
    let acme_running = acme.as_ref().zip(acme_inputs.as_ref()).map(|(m, inputs)| inputs.starter.start(m.clone()));

    let proxy = EdgeProxy::new(routes.clone(), metrics.clone(), usage.clone(), access_log.clone(), proxy_options(&cfg.server))
        .with_tls(TlsFront {
            redirect_to: https.filter(|_| cfg.tls.redirect_http).map(|a| a.port()),
            // With TLS on, [acme] may be added by a reload: challenges are always looked at.
            challenges: (certs.is_some() || cert_fleet.is_some()).then(|| http01.clone()),
        })
        .with_releases(releases.clone(), Duration::from_millis(cfg.static_.wait_ms))
        // Live share-opened exchanges recheck their share when share records change.
        .with_table_changes(store.subscribe_to(Kind::ShareToken));
    // [wake]: previews of suspended sandboxes are held while the control plane starts them.
    let proxy = match &cfg.wake {
        Some(w) => proxy.with_waker(Arc::new(crate::upstream::wake::Waker::new(
            w,
            routes.clone(),
            store.subscribe_to(Kind::Sandbox),
            metrics.clone(),
        )?)),
        None => proxy,
    };
    // [storage]: public objects and the S3 endpoint.
    let proxy = match &cfg.storage {
        Some(s) => proxy.with_storage(Arc::new(crate::proxy::StorageFront::new(s).map_err(StartError::Storage)?)),
        None => proxy,
    };
    let live = proxy.live();
    // [cluster]: share-password attempts are counted fleet-wide.
    let proxy = match &cluster {
        Some(c) => proxy.with_shared_attempts(Arc::new(crate::cluster::counters::Attempts::new(c.clone()))),
        None => proxy,
    };
    // Hostile clients: the request-head deadline and body timeout in the proxy, the
    // per-IP connection cap around it (crate::hostile).
    let limits = crate::hostile::Limits::from_config(&cfg.server);
    let proxy = http_proxy(&server.configuration, proxy.with_limits(limits));
    // Both listeners accept plain TCP; crate::front admits each connection under the
    // per-IP cap and performs the TLS handshake on the https port itself, so handshakes
    // are timed, bounded and counted. The https port is only listened on with its TLS
    // side in place: never as plain HTTP.
    let handshake_timeout = Arc::new(AtomicU64::new(cfg.tls.handshake_timeout_ms));
    let tls = match (https, &certs) {
        (Some(addr), Some(watcher)) => Some(tls_listener(addr, watcher, handshake_timeout.clone())?),
        _ => None,
    };
    let https_listener = tls.as_ref().and(https);
    let front = crate::front::Front::new(proxy, limits.max_connections_per_ip, tls, metrics.clone());
    let per_ip = front.per_ip();
    let mut svc = Service::new("miosa-edge http".to_string(), front);
    listen_on(&server, &mut svc, http, http_socket)?;
    if let Some(addr) = https_listener {
        listen_on(&server, &mut svc, addr, https_socket)?;
    }
    server.add_service(svc);

    let token = resolve_token(&cfg.control.token_env, cfg.control.listen, &cfg.server.state_dir)?;
    let control_addr = control_listener.local_addr().map_err(|source| StartError::Bind { addr: cfg.control.listen, source })?;
    let control = ControlApi::new(
        store.clone(),
        metrics.clone(),
        usage,
        access_log,
        token,
        cfg.control.max_body_bytes,
        cfg.dns.nameservers.as_deref(),
        http,
    )
    .with_listener(control_listener);
    let max_body = control.max_body();
    let control_access_log = control.access_log();
    let verifier = control.verifier();
    let acme_slot = control.acme();
    let control = match &certs {
        Some(w) => control.with_certificates(w.clone(), acme),
        None => control,
    };
    let control = match &cluster {
        Some(c) => control.with_cluster(c.clone()),
        None => control,
    };
    let control = match fleet_usage {
        Some(f) => control.with_fleet_usage(f),
        None => control,
    };
    services.start(Arc::new(control));

    let interval = (cfg.server.watch_interval_ms > 0).then(|| Duration::from_millis(cfg.server.watch_interval_ms));
    let pieces = Pieces {
        routes: routes.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        https,
        live,
        releases,
        certs,
        cert_fleet,
        watch_interval,
        handshake_timeout,
        max_body,
        per_ip,
        verifier,
        access_log: AccessLogSlot { dropped: access_log_dropped, control: control_access_log, starter: services.starter() },
        acme: acme_inputs.map(|inputs| AcmeSlot { inputs, published: acme_slot, running: Arc::new(std::sync::Mutex::new(acme_running)) }),
    };
    let reloader = Reloader::new(cfg.clone(), store.clone(), metrics.clone()).with_apply(Arc::new(pieces));
    let reload = services.block_on(async { ReloadService::new(reloader, interval) }).map_err(StartError::Reload)?;
    services.start(Arc::new(reload));
    services.stop_with(server.watch_execution_phase());

    let source = cfg.source.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "embedded dev.toml".into());
    tracing::info!(http = %http, control = %control_addr, threads, config = %source, generation = store.generation(), "miosa-edge starting");
    // One machine-readable line on stdout: tests and scripts read the resolved ports. A
    // stdout closed by whoever started the edge is no reason to stop (println! would panic).
    let https_field = https.map(|a| format!(" https={a}")).unwrap_or_default();
    let _ = writeln!(std::io::stdout(), "miosa-edge listening http={http} control={control_addr}{https_field}");
    server.run(RunArgs::default());
    services.stop();
    Ok(())
}

/// The upstream timeouts of `[server]`.
fn proxy_options(s: &crate::config::Server) -> ProxyOptions {
    ProxyOptions { connect_timeout: Duration::from_millis(s.connect_timeout_ms), read_timeout: Duration::from_millis(s.read_timeout_ms) }
}

/// A session key kept in the state directory when none is configured, so sessions
/// survive restarts of this node (several nodes must share a configured key).
fn load_session_key(cfg: &mut Config) -> Result<(), StartError> {
    if cfg.keys.has_session_key() {
        return Ok(());
    }
    let path = cfg.server.state_dir.join("session.key");
    let (key, generated) = secret_file(&path)?;
    let what = if generated { "generated a session key into" } else { "using the session key in" };
    tracing::warn!(file = %path.display(), "${} is not set: {what} this file; set it on every edge node so sessions work across nodes", cfg.tokens.session_key_env);
    cfg.keys = Arc::new((*cfg.keys).clone().with_session_key(key.as_bytes()));
    Ok(())
}

/// How often the certificate store is read: `[tls] watch_interval_ms`, and in fleet mode
/// at most [`crate::cluster::certs::WATCH_AT_MOST`] (every node serves a certificate
/// within 10 s of its issuance, §11).
fn watch_interval_ms(cfg: &Config, fleet: bool) -> u64 {
    let ms = cfg.tls.watch_interval_ms;
    match fleet {
        true => ms.min(u64::try_from(crate::cluster::certs::WATCH_AT_MOST.as_millis()).unwrap_or(u64::MAX)),
        false => ms,
    }
}

/// The default certificate, and the certificates of `store`, loaded once.
fn certificates(cfg: &Config, metrics: &Arc<Metrics>, store: Arc<dyn CertStore>) -> Result<Arc<Watcher>, StartError> {
    let names = default_cert::names(cfg.domains.sandbox.as_str(), cfg.domains.apps.as_str(), cfg.domains.storage.as_str());
    let default = default_cert::load_or_generate(&cfg.server.state_dir, &names).map_err(StartError::Tls)?;
    let watcher = Arc::new(Watcher::new(store, Arc::new(default), metrics.clone()));
    watcher.scan();
    Ok(watcher)
}

/// `certs_dir` (in fleet mode, and the fleet's certificates in Redis, where ACME saves).
fn cert_store(cfg: &Config, fleet: Option<&Arc<CertFleet>>) -> Result<Arc<dyn CertStore>, StartError> {
    let dir = &cfg.tls.certs_dir;
    let dir_store = DirStore::open(dir).map_err(|e| StartError::Tls(format!("certs_dir {}: {e}", dir.display())))?;
    let store: Arc<dyn CertStore> = match fleet {
        Some(f) => {
            // A copy of the fleet's certificates, served by a node that starts while Redis
            // is away.
            let path = cfg.server.state_dir.join("fleet-certs");
            let copy = DirStore::open(&path)
                .map_err(|e| tracing::warn!(dir = %path.display(), error = %e, "no local copy of the fleet's certificates"))
                .ok();
            Arc::new(FleetStore::new(RedisCertStore::new(f.clone()), dir_store, copy))
        }
        None => Arc::new(dir_store),
    };
    Ok(store)
}

/// The TLS side of the https port: the SNI resolver over the watched index, ALPN h2.
fn tls_listener(
    addr: SocketAddr,
    watcher: &Arc<Watcher>,
    handshake_timeout_ms: Arc<AtomicU64>,
) -> Result<crate::front::TlsListener, StartError> {
    let config = tls_config(Arc::new(SniResolver::new(watcher.index()))).map_err(|e| StartError::Tls(e.to_string()))?;
    Ok(crate::front::TlsListener { port: addr.port(), acceptor: Acceptor::from_server_config(Arc::new(config)), handshake_timeout_ms })
}

/// The https listener's rustls configuration: TLS 1.2 and 1.3 with ring's cipher suites,
/// ALPN `h2` then `http/1.1`, certificates by SNI — and the suites chosen in the edge's
/// order, not the client's: AES-128-GCM first. Clients (OpenSSL's among them) list
/// AES-256-GCM-SHA384 first, whose SHA-384 transcript hash and key schedule ring computes
/// without the SHA extensions the CPU has for SHA-256 (10% of a full handshake's CPU by
/// perf); AES-128-GCM is TLS 1.3's mandatory suite and what Go's TLS (Caddy) prefers.
/// ChaCha20 stays last: every client this edge serves has AES instructions.
pub(crate) fn tls_config(resolver: Arc<dyn rustls::server::ResolvesServerCert>) -> Result<rustls::ServerConfig, rustls::Error> {
    use rustls::crypto::ring::{cipher_suite as cs, default_provider};
    // Other rustls users in the process (the ACME and store clients) take the default.
    let _ = default_provider().install_default();
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    Ok(config)
}

/// What a config reload replaces beside the routing state (see [`crate::reload`]):
/// the handles of the running pieces, and what building new ones takes.
struct Pieces {
    routes: crate::routing::SharedTable,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    /// The TLS listener's address (fixed at start); `None`: no TLS.
    https: Option<SocketAddr>,
    live: SharedLive,
    releases: Arc<Releases>,
    certs: Option<Arc<Watcher>>,
    cert_fleet: Option<Arc<CertFleet>>,
    watch_interval: Arc<AtomicU64>,
    handshake_timeout: Arc<AtomicU64>,
    max_body: Arc<AtomicU64>,
    /// `[server] max_connections_per_ip`.
    per_ip: Arc<crate::hostile::PerIp>,
    access_log: AccessLogSlot,
    /// The control API's domain verifier (`[dns] nameservers`).
    verifier: Arc<arc_swap::ArcSwapOption<crate::dns::Verifier>>,
    /// `None` without TLS (then `[acme]` has nothing to serve).
    acme: Option<AcmeSlot>,
}

/// Where a new access log (`[log] access`) goes: the proxy's [`Live`], and the control
/// API (which reports its dropped lines).
struct AccessLogSlot {
    /// One count of dropped lines across the logs that replace each other.
    dropped: Arc<AtomicU64>,
    control: Arc<arc_swap::ArcSwapOption<AccessLog>>,
    starter: crate::services::Starter,
}

/// What building an ACME service takes (all but `[acme]` and `[dns] nameservers`,
/// fixed at start).
struct AcmeInputs {
    state_dir: std::path::PathBuf,
    watcher: Arc<Watcher>,
    store: Arc<Store>,
    http01: Arc<crate::acme::Http01>,
    metrics: Arc<Metrics>,
    fleet: Option<Arc<CertFleet>>,
    starter: crate::services::Starter,
}

impl AcmeInputs {
    /// An ACME service for `cfg`, not started.
    fn build(&self, cfg: &crate::config::tls::Acme, nameservers: Option<&[SocketAddr]>) -> Result<Arc<crate::acme::Manager>, String> {
        crate::acme::Manager::new(
            cfg,
            &self.state_dir,
            nameservers,
            self.watcher.clone(),
            self.store.clone(),
            self.http01.clone(),
            self.metrics.clone(),
            self.fleet.clone(),
        )
    }
}

/// The ACME service in force, and how to replace it.
struct AcmeSlot {
    inputs: AcmeInputs,
    /// Read by the control API (`GET /v1/certificates`).
    published: Arc<arc_swap::ArcSwapOption<crate::acme::Manager>>,
    /// Stops the running service.
    running: Arc<std::sync::Mutex<Option<crate::services::Stop>>>,
}

fn issue(path: &str, message: impl std::fmt::Display) -> Vec<crate::config::ConfigIssue> {
    vec![crate::config::ConfigIssue { path: path.into(), message: message.to_string(), line: 0, column: 0 }]
}

impl Apply for Pieces {
    fn prepare(&self, old: &Config, new: &Config) -> Result<Commit, Vec<crate::config::ConfigIssue>> {
        // [wake]: a new waker; requests already held keep the one they wait on.
        let waker = match (&new.wake, new.wake == old.wake) {
            (_, true) => self.live.load().waker.clone(),
            (Some(w), false) => Some(Arc::new(
                crate::upstream::wake::Waker::new(w, self.routes.clone(), self.store.subscribe_to(Kind::Sandbox), self.metrics.clone())
                    .map_err(|e| issue("wake.url", e))?,
            )),
            (None, false) => None,
        };
        let live = Live {
            waker,
            redirect_to: self.https.filter(|_| new.tls.redirect_http).map(|a| a.port()),
            release_wait: Duration::from_millis(new.static_.wait_ms),
            opts: proxy_options(&new.server),
            limits: crate::hostile::Limits::from_config(&new.server),
            access_log: None,
            // [storage]: a new reader and endpoint, built (and resolved) now.
            storage: match new.storage == old.storage {
                true => self.live.load().storage.clone(),
                false => {
                    new.storage.as_ref().map(crate::proxy::StorageFront::new).transpose().map_err(|e| issue("storage", e))?.map(Arc::new)
                }
            },
        };
        // [log] access: the new target opened now (a file that cannot be opened refuses
        // the file), its writer started when committed. The old writer ends once the
        // requests still holding the old log are done.
        let (access_log, access_writer) = match new.log.access == old.log.access {
            true => (self.live.load().access_log.clone(), None),
            false => match new.log.access.as_str() {
                "off" => (None, None),
                target => {
                    let (log, writer) = AccessLog::open(target).map_err(|e| issue("log.access", format!("cannot open {target}: {e}")))?;
                    (Some(Arc::new(log.counting_on(self.access_log.dropped.clone()))), Some(Arc::new(writer)))
                }
            },
        };
        let live = Live { access_log: access_log.clone(), ..live };
        // [dns] nameservers: a new verifier for the control API.
        let verifier = match new.dns == old.dns {
            true => None,
            false => Some(crate::dns::Verifier::new(new.dns.nameservers.as_deref()).map_err(|e| issue("dns.nameservers", e))?),
        };
        let verifier_slot = self.verifier.clone();
        let (control_log, log_starter) = (self.access_log.control.clone(), self.access_log.starter.clone());
        // [static] store: opened now, so a bad one refuses the file.
        let release_store = match new.static_ != old.static_ {
            true => Some(crate::releases::store::open(&new.static_.store).map_err(|e| issue("static.store", e))?),
            false => None,
        };
        // [tls] certs_dir: opened now, read when committed.
        let cert_store = match (&self.certs, new.tls.certs_dir != old.tls.certs_dir) {
            (Some(_), true) => Some(cert_store(new, self.cert_fleet.as_ref()).map_err(|e| issue("tls.certs_dir", e))?),
            _ => None,
        };
        // [acme]: a new service, built now and started when committed; the old one's
        // loop stops, orders it has under way finish.
        // [dns] nameservers: a running ACME service is rebuilt to ask the new ones.
        let acme_changed = new.acme != old.acme || (new.acme.is_some() && new.dns != old.dns);
        let acme = match (&self.acme, acme_changed) {
            (Some(slot), true) => {
                let ns = new.dns.nameservers.as_deref();
                let built = new.acme.as_ref().map(|a| slot.inputs.build(a, ns).map_err(|e| issue("acme", e))).transpose()?;
                let built = match (built, slot.published.load_full()) {
                    (Some(m), Some(previous)) => Some(m.taking_over(&previous)),
                    (m, _) => m,
                };
                Some((slot, built))
            }
            _ => None,
        };
        let acme_commit = acme.map(|(slot, built)| {
            let (published, starter, running) = (slot.published.clone(), slot.inputs.starter.clone(), slot.running.clone());
            move || {
                let mut running = running.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(old) = running.take() {
                    old.stop();
                }
                *running = built.as_ref().map(|m| starter.start(m.clone()));
                published.store(built);
            }
        });
        let (live_slot, releases, certs) = (self.live.clone(), self.releases.clone(), self.certs.clone());
        let (watch, handshake, max_body) = (self.watch_interval.clone(), self.handshake_timeout.clone(), self.max_body.clone());
        let (static_, watch_ms) = (new.static_.clone(), watch_interval_ms(new, self.cert_fleet.is_some()));
        let (handshake_ms, max_body_bytes) = (new.tls.handshake_timeout_ms, new.control.max_body_bytes);
        let (per_ip, max_per_ip) = (self.per_ip.clone(), new.server.max_connections_per_ip);
        Ok(Box::new(move || {
            if let Some(writer) = access_writer {
                // Ends by itself once its last log handle is dropped.
                drop(log_starter.start(writer));
            }
            live_slot.store(Arc::new(live));
            control_log.store(access_log);
            if let Some(v) = verifier {
                verifier_slot.store(Some(Arc::new(v)));
            }
            if let Some(store) = release_store {
                releases.reconfigure(&static_, store);
            }
            if let (Some(w), Some(store)) = (certs, cert_store) {
                w.replace_store(store);
            }
            watch.store(watch_ms, Ordering::Relaxed);
            handshake.store(handshake_ms, Ordering::Relaxed);
            max_body.store(max_body_bytes, Ordering::Relaxed);
            per_ip.max.store(max_per_ip, Ordering::Relaxed);
            if let Some(commit) = acme_commit {
                commit();
            }
        }))
    }
}
