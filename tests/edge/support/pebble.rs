//! TLS test support: certificates made with rcgen by a test CA, a TLS client that
//! reports what the edge served (leaf, ALPN, version), and Pebble (an RFC 8555 test CA)
//! with pebble-challtestsrv as its DNS server and the edge's DNS-01 webhook.

use super::{eventually, free_port, parse_response, raw_request, Edge, Response};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ProtocolVersion, RootCertStore, SignatureScheme, SupportedProtocolVersion};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn random_serial() -> SerialNumber {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut b).expect("random");
    b[0] &= 0x7f; // positive
    b[0] |= 0x10; // no leading zero byte, so the DER keeps all 16 bytes
    SerialNumber::from_slice(&b)
}

// ---------------------------------------------------------------------------------
// Certificates

/// A test certificate authority (rcgen).
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
    pub der: CertificateDer<'static>,
}

/// A certificate and its key, PEM, as a certs_dir entry holds them.
#[derive(Clone)]
pub struct Leaf {
    /// `fullchain.pem`: the leaf (the test CA is a root, so there is no intermediate).
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    /// Serial as x509-parser prints it (`aa:bb:…`), comparable with [`CertInfo::serial`].
    pub serial: String,
}

impl TestCa {
    pub fn new(common_name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(365);
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("self-sign ca");
        TestCa { issuer: Issuer::new(params, key), pem: cert.pem(), der: cert.der().clone() }
    }

    /// Trust roots holding only this CA.
    pub fn roots(&self) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(self.der.clone()).expect("add root");
        r
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid from an hour
    /// ago for 90 days.
    pub fn issue(&self, names: &[&str]) -> Leaf {
        let now = time::OffsetDateTime::now_utc();
        self.issue_valid(names, now - time::Duration::hours(1), now + time::Duration::days(90))
    }

    /// A server certificate for `names` with the given validity.
    pub fn issue_valid(&self, names: &[&str], not_before: time::OffsetDateTime, not_after: time::OffsetDateTime) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        self.issue_for_key(names, not_before, not_after, &key, &key)
    }

    /// A certificate whose public key is `cert_key`'s, shipped with `shipped_key` as its
    /// private key (a mismatched pair when the two differ).
    pub fn issue_for_key(
        &self,
        names: &[&str],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
        cert_key: &KeyPair,
        shipped_key: &KeyPair,
    ) -> Leaf {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("leaf params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(cert_key, &self.issuer).expect("sign leaf");
        let der = cert.der().clone();
        let serial = cert_info(&der).serial;
        Leaf { cert_pem: cert.pem(), key_pem: shipped_key.serialize_pem(), der, serial }
    }
}

/// Installs `leaf` as `certs_dir/entry/{fullchain,privkey}.pem`. A new entry appears at
/// once (staged next to `certs_dir`, then renamed into it); an existing one has its two
/// files replaced by rename, key first.
pub fn install_pair(certs_dir: &Path, entry: &str, leaf: &Leaf) {
    let staging_root = certs_dir.with_extension("staging");
    std::fs::create_dir_all(&staging_root).expect("staging dir");
    let stage = tempfile::tempdir_in(&staging_root).expect("stage");
    std::fs::write(stage.path().join("fullchain.pem"), &leaf.cert_pem).expect("write fullchain");
    std::fs::write(stage.path().join("privkey.pem"), &leaf.key_pem).expect("write privkey");
    let target = certs_dir.join(entry);
    if target.exists() {
        std::fs::rename(stage.path().join("privkey.pem"), target.join("privkey.pem")).expect("replace privkey");
        std::fs::rename(stage.path().join("fullchain.pem"), target.join("fullchain.pem")).expect("replace fullchain");
    } else {
        let dir = stage.keep();
        std::fs::rename(&dir, &target).expect("move entry into certs_dir");
    }
}

