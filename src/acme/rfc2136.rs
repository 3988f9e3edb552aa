//! RFC 2136 dynamic DNS updates signed with TSIG (RFC 8945), for DNS-01.
//!
//! Every exchange is one signed message over TCP (two-byte length prefix) to the
//! configured primary, bounded by `EXCHANGE_TIMEOUT` (10 s). An answer counts only with the
//! server's valid TSIG on it; an error answer (NOTAUTH for a bad key or signature, which
//! servers send unsigned) fails the call with its rcode named. Without a configured
//! zone, the zone of a name is the owner of the SOA the server gives for it (walking up
//! its labels), remembered per name.

use super::dns01::{tcp_exchange, Dns01Solver};
use crate::config::tls::Dns01;
use async_trait::async_trait;
use base64::Engine as _;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode, UpdateMessage};
use hickory_proto::rr::rdata::tsig::{TsigAlgorithm, TsigError};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType, TSigVerifier, TSigner};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Bound on one exchange (connect, send, answer).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// TTL of the TXT records written.
const TTL: u32 = 60;
/// Accepted clock difference between the edge and the server, both ways (RFC 8945's
/// recommended 300 s).
const FUDGE: u16 = 300;
/// Longest TXT value: one character-string.
const MAX_VALUE: usize = 255;

/// Writes TXT records by dynamic update to the zone's primary.
pub struct Rfc2136 {
    server: SocketAddr,
    /// The configured zone; `None` = discovered per name.
    zone: Option<Name>,
    signer: TSigner,
    /// Discovered zones by record name (lowercase).
    zones: Mutex<HashMap<Name, Name>>,
}

impl std::fmt::Debug for Rfc2136 {
    // never the key
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rfc2136")
            .field("server", &self.server)
            .field("zone", &self.zone)
            .field("tsig_key_name", self.signer.signer_name())
            .field("tsig_algorithm", self.signer.algorithm())
            .finish_non_exhaustive()
    }
}

impl Rfc2136 {
    /// Builds the provider from `[acme.dns01]`, reading the TSIG secret from the
    /// environment variable `tsig_secret_env` names.
    pub fn from_config(cfg: &Dns01) -> Result<Rfc2136, String> {
        let var = cfg.tsig_secret_env.as_deref().ok_or("rfc2136: acme.dns01.tsig_secret_env is required")?;
        let secret = match std::env::var(var) {
            Ok(s) => s,
            Err(std::env::VarError::NotPresent) => {
                return Err(format!("rfc2136: environment variable {var} (acme.dns01.tsig_secret_env) is not set"))
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!("rfc2136: environment variable {var} (acme.dns01.tsig_secret_env) is not base64"))
            }
        };
        Rfc2136::new(cfg, &secret)
    }

    /// [`Rfc2136::from_config`] with the base64 secret given.
    fn new(cfg: &Dns01, secret_b64: &str) -> Result<Rfc2136, String> {
        let var = cfg.tsig_secret_env.as_deref().unwrap_or("the TSIG secret");
        let server = cfg.server.ok_or("rfc2136: acme.dns01.server is required")?;
        let key_name = cfg.tsig_key_name.as_deref().filter(|k| !k.is_empty()).ok_or("rfc2136: acme.dns01.tsig_key_name is required")?;
        let key_name = fqdn(key_name).map_err(|e| format!("rfc2136: acme.dns01.tsig_key_name: {e}"))?;
        let algorithm = match cfg.tsig_algorithm.as_str() {
            "hmac-sha256" => TsigAlgorithm::HmacSha256,
            "hmac-sha384" => TsigAlgorithm::HmacSha384,
            "hmac-sha512" => TsigAlgorithm::HmacSha512,
            other => return Err(format!("rfc2136: acme.dns01.tsig_algorithm {other:?}: must be hmac-sha256, hmac-sha384 or hmac-sha512")),
        };
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret_b64.trim())
            .map_err(|e| format!("rfc2136: {var} (acme.dns01.tsig_secret_env) is not base64: {e}"))?;
        if key.is_empty() {
            return Err(format!("rfc2136: {var} (acme.dns01.tsig_secret_env) is empty"));
        }
        let signer = TSigner::new(key, algorithm, key_name, FUDGE).map_err(|e| format!("rfc2136: TSIG key: {e}"))?;
        let zone = match cfg.zone.as_deref() {
            Some(z) => Some(fqdn(z).map_err(|e| format!("rfc2136: acme.dns01.zone: {e}"))?),
            None => None,
        };
        Ok(Rfc2136 { server, zone, signer, zones: Mutex::new(HashMap::new()) })
    }

    /// Sends one update of `record` (at `fqdn`) to its zone.
    async fn update(&self, fqdn: &str, record: impl FnOnce(Name) -> Record) -> Result<(), String> {
        let name = self::fqdn(fqdn).map_err(|e| format!("rfc2136: {fqdn:?}: {e}"))?;
        let zone = self.zone_of(&name).await?;
        let mut msg = Message::query();
        msg.metadata.op_code = OpCode::Update;
        msg.metadata.recursion_desired = false;
        msg.add_zone(Query::query(zone, RecordType::SOA));
        msg.add_update(record(name));
        let answer = self.exchange(msg).await.map_err(|e| e.text(&format!("update of {fqdn}")))?;
        match answer.metadata.response_code {
            ResponseCode::NoError => Ok(()),
            code => Err(Failure::Refused(rcode_name(code)).text(&format!("update of {fqdn}"))),
        }
    }

    /// The zone holding `name`: the configured one, or the owner of the SOA the server
    /// gives for `name` or, failing that, its parents.
    async fn zone_of(&self, name: &Name) -> Result<Name, String> {
        if let Some(zone) = &self.zone {
            return if zone.zone_of(name) { Ok(zone.clone()) } else { Err(format!("rfc2136: {name} is not in zone {zone}")) };
        }
        let key = name.to_lowercase();
        if let Some(zone) = self.zones.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(zone.clone());
        }
        let mut candidate = name.clone();
        while !candidate.is_root() {
            let mut msg = Message::query();
            msg.metadata.recursion_desired = false;
            msg.add_query(Query::query(candidate.clone(), RecordType::SOA));
            let what = format!("SOA query for {candidate}");
            let answer = self.exchange(msg).await.map_err(|e| e.text(&what))?;
            if matches!(answer.metadata.response_code, ResponseCode::NoError | ResponseCode::NXDomain) {
                // the SOA itself, or (below the apex) the one in the authority section
                let soa =
                    answer.answers.iter().chain(&answer.authorities).find(|r| r.record_type() == RecordType::SOA && r.name.zone_of(name));
                if let Some(soa) = soa {
                    let zone = soa.name.to_lowercase();
                    self.zones.lock().unwrap_or_else(|e| e.into_inner()).insert(key, zone.clone());
                    return Ok(zone);
                }
            }
            candidate = candidate.base_name();
        }
        Err(format!("rfc2136: {} has no zone holding {name} (no SOA for it or its parents)", self.server))
    }

    /// Signs `msg`, sends it and returns the answer once its TSIG checks out (whatever
    /// its rcode).
    async fn exchange(&self, mut msg: Message) -> Result<Message, Failure> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|_| Failure::Other("the clock is before 1970".into()))?.as_secs();
        let verifier = msg.finalize(&self.signer, now).map_err(|e| Failure::Other(format!("signing: {e}")))?;
        let request = msg.to_vec().map_err(|e| Failure::Other(format!("encoding: {e}")))?;
        let bytes = match tokio::time::timeout(EXCHANGE_TIMEOUT, tcp_exchange(self.server, &request)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(Failure::Other(format!("{}: {e}", self.server))),
            Err(_) => return Err(Failure::Other(format!("{}: no answer within {EXCHANGE_TIMEOUT:?}", self.server))),
        };
        let answer = Message::from_vec(&bytes).map_err(|e| Failure::Other(format!("{}: malformed answer: {e}", self.server)))?;
        if answer.metadata.id != msg.metadata.id
            || answer.metadata.message_type != MessageType::Response
            || answer.metadata.op_code != msg.metadata.op_code
        {
            return Err(Failure::Other(format!("{}: answer does not match the request", self.server)));
        }
        let rcode = answer.metadata.response_code;
        let Some(tsig) = answer.signature() else {
            return Err(match rcode {
                ResponseCode::NoError => Failure::Other(format!("{}: answer is not signed", self.server)),
                code => Failure::Refused(rcode_name(code)),
            });
        };
        // BADSIG, BADKEY and BADTIME answers are unsigned (RFC 8945 5.3.2)
        if let Some(e) = tsig.data.error {
            return Err(Failure::Refused(format!("{} (TSIG {})", rcode_name(rcode), tsig_error_name(e))));
        }
        // hickory computes time - fudge unchecked
        if tsig.data.time < u64::from(tsig.data.fudge) {
            return Err(Failure::Other(format!("{}: answer's TSIG time is out of range", self.server)));
        }
        let mut verifier: TSigVerifier = verifier.ok_or_else(|| Failure::Other("signing gave no verifier".into()))?;
        verifier.verify(&bytes).map_err(|e| Failure::Other(format!("{}: answer's TSIG does not verify: {e}", self.server)))?;
        Ok(answer)
    }
}