/// The `[tls]` section over `certs_dir` (absolute), rescanned every 100 ms.
pub fn tls_toml(certs_dir: &Path, redirect_http: bool) -> String {
    format!("[tls]\ncerts_dir = {:?}\nredirect_http = {redirect_http}\nwatch_interval_ms = 100\n\n", certs_dir.display().to_string())
}

/// An empty certs directory `certs` inside a tempdir (so staged files live beside it).
pub fn certs_dir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().expect("tempdir");
    let d = t.path().join("certs");
    std::fs::create_dir_all(&d).expect("certs dir");
    (t, d)
}

/// The subject CN of the edge's generated default certificate.
pub const DEFAULT_CN: &str = "miosa-edge default certificate";

pub fn is_default(c: &CertInfo) -> bool {
    c.subject_cn == DEFAULT_CN
}

/// What a test wants to know about a served certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// subjectAltName DNS names.
    pub names: Vec<String>,
    pub subject_cn: String,
    pub issuer_cn: String,
    /// `aa:bb:…`
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
}

pub fn cert_info(der: &[u8]) -> CertInfo {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap_or_else(|e| panic!("served certificate does not parse: {e}"));
    let cn = |n: &x509_parser::x509::X509Name| {
        n.iter_common_name().next().and_then(|a| a.as_str().ok()).map(str::to_string).unwrap_or_else(|| n.to_string())
    };
    let names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    CertInfo {
        names,
        subject_cn: cn(cert.subject()),
        issuer_cn: cn(cert.issuer()),
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    }
}

/// The first certificate of a PEM file's text.
pub fn pem_cert(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap_or_else(|e| panic!("no certificate in PEM ({e:?}): {pem}"))
}

// ---------------------------------------------------------------------------------
// TLS client

/// Rustls verifier that accepts any certificate (the handshake signature is still
/// checked), so a test can look at what the edge served.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How a test client connects.
#[derive(Clone, Default)]
pub struct TlsOpts {
    /// Server name sent (and verified); `None` sends no SNI.
    pub sni: Option<String>,
    /// `None`: accept any certificate; `Some`: full verification against these roots.
    pub roots: Option<RootCertStore>,
    /// ALPN protocols offered, in preference order.
    pub alpn: Vec<Vec<u8>>,
    /// Protocol versions offered; empty = TLS 1.2 and 1.3.
    pub versions: Vec<&'static SupportedProtocolVersion>,
}

impl TlsOpts {
    pub fn sni(name: &str) -> TlsOpts {
        TlsOpts { sni: Some(name.to_string()), ..TlsOpts::default() }
    }
    pub fn verified(name: &str, roots: RootCertStore) -> TlsOpts {
        TlsOpts { sni: Some(name.to_string()), roots: Some(roots), ..TlsOpts::default() }
    }
}

/// What the handshake produced.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// The peer's leaf certificate, DER.
    pub leaf: Vec<u8>,
    /// Every certificate the peer sent.
    pub chain_len: usize,
    pub alpn: Option<Vec<u8>>,
    pub version: Option<ProtocolVersion>,
    /// The cipher suite the server chose.
    pub suite: Option<rustls::CipherSuite>,
}

impl TlsInfo {
    pub fn cert(&self) -> CertInfo {
        cert_info(&self.leaf)
    }
}