#[async_trait]
impl Dns01Solver for Rfc2136 {
    async fn set_txt(&self, fqdn: &str, value: &str) -> Result<(), String> {
        let txt = txt(fqdn, value)?;
        self.update(fqdn, |name| Record::from_rdata(name, TTL, txt)).await
    }

    async fn clear_txt(&self, fqdn: &str, value: &str) -> Result<(), String> {
        let txt = txt(fqdn, value)?;
        self.update(fqdn, |name| {
            // RFC 2136 2.5.4: this RR, class NONE, TTL 0
            let mut r = Record::from_rdata(name, 0, txt);
            r.dns_class = DNSClass::NONE;
            r
        })
        .await
    }
}

/// Why an exchange failed: an error answer (its rcode), or anything else.
enum Failure {
    Refused(String),
    Other(String),
}

impl Failure {
    fn text(&self, what: &str) -> String {
        match self {
            Failure::Refused(rcode) => format!("rfc2136: {what} refused: {rcode}"),
            Failure::Other(e) => format!("rfc2136: {what}: {e}"),
        }
    }
}

/// `value` as the rdata of one TXT record.
fn txt(fqdn: &str, value: &str) -> Result<RData, String> {
    if value.len() > MAX_VALUE {
        return Err(format!("rfc2136: TXT value for {fqdn} is longer than {MAX_VALUE} bytes"));
    }
    Ok(RData::TXT(TXT::new(vec![value.to_owned()])))
}

/// `s` as a fully qualified name (the trailing dot optional).
fn fqdn(s: &str) -> Result<Name, String> {
    let mut name = Name::from_ascii(s).map_err(|e| format!("not a domain name: {e}"))?;
    name.set_fqdn(true);
    Ok(name)
}

/// The mnemonic of `code` (RFC 6895), e.g. `NOTAUTH`.
fn rcode_name(code: ResponseCode) -> String {
    let name = match u16::from(code) {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        16 => "BADVERS",
        n => return format!("RCODE {n}"),
    };
    name.into()
}

/// The mnemonic of a TSIG error, e.g. `BADSIG`.
fn tsig_error_name(e: TsigError) -> String {
    match e {
        TsigError::BadSig => "BADSIG".into(),
        TsigError::BadKey => "BADKEY".into(),
        TsigError::BadTime => "BADTIME".into(),
        TsigError::BadTrunc => "BADTRUNC".into(),
        TsigError::Unknown(n) => format!("error {n}"),
    }
}

#[cfg(test)]
mod tests {
    //! Against a real BIND `named` on loopback, with its own config, key and zone.

    use super::*;
    use crate::config::tls::Dns01Provider;
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use hickory_resolver::TokioResolver;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const NAMED: &str = "/usr/sbin/named";
    const KEY_NAME: &str = "edge-key";
    const SECRET: &str = "c2VjcmV0LWZvci10aGUtZWRnZS10c2lnLWtleS0zMmI=";
    const WRONG_SECRET: &str = "d3Jvbmctc2VjcmV0LWZvci10aGUtZWRnZS10c2lnLWs=";

    /// A `named` serving `example.test` (updates allowed with `edge-key`) on a free
    /// loopback port, in its own directory; killed on drop.
    struct Named {
        addr: SocketAddr,
        child: Child,
        dir: tempfile::TempDir,
    }

    impl Drop for Named {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Named {
        async fn start() -> Named {
            assert!(Path::new(NAMED).exists(), "{NAMED} is missing: run scripts/deps (installs bind9)");
            let dir = tempfile::tempdir().expect("tempdir");
            let d = dir.path().display().to_string();
            let port = free_port();
            std::fs::write(
                dir.path().join("example.test.db"),
                "$TTL 60\n\
                 @ IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 60\n\
                 @ IN NS ns.example.test.\n\
                 ns IN A 127.0.0.1\n",
            )
            .expect("zone file");
            let conf = format!(
                r#"options {{
    directory "{d}";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    pid-file "{d}/named.pid";
    session-keyfile "{d}/session.key";
    managed-keys-directory "{d}";
    recursion no;
    dnssec-validation no;
}};
controls {{ }};
key "{KEY_NAME}" {{ algorithm hmac-sha256; secret "{SECRET}"; }};
zone "example.test" {{
    type primary;
    file "{d}/example.test.db";
    journal "{d}/example.test.jnl";
    allow-update {{ key "{KEY_NAME}"; }};
}};
"#
            );
            let conf_path = dir.path().join("named.conf");
            std::fs::write(&conf_path, conf).expect("named.conf");
            let log = std::fs::File::create(dir.path().join("named.log")).expect("named.log");
            let child = Command::new(NAMED)
                .args(["-g", "-4", "-c"])
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn named");
            let mut named = Named { addr: SocketAddr::from(([127, 0, 0, 1], port)), child, dir };
            let deadline = Instant::now() + Duration::from_secs(20);
            let resolver = resolver(named.addr);
            loop {
                if resolver.lookup("example.test.", RecordType::SOA).await.is_ok() {
                    return named;
                }
                if let Ok(Some(status)) = named.child.try_wait() {
                    panic!("named exited ({status}):\n{}", named.log());
                }
                assert!(Instant::now() < deadline, "named did not answer within 20 s:\n{}", named.log());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        fn log(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("named.log")).unwrap_or_default()
        }

        fn config(&self, zone: Option<&str>) -> Dns01 {
            Dns01 {
                provider: Dns01Provider::Rfc2136,
                url: None,
                server: Some(self.addr),
                zone: zone.map(str::to_owned),
                tsig_key_name: Some(KEY_NAME.into()),
                tsig_algorithm: "hmac-sha256".into(),
                tsig_secret_env: Some("EDGE_TEST_TSIG_SECRET".into()),
            }
        }