/// Connects and completes a TLS handshake (10 s bound); `Err` carries the reason
/// (refused, handshake alert, verification failure).
pub async fn tls_connect(addr: SocketAddr, opts: &TlsOpts) -> Result<(TlsStream<TcpStream>, TlsInfo), String> {
    let provider = provider();
    let versions: &[&'static SupportedProtocolVersion] = if opts.versions.is_empty() { rustls::ALL_VERSIONS } else { &opts.versions };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| format!("client config: {e}"))?;
    let mut cfg = match &opts.roots {
        Some(roots) => builder.with_root_certificates(roots.clone()).with_no_client_auth(),
        None => builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAny(provider))).with_no_client_auth(),
    };
    cfg.alpn_protocols = opts.alpn.clone();
    cfg.enable_sni = opts.sni.is_some();
    let name = ServerName::try_from(opts.sni.clone().unwrap_or_else(|| "localhost".into())).map_err(|e| format!("server name: {e}"))?;
    let connector = TlsConnector::from(Arc::new(cfg));
    let fut = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        connector.connect(name, tcp).await.map_err(|e| format!("TLS handshake with {addr} (sni {:?}): {e}", opts.sni))
    };
    let stream = tokio::time::timeout(Duration::from_secs(10), fut).await.map_err(|_| format!("TLS handshake with {addr} timed out"))??;
    let (_, conn) = stream.get_ref();
    let chain = conn.peer_certificates().unwrap_or_default();
    let info = TlsInfo {
        leaf: chain.first().map(|c| c.to_vec()).unwrap_or_default(),
        chain_len: chain.len(),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        version: conn.protocol_version(),
        suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
    };
    Ok((stream, info))
}

/// The certificate served for `sni` (`None` = no SNI), accepting any.
pub async fn served_cert(addr: SocketAddr, sni: Option<&str>) -> Result<CertInfo, String> {
    let opts = TlsOpts { sni: sni.map(str::to_string), ..TlsOpts::default() };
    tls_connect(addr, &opts).await.map(|(_, info)| info.cert())
}

/// Reads until the peer closes (a missing close_notify counts as the end), 15 s bound.
pub async fn read_all<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    let fut = async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) => return Ok(()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), fut).await.map_err(|_| "response timed out".to_string())??;
    Ok(buf)
}

/// A response over TLS and the handshake it came through.
#[derive(Debug, Clone)]
pub struct TlsResponse {
    pub response: Response,
    pub info: TlsInfo,
}

/// `GET path` with `Host: host_header` over TLS (HTTP/1.1, `Connection: close`).
/// `roots: None` accepts any certificate; `alpn` is offered as given (an `h2` answer is
/// an error: this client speaks HTTP/1.1 only).
pub async fn tls_get(
    addr: SocketAddr,
    sni: Option<&str>,
    host_header: &str,
    path: &str,
    roots: Option<RootCertStore>,
    alpn: &[&str],
) -> Result<TlsResponse, String> {
    let opts =
        TlsOpts { sni: sni.map(str::to_string), roots, alpn: alpn.iter().map(|a| a.as_bytes().to_vec()).collect(), versions: Vec::new() };
    tls_get_opts(addr, &opts, host_header, path).await
}

/// [`tls_get`] with full client options.
pub async fn tls_get_opts(addr: SocketAddr, opts: &TlsOpts, host_header: &str, path: &str) -> Result<TlsResponse, String> {
    let (mut s, info) = tls_connect(addr, opts).await?;
    if info.alpn.as_deref() == Some(b"h2") {
        return Err("h2 was negotiated; tls_get speaks HTTP/1.1".into());
    }
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host_header}\r\nAccept: application/json\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let buf = read_all(&mut s).await?;
    if !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        return Err(format!("no complete response head: {:?}", String::from_utf8_lossy(&buf)));
    }
    Ok(TlsResponse { response: parse_response(&buf), info })
}

// ---------------------------------------------------------------------------------
// Pebble

/// How Pebble runs.
#[derive(Clone, Copy, Debug)]
pub struct PebbleOpts {
    /// The port Pebble's HTTP-01 validation connects to: the edge's plain listener
    /// (reserve it with [`free_port`] and start the edge on it).
    pub http_port: u16,
    /// `certificateValidityPeriod` (seconds); `None` = Pebble's default (years).
    pub validity_secs: Option<u64>,
}