        /// The TXT values at `name`, asked of named directly (sorted; none = empty).
        async fn txt(&self, name: &str) -> Vec<String> {
            match resolver(self.addr).lookup(name, RecordType::TXT).await {
                Ok(lookup) => {
                    let mut values: Vec<String> = lookup
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::TXT(t) => Some(t.txt_data.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect()),
                            _ => None,
                        })
                        .collect();
                    values.sort();
                    values
                }
                Err(e) if e.is_no_records_found() => Vec::new(),
                Err(e) => panic!("TXT {name}: {e}\n{}", self.log()),
            }
        }
    }

    /// A port free on 127.0.0.1 for both TCP and UDP, for named to bind. Taken below the
    /// kernel's ephemeral range where it can be: a port from that range, checked and closed
    /// again, can be handed to any connection made before named binds it. The span sits
    /// below the one `tests/edge/support.rs` `free_port` uses (the two test binaries run
    /// one after the other anyway).
    fn free_port() -> u16 {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        const SPAN: u32 = 2048;
        const BELOW: u32 = 8192;
        let free =
            |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(0);
        if low >= BELOW + SPAN + 10_000 {
            let start = std::process::id().wrapping_mul(7919) % SPAN;
            for _ in 0..SPAN {
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let port = (low - BELOW - SPAN + (start + n) % SPAN) as u16;
                if free(port) {
                    return port;
                }
            }
        }
        loop {
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
            let port = tcp.local_addr().expect("addr").port();
            drop(tcp);
            if free(port) {
                return port;
            }
        }
    }

    /// An uncached resolver asking only `ns`.
    fn resolver(ns: SocketAddr) -> TokioResolver {
        let mut udp = ConnectionConfig::udp();
        udp.port = ns.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = ns.port();
        let servers = vec![NameServerConfig::new(ns.ip(), true, vec![udp, tcp])];
        let mut builder = TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), TokioRuntimeProvider::default());
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 1;
        opts.cache_size = 0;
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
        opts.use_hosts_file = ResolveHosts::Never;
        builder.build().expect("resolver")
    }

    #[tokio::test]
    async fn set_adds_values_and_clear_removes_only_its_own() {
        let named = Named::start().await;
        let dns = Rfc2136::new(&named.config(Some("example.test")), SECRET).expect("provider");
        let name = "_acme-challenge.www.example.test.";

        dns.set_txt(name, "first-value").await.expect("set first");
        assert_eq!(named.txt(name).await, ["first-value"]);
        dns.set_txt(name, "second-value").await.expect("set second");
        assert_eq!(named.txt(name).await, ["first-value", "second-value"]);
        dns.clear_txt(name, "first-value").await.expect("clear first");
        assert_eq!(named.txt(name).await, ["second-value"]);
        dns.clear_txt(name, "second-value").await.expect("clear second");
        assert_eq!(named.txt(name).await, Vec::<String>::new());

        let err = dns.set_txt("_acme-challenge.example.org.", "v").await.expect_err("outside the zone");
        assert!(err.contains("is not in zone example.test."), "{err}");
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_and_writes_nothing() {
        let named = Named::start().await;
        let name = "_acme-challenge.example.test.";
        let dns = Rfc2136::new(&named.config(Some("example.test.")), WRONG_SECRET).expect("provider");
        let err = dns.set_txt(name, "forged").await.expect_err("a wrong key must be refused");
        assert_eq!(err, "rfc2136: update of _acme-challenge.example.test. refused: NOTAUTH (TSIG BADSIG)");
        assert_eq!(named.txt(name).await, Vec::<String>::new());

        // and an unknown key name
        let mut cfg = named.config(Some("example.test."));
        cfg.tsig_key_name = Some("other-key".into());
        let err = Rfc2136::new(&cfg, SECRET).expect("provider").set_txt(name, "forged").await.expect_err("unknown key");
        assert_eq!(err, "rfc2136: update of _acme-challenge.example.test. refused: NOTAUTH (TSIG BADKEY)");
        assert_eq!(named.txt(name).await, Vec::<String>::new());
    }

    #[tokio::test]
    async fn zone_is_found_by_soa_when_not_configured() {
        let named = Named::start().await;
        let dns = Rfc2136::new(&named.config(None), SECRET).expect("provider");
        let name = "_acme-challenge.deep.sub.example.test.";

        dns.set_txt(name, "found").await.expect("set with a discovered zone");
        assert_eq!(named.txt(name).await, ["found"]);
        let cached = dns.zones.lock().expect("zones").get(&fqdn(name).expect("name")).cloned();
        assert_eq!(cached, Some(fqdn("example.test.").expect("zone")));
        dns.clear_txt(name, "found").await.expect("clear with the cached zone");
        assert_eq!(named.txt(name).await, Vec::<String>::new());

        let err = dns.set_txt("_acme-challenge.example.org.", "v").await.expect_err("no zone");
        assert!(err.contains("has no zone holding _acme-challenge.example.org."), "{err}");
    }

    /// A TCP relay to `named` that passes each answer through `tamper`.
    async fn relay(named: SocketAddr, tamper: fn(Vec<u8>) -> Vec<u8>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut len = [0u8; 2];
                if client.read_exact(&mut len).await.is_err() {
                    continue;
                }
                let mut request = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if client.read_exact(&mut request).await.is_err() {
                    continue;
                }
                let Ok(answer) = tcp_exchange(named, &request).await else { continue };
                let answer = tamper(answer);
                let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&answer);
                let _ = client.write_all(&framed).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn answers_count_only_with_a_valid_tsig() {
        let named = Named::start().await;
        let name = "_acme-challenge.relay.example.test.";
        let mut cfg = named.config(Some("example.test"));

        // named's signed answer with one header bit (AA) flipped: the MAC no longer matches
        cfg.server = Some(
            relay(named.addr, |mut a| {
                a[2] ^= 0x04;
                a
            })
            .await,
        );
        let err = Rfc2136::new(&cfg, SECRET).expect("provider").set_txt(name, "v").await.expect_err("tampered answer");
        assert!(
            err.starts_with("rfc2136: update of _acme-challenge.relay.example.test.: ") && err.contains("TSIG does not verify"),
            "{err}"
        );

        // named's answer with its TSIG removed
        cfg.server = Some(
            relay(named.addr, |a| {
                let mut m = Message::from_vec(&a).expect("answer");
                m.take_signature();
                m.to_vec().expect("encode")
            })
            .await,
        );
        let err = Rfc2136::new(&cfg, SECRET).expect("provider").set_txt(name, "v").await.expect_err("unsigned answer");
        assert!(err.ends_with(": answer is not signed"), "{err}");

        // untouched, the same relay path works
        cfg.server = Some(relay(named.addr, |a| a).await);
        Rfc2136::new(&cfg, SECRET).expect("provider").clear_txt(name, "v").await.expect("relayed answer");
    }

    #[test]
    fn config_errors_are_clear() {
        let mut cfg = Dns01 {
            provider: Dns01Provider::Rfc2136,
            url: None,
            server: Some(SocketAddr::from(([127, 0, 0, 1], 53))),
            zone: None,
            tsig_key_name: Some(KEY_NAME.into()),
            tsig_algorithm: "hmac-sha256".into(),
            tsig_secret_env: Some("EDGE_TEST_TSIG_SECRET_NEVER_SET".into()),
        };
        let err = Rfc2136::from_config(&cfg).expect_err("unset variable");
        assert!(err.contains("EDGE_TEST_TSIG_SECRET_NEVER_SET") && err.contains("is not set"), "{err}");
        let err = Rfc2136::new(&cfg, "not base64!").expect_err("not base64");
        assert!(err.contains("EDGE_TEST_TSIG_SECRET_NEVER_SET") && err.contains("is not base64"), "{err}");
        cfg.tsig_algorithm = "hmac-md5".into();
        assert!(Rfc2136::new(&cfg, SECRET).expect_err("md5").contains("tsig_algorithm"));
    }
}