/// Pebble and pebble-challtestsrv on free loopback ports, killed on drop.
pub struct Pebble {
    pub dir: tempfile::TempDir,
    pebble: Child,
    challtestsrv: Child,
    /// Pebble's ACME listener (HTTPS, certificate by [`Pebble::ca`] for localhost and
    /// 127.0.0.1).
    pub listen: SocketAddr,
    /// Pebble's management listener (HTTPS): `/roots/0`.
    pub management: SocketAddr,
    /// challtestsrv's DNS server (UDP and TCP).
    pub dns: SocketAddr,
    /// challtestsrv's management API (plain HTTP): set-txt, add-a, set-cname…
    pub challtestsrv_api: SocketAddr,
    /// The CA of Pebble's own HTTPS certificate.
    pub ca: TestCa,
    /// `ca.pem` on disk (the edge's `[acme] ca_bundle`).
    pub ca_bundle: PathBuf,
    /// The root Pebble issues under (fetched from `/roots/0`).
    pub root: CertificateDer<'static>,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in [&mut self.pebble, &mut self.challtestsrv] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

impl Pebble {
    pub async fn start(opts: PebbleOpts) -> Pebble {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new("miosa-edge test CA for Pebble");
        let leaf = ca.issue(&["localhost", "127.0.0.1"]);
        let ca_bundle = dir.path().join("ca.pem");
        std::fs::write(&ca_bundle, &ca.pem).expect("write ca");
        std::fs::write(dir.path().join("pebble-cert.pem"), &leaf.cert_pem).expect("write cert");
        std::fs::write(dir.path().join("pebble-key.pem"), &leaf.key_pem).expect("write key");

        let dns = SocketAddr::from(([127, 0, 0, 1], free_udp_tcp_port()));
        let challtestsrv_api = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let management = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let tls_port = free_port();

        let mut pebble_cfg = serde_json::json!({
            "listenAddress": listen.to_string(),
            "managementListenAddress": management.to_string(),
            "certificate": dir.path().join("pebble-cert.pem"),
            "privateKey": dir.path().join("pebble-key.pem"),
            "httpPort": opts.http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        });
        if let Some(v) = opts.validity_secs {
            pebble_cfg["certificateValidityPeriod"] = v.into();
        }
        let cfg_path = dir.path().join("pebble.json");
        std::fs::write(&cfg_path, serde_json::json!({ "pebble": pebble_cfg }).to_string()).expect("write pebble config");

        let log = |name: &str| std::fs::File::create(dir.path().join(name)).expect("log file");
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv6", "", "-defaultIPv4", "127.0.0.1", "-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-dns01", &dns.to_string(), "-management", &challtestsrv_api.to_string()])
            .stdin(Stdio::null())
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err.log"))
            .spawn()
            .expect("spawn pebble-challtestsrv (is the Debian package `pebble` installed? scripts/deps)");
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&cfg_path)
            .args(["-dnsserver", &dns.to_string()])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err.log"))
            .current_dir(dir.path())
            .spawn()
            .expect("spawn pebble");

        let mut p = Pebble {
            dir,
            pebble,
            challtestsrv,
            listen,
            management,
            dns,
            challtestsrv_api,
            ca,
            ca_bundle,
            root: CertificateDer::from(Vec::new()),
        };

        let api = p.challtestsrv_api;
        let up = eventually(Duration::from_secs(20), || async move { TcpStream::connect(api).await.ok().map(|_| ()) }).await;
        assert!(up.is_some(), "pebble-challtestsrv did not start\n{}", p.logs());
        let roots = p.ca.roots();
        let dir_ok = eventually(Duration::from_secs(20), || {
            let roots = roots.clone();
            async move {
                let r = tls_get(listen, Some("localhost"), &format!("localhost:{}", listen.port()), "/dir", Some(roots), &[]).await.ok()?;
                (r.response.status == 200).then_some(())
            }
        })
        .await;
        assert!(dir_ok.is_some(), "pebble's directory never answered on {listen}\n{}", p.logs());
        let root = eventually(Duration::from_secs(10), || {
            let roots = roots.clone();
            async move {
                let r = tls_get(management, Some("localhost"), &format!("localhost:{}", management.port()), "/roots/0", Some(roots), &[])
                    .await
                    .ok()?;
                (r.response.status == 200).then(|| r.response.text())
            }
        })
        .await
        .unwrap_or_else(|| panic!("pebble's /roots/0 never answered on {management}\n{}", p.logs()));
        p.root = pem_cert(&root);
        p
    }

    /// The ACME directory URL.
    pub fn directory(&self) -> String {
        format!("https://localhost:{}/dir", self.listen.port())
    }

    /// Trust roots holding Pebble's issuing root: a handshake verifying against these
    /// proves the edge serves a certificate Pebble issued for the name.
    pub fn roots(&self) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(self.root.clone()).expect("add pebble root");
        r
    }

    /// `[dns]`, `[acme]` (plus `acme_keys`, which replace the defaults they name) and
    /// `[acme.dns01]` pointing at this Pebble. Append `[acme.limits]` after it if needed.
    pub fn acme_toml(&self, acme_keys: &str) -> String {
        let ca_bundle = format!("{:?}", self.ca_bundle.display().to_string());
        let directory = format!("{:?}", self.directory());
        let defaults = [
            ("directory", directory.as_str()),
            ("contact", "[\"mailto:ops@example.com\"]"),
            ("ca_bundle", ca_bundle.as_str()),
            ("max_concurrent_orders", "2"),
            ("backoff_min_secs", "60"),
            ("backoff_max_secs", "86400"),
            ("propagation_timeout_secs", "120"),
        ];
        let given = |key: &str| acme_keys.lines().any(|l| l.split_once('=').is_some_and(|(k, _)| k.trim() == key));
        let mut acme = String::from("[acme]\n");
        for (k, v) in defaults.iter().filter(|(k, _)| !given(k)) {
            acme.push_str(&format!("{k} = {v}\n"));
        }
        acme.push_str(acme_keys.trim());
        format!(
            "[dns]\nnameservers = [\"{dns}\"]\n\n{acme}\n\n[acme.dns01]\nprovider = \"webhook\"\nurl = \"http://{api}\"\n\n",
            dns = self.dns,
            api = self.challtestsrv_api,
        )
    }

    /// POSTs `json` to challtestsrv's management API (`/add-a`, `/set-cname`, …); panics
    /// unless it answers 200.
    pub async fn challtestsrv(&self, path: &str, json: &str) {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{json}",
            api = self.challtestsrv_api,
            len = json.len()
        );
        let r = raw_request(self.challtestsrv_api, &req).await;
        assert_eq!(r.status, 200, "challtestsrv {path} {json}: {}", r.text());
    }

    /// challtestsrv's log (it logs every TXT record added and cleared, with its name).
    pub fn challtestsrv_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("challtestsrv.log")).unwrap_or_default()
    }

    /// The last part of Pebble's and challtestsrv's output (for failure messages).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["pebble.log", "pebble.err.log", "challtestsrv.log", "challtestsrv.err.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            if !text.is_empty() {
                out.push_str(&format!("--- {name} (tail) ---\n{}\n", tail(&text, 6000)));
            }
        }
        out
    }
}

/// A port free on 127.0.0.1 for both TCP and UDP (a DNS server binds both).
fn free_udp_tcp_port() -> u16 {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("addr").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP");
}

/// The last `n` bytes of a log (for failure messages).
pub fn log_tail(s: &str, n: usize) -> String {
    tail(s, n).to_string()
}

/// `GET /v1/certificates` on the control API (asserts 200).
pub async fn certificates(edge: &Edge) -> serde_json::Value {
    let r = edge.api("GET", "/v1/certificates", None).await;
    assert_eq!(r.status, 200, "GET /v1/certificates: {}", r.text());
    r.json()
}

/// `GET /metrics` on the control API.
pub async fn metrics(edge: &Edge) -> String {
    edge.api("GET", "/metrics", None).await.text()
}

/// The value of the first sample of `name` whose labels contain `label` (`cert="x"`).
pub fn metric(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .find(|l| l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
