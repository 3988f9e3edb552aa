//! Domain verification: does the tenant's DNS point at the edge?
//!
//! CONTRACT: a tenant domain `D` (kinds `preview` and `deploy`) of workspace `W` is
//! *verified* when
//!
//! * `*.D` is a CNAME to `edge_target`, and
//! * `_acme-challenge.D` is a CNAME to `{W}.{acme_zone}` (so the edge can answer DNS-01
//!   challenges for `*.D` from its own ACME zone).
//!
//! A custom deployment domain `D` (kind `custom`) is verified when `D` itself is a CNAME
//! to `edge_target`, or, since apex domains cannot hold a CNAME, when the set of `D`'s
//! A/AAAA addresses equals the set of `edge_target`'s A/AAAA addresses.
//!
//! The wildcard `*.D` is checked the way clients meet it: a probe name under `D`
//! (`miosa-edge-verify.D.`) is asked for its CNAME, which the wildcard synthesises, and the
//! answer is reported under the wildcard's display name `*.D.`.
//!
//! Invariants:
//!
//! * DNS answers are untrusted input: nothing here panics on any answer, and NXDOMAIN,
//!   empty answers, server failures and timeouts all give `verified: false` with `found`
//!   listing whatever was found (possibly nothing). Only building the resolver can fail.
//! * Every name in a [`Record`] is fully qualified with a trailing dot and lower-case;
//!   names are compared case-insensitively after that normalisation.
//! * Every lookup is bounded (2 s per attempt, one retry, and a hard 4 s
//!   deadline overall) and the lookups of one verification run concurrently,
//!   so a dead nameserver answers `verified: false` within about 4 s.
//! * The resolver keeps no useful cache (capacity 0, all TTLs clamped to 0): a re-verify
//!   after the tenant fixes their DNS sees the new records, not a stale NXDOMAIN. (An
//!   upstream recursive resolver may still cache on its side; that is outside our reach.)
//! * `/etc/hosts` is never consulted: verification is about public DNS.

use crate::schema::Domains;
use crate::schema::{Host, WorkspaceId};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData, Record as DnsRecord, RecordType};
use hickory_resolver::TokioResolver;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The label of the probe name asked for under a tenant domain to check its wildcard.
const PROBE_LABEL: &str = "miosa-edge-verify";

/// How long one attempt of one query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Retries after a failed attempt (so at most `1 + QUERY_RETRIES` attempts).
const QUERY_RETRIES: usize = 1;

/// Hard bound on one lookup, whatever the resolver does internally.
const LOOKUP_DEADLINE: Duration = Duration::from_secs(4);

/// The kind of domain being verified, as named in the control API (`"preview"`,
/// `"deploy"`, `"custom"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainKind {
    /// A workspace's preview domain (`*.D` serves sandbox previews).
    Preview,
    /// A workspace's deployment domain (`*.D` serves deployments).
    Deploy,
    /// A single custom host of one deployment (may be an apex domain).
    Custom,
}

/// One DNS record, as shown to the caller.
///
/// `name` and `value` are fully qualified with a trailing dot and lower-case (addresses
/// are shown in their usual text form), e.g.
/// `{"name":"*.preview.yourproduct.com.","type":"CNAME","value":"edge.miosa.app."}`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Record {
    /// The owner name of the record.
    pub name: String,
    /// The record type: `CNAME`, `A` or `AAAA`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The record's data: the CNAME target or the address.
    pub value: String,
}

impl Record {
    fn new(name: &str, kind: &str, value: &str) -> Record {
        Record { name: fqdn(name), kind: kind.to_owned(), value: fqdn_or_addr(kind, value) }
    }

    fn cname(name: &str, target: &str) -> Record {
        Record::new(name, "CNAME", target)
    }
}

/// The outcome of one verification: the answer of `POST /v1/domains/verify`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Verification {
    /// Whether the DNS set-up satisfies the contract for the domain's kind.
    pub verified: bool,
    /// The records that would make the domain verified (two for preview/deploy, one
    /// CNAME for custom; the A/AAAA alternative of custom apex domains is not listed).
    pub expected: Vec<Record>,
    /// The relevant records actually found in DNS (possibly none).
    pub found: Vec<Record>,
}

/// Why a [`Verifier`] could not be built. DNS answers are never errors.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// An explicit, but empty, list of nameservers.
    #[error("no nameservers given")]
    NoNameservers,
    /// The system resolver configuration could not be read or used.
    #[error("cannot use the system resolver configuration: {0}")]
    SystemConfig(String),
    /// The resolver could not be built from its configuration.
    #[error("cannot build the dns resolver: {0}")]
    Build(String),
}

/// Checks domains' DNS set-up against the contract; cheap to share (`&self` methods).
pub struct Verifier {
    resolver: TokioResolver,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds a verifier asking `nameservers` (`IP:port`, UDP and TCP on that port), or the
    /// system's resolvers (`/etc/resolv.conf`) when `None`.
    ///
    /// Lookups are bounded (see the module docs) and not cached.
    pub fn new(nameservers: Option<&[SocketAddr]>) -> Result<Verifier, VerifyError> {
        let mut builder = match nameservers {
            Some([]) => return Err(VerifyError::NoNameservers),
            Some(addrs) => {
                let servers = addrs
                    .iter()
                    .map(|addr| {
                        let mut udp = ConnectionConfig::udp();
                        udp.port = addr.port();
                        let mut tcp = ConnectionConfig::tcp();
                        tcp.port = addr.port();
                        NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                    })
                    .collect();
                TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), TokioRuntimeProvider::default())
            }
            None => TokioResolver::builder_tokio().map_err(|e| VerifyError::SystemConfig(e.to_string()))?,
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = QUERY_TIMEOUT;
        opts.attempts = QUERY_RETRIES;
        opts.cache_size = 0;
        opts.positive_min_ttl = Some(Duration::ZERO);
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_min_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
        opts.use_hosts_file = ResolveHosts::Never;
        opts.preserve_intermediates = true;
        let resolver = builder.build().map_err(|e| VerifyError::Build(e.to_string()))?;
        Ok(Verifier { resolver })
    }

    /// Verifies `host` as a domain of `kind` against `domains` (`edge_target`,
    /// `acme_zone`).
    ///
    /// `workspace` is the owning workspace's id, needed for preview/deploy domains to
    /// build the expected `_acme-challenge` target; when it is `None` for those kinds the
    /// acme record cannot be expected, so the result is `verified: false` and `expected`
    /// holds only the wildcard CNAME (both records are still looked up for `found`).
    /// Never fails: DNS trouble gives `verified: false`.
    pub async fn verify(&self, host: &Host, kind: DomainKind, workspace: Option<&WorkspaceId>, domains: &Domains) -> Verification {
        match kind {
            DomainKind::Preview | DomainKind::Deploy => self.verify_tenant(host, workspace, domains).await,
            DomainKind::Custom => self.verify_custom(host, domains).await,
        }
    }

    async fn verify_tenant(&self, host: &Host, workspace: Option<&WorkspaceId>, domains: &Domains) -> Verification {
        let zone = fqdn(host.as_str());
        let wildcard = format!("*.{zone}");
        let acme = format!("_acme-challenge.{zone}");
        let probe = format!("{PROBE_LABEL}.{zone}");
        let edge = fqdn(domains.edge_target.as_str());
        let acme_target = workspace.map(|w| fqdn(&format!("{}.{}", w.as_str(), domains.acme_zone.as_str())));

        let mut expected = vec![Record::cname(&wildcard, &edge)];
        if let Some(target) = &acme_target {
            expected.push(Record::cname(&acme, target));
        }

        let (wildcard_targets, acme_targets) = tokio::join!(self.cname_targets(&probe), self.cname_targets(&acme));

        let wildcard_ok = all_equal(&wildcard_targets, &edge);
        let acme_ok = acme_target.as_deref().is_some_and(|t| all_equal(&acme_targets, t));

        let found = wildcard_targets
            .iter()
            .map(|t| Record::cname(&wildcard, t))
            .chain(acme_targets.iter().map(|t| Record::cname(&acme, t)))
            .collect();
        Verification { verified: wildcard_ok && acme_ok, expected, found }
    }

    async fn verify_custom(&self, host: &Host, domains: &Domains) -> Verification {
        let name = fqdn(host.as_str());
        let edge = fqdn(domains.edge_target.as_str());
        let expected = vec![Record::cname(&name, &edge)];

        let (targets, host_a, host_aaaa, edge_a, edge_aaaa) = tokio::join!(
            self.cname_targets(&name),
            self.answers(&name, RecordType::A),
            self.answers(&name, RecordType::AAAA),
            self.answers(&edge, RecordType::A),
            self.answers(&edge, RecordType::AAAA),
        );

        // Addresses as resolved (following any CNAME chain), compared as sets.
        let host_addrs: BTreeSet<IpAddr> = addresses(host_a.iter().chain(&host_aaaa)).collect();
        let edge_addrs: BTreeSet<IpAddr> = addresses(edge_a.iter().chain(&edge_aaaa)).collect();
        let cname_ok = all_equal(&targets, &edge);
        let addrs_ok = !host_addrs.is_empty() && host_addrs == edge_addrs;

        // Shown: the host's own CNAME and the addresses it holds itself (those reached
        // through a CNAME belong to the target and are implied by the CNAME shown).
        let mut found: Vec<Record> = targets.iter().map(|t| Record::cname(&name, t)).collect();
        for record in host_a.iter().chain(&host_aaaa) {
            if display_name(&record.name) != name {
                continue;
            }
            match &record.data {
                RData::A(a) => found.push(Record::new(&name, "A", &a.0.to_string())),
                RData::AAAA(aaaa) => found.push(Record::new(&name, "AAAA", &aaaa.0.to_string())),
                _ => {}
            }
        }
        Verification { verified: cname_ok || addrs_ok, expected, found }
    }

    /// The normalised CNAME targets owned by `name` (itself normalised), deduplicated in
    /// answer order.
    async fn cname_targets(&self, name: &str) -> Vec<String> {
        let mut targets: Vec<String> = Vec::new();
        for record in self.answers(name, RecordType::CNAME).await {
            if display_name(&record.name) != name {
                continue;
            }
            if let RData::CNAME(cname) = &record.data {
                let target = display_name(&cname.0);
                if !targets.contains(&target) {
                    targets.push(target);
                }
            }
        }
        targets
    }

    /// The TXT strings at `name` (each record's strings joined); empty on NXDOMAIN, no
    /// data or any failure. Used by ACME to see a DNS-01 record before asking the CA.
    pub async fn txt_values(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        for record in self.answers(name, RecordType::TXT).await {
            if let RData::TXT(txt) = &record.data {
                out.push(txt.txt_data.iter().map(|d| String::from_utf8_lossy(d)).collect::<String>());
            }
        }
        out
    }

    /// The answer records for `name`/`rtype`; empty on NXDOMAIN, no data, any failure or
    /// timeout (logged at debug level).
    async fn answers(&self, name: &str, rtype: RecordType) -> Vec<DnsRecord> {
        let qname = match Name::from_ascii(name) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(%name, error = %e, "domain verification: not a dns name");
                return Vec::new();
            }
        };
        match tokio::time::timeout(LOOKUP_DEADLINE, self.resolver.lookup(qname, rtype)).await {
            Ok(Ok(lookup)) => lookup.answers().to_vec(),
            Ok(Err(e)) if e.is_no_records_found() => Vec::new(),
            Ok(Err(e)) => {
                tracing::debug!(%name, %rtype, error = %e, "domain verification: lookup failed");
                Vec::new()
            }
            Err(_) => {
                tracing::debug!(%name, %rtype, "domain verification: lookup timed out");
                Vec::new()
            }
        }
    }
}

/// True when `values` is non-empty and every value is `want`.
fn all_equal(values: &[String], want: &str) -> bool {
    !values.is_empty() && values.iter().all(|v| v == want)
}

/// The A/AAAA addresses among `records`, whatever their owner.
fn addresses<'a>(records: impl Iterator<Item = &'a DnsRecord> + 'a) -> impl Iterator<Item = IpAddr> + 'a {
    records.filter_map(|r| match &r.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
        _ => None,
    })
}

/// `s` lower-cased with exactly one trailing dot (`"Edge.Miosa.App"` → `"edge.miosa.app."`).
fn fqdn(s: &str) -> String {
    let mut out = s.trim_end_matches('.').to_ascii_lowercase();
    out.push('.');
    out
}

/// Values of address records are kept as given; names are normalised with [`fqdn`].
fn fqdn_or_addr(kind: &str, value: &str) -> String {
    match kind {
        "A" | "AAAA" => value.to_owned(),
        _ => fqdn(value),
    }
}

/// A DNS name from the wire as a normalised display string: labels lower-cased, bytes
/// outside printable ASCII (and `.`/`\` inside labels) escaped as `\DDD`, trailing dot.
/// Total on any input (the wire is untrusted).
fn display_name(name: &Name) -> String {
    let mut out = String::new();
    for label in name.iter() {
        for &b in label {
            match b {
                b'.' | b'\\' => out.push_str(&format!("\\{b:03}")),
                0x21..=0x7e => out.push(char::from(b.to_ascii_lowercase())),
                _ => out.push_str(&format!("\\{b:03}")),
            }
        }
        out.push('.');
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_server::proto::rr::rdata::CNAME;
    use hickory_server::proto::serialize::txt::Parser;
    use hickory_server::store::in_memory::InMemoryZoneHandler;
    use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
    use hickory_server::Server;
    use std::sync::Arc;
    use std::time::Instant;

    const PRODUCT_ZONE: &str = r#"
$ORIGIN yourproduct.com.
$TTL 300
@                         IN SOA   ns1.yourproduct.com. hostmaster.yourproduct.com. 1 3600 600 86400 300
@                         IN NS    ns1.yourproduct.com.
ns1                       IN A     192.0.2.53
*.preview                 IN CNAME edge.miosa.app.
*.wrongacme               IN CNAME edge.miosa.app.
*.wrongedge               IN CNAME edge.elsewhere.example.
"#;

    /// CNAMEs of the product zone added through `Name::from_ascii`: the zone-file parser
    /// reads names as IDNA, which rejects `_` inside a label (`ws_1`) and lower-cases.
    const PRODUCT_EXTRA: &[(&str, &str)] = &[
        ("_acme-challenge.preview.yourproduct.com.", "ws_1.acme.miosa.app."),
        ("_acme-challenge.wrongacme.yourproduct.com.", "ws_2.acme.miosa.app."),
        ("_acme-challenge.wrongedge.yourproduct.com.", "ws_1.acme.miosa.app."),
        ("*.Mixed.YourProduct.com.", "EDGE.Miosa.APP."),
        ("_acme-challenge.MIXED.yourproduct.COM.", "WS_1.Acme.Miosa.App."),
    ];

    const CUSTOMER_ZONE: &str = r#"
$ORIGIN customer.com.
$TTL 300
@        IN SOA   ns1.customer.com. hostmaster.customer.com. 1 3600 600 86400 300
@        IN NS    ns1.customer.com.
@        IN A     192.0.2.10
@        IN AAAA  2001:db8::10
ns1      IN A     192.0.2.53
app      IN CNAME edge.miosa.app.
other    IN CNAME edge.elsewhere.example.
wrongip  IN A     198.51.100.7
v4only   IN A     192.0.2.10
"#;

    const MIOSA_ZONE: &str = r#"
$ORIGIN miosa.app.
$TTL 300
@        IN SOA   ns1.miosa.app. hostmaster.miosa.app. 1 3600 600 86400 300
@        IN NS    ns1.miosa.app.
ns1      IN A     192.0.2.53
edge     IN A     192.0.2.10
edge     IN AAAA  2001:db8::10
"#;

    /// An authoritative hickory DNS server on loopback (UDP and TCP on one port); serving
    /// stops when this is dropped.
    struct TestDns {
        addr: SocketAddr,
        product: Arc<InMemoryZoneHandler>,
        _server: Server<Catalog>,
    }

    fn cname_record(owner: &str, target: &str) -> DnsRecord {
        DnsRecord::from_rdata(
            Name::from_ascii(owner).expect("test owner name"),
            300,
            RData::CNAME(CNAME(Name::from_ascii(target).expect("test target name"))),
        )
    }

    /// An authoritative zone from zone-file `text` plus `extra` CNAMEs.
    fn zone(origin: &str, text: &str, extra: &[(&str, &str)]) -> Arc<InMemoryZoneHandler> {
        let origin = Name::from_ascii(origin).expect("test zone origin");
        let (origin, records) = Parser::new(text, None, Some(origin)).parse().expect("test zone parses");
        let mut handler: InMemoryZoneHandler =
            InMemoryZoneHandler::new(origin, records, ZoneType::Primary, AxfrPolicy::Deny).expect("test zone loads");
        for (owner, target) in extra {
            assert!(handler.upsert_mut(cname_record(owner, target), 1), "{owner}");
        }
        Arc::new(handler)
    }

    async fn start_dns() -> TestDns {
        let product = zone("yourproduct.com.", PRODUCT_ZONE, PRODUCT_EXTRA);
        let mut catalog = Catalog::new();
        for handler in [product.clone(), zone("customer.com.", CUSTOMER_ZONE, &[]), zone("miosa.app.", MIOSA_ZONE, &[])] {
            let origin = handler.origin().clone();
            catalog.upsert(origin, vec![handler as Arc<dyn ZoneHandler>]);
        }

        // UDP on an ephemeral port, TCP on the same port (retry if that one is taken).
        let mut bound = None;
        for _ in 0..20 {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
            let addr = udp.local_addr().expect("udp addr");
            if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
                bound = Some((udp, tcp, addr));
                break;
            }
        }
        let (udp, tcp, addr) = bound.expect("a port free for both udp and tcp");

        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 16);
        TestDns { addr, product, _server: server }
    }

    fn domains() -> Domains {
        Domains::from_names("sandbox.miosa.app", "miosa.app", "edge.miosa.app", "acme.miosa.app").unwrap()
    }

    fn host(s: &str) -> Host {
        Host::try_from(s).unwrap()
    }

    fn ws(s: &str) -> WorkspaceId {
        WorkspaceId::try_from(s).unwrap()
    }

    fn rec(name: &str, kind: &str, value: &str) -> Record {
        Record { name: name.into(), kind: kind.into(), value: value.into() }
    }

    async fn verify_at(dns: &TestDns, h: &str, kind: DomainKind, workspace: Option<&str>) -> Verification {
        let verifier = Verifier::new(Some(&[dns.addr])).unwrap();
        let w = workspace.map(ws);
        verifier.verify(&host(h), kind, w.as_ref(), &domains()).await
    }

    #[tokio::test]
    async fn preview_domain_with_both_cnames_is_verified() {
        let dns = start_dns().await;
        let out = verify_at(&dns, "preview.yourproduct.com", DomainKind::Preview, Some("ws_1")).await;
        let want = vec![
            rec("*.preview.yourproduct.com.", "CNAME", "edge.miosa.app."),
            rec("_acme-challenge.preview.yourproduct.com.", "CNAME", "ws_1.acme.miosa.app."),
        ];
        assert!(out.verified, "{out:?}");
        assert_eq!(out.expected, want);
        assert_eq!(out.found, want);
    }

    #[tokio::test]
    async fn deploy_kind_checks_the_same_records() {
        let dns = start_dns().await;
        let out = verify_at(&dns, "preview.yourproduct.com", DomainKind::Deploy, Some("ws_1")).await;
        assert!(out.verified, "{out:?}");
        assert_eq!(out.found.len(), 2);
        // The acme target depends on the workspace: another workspace is not verified.
        let other = verify_at(&dns, "preview.yourproduct.com", DomainKind::Deploy, Some("ws_9")).await;
        assert!(!other.verified, "{other:?}");
        assert_eq!(other.expected[1], rec("_acme-challenge.preview.yourproduct.com.", "CNAME", "ws_9.acme.miosa.app."));
    }

    #[tokio::test]
    async fn wrong_acme_target_is_not_verified() {
        let dns = start_dns().await;
        let out = verify_at(&dns, "wrongacme.yourproduct.com", DomainKind::Preview, Some("ws_1")).await;
        assert!(!out.verified, "{out:?}");
        assert_eq!(
            out.found,
            vec![
                rec("*.wrongacme.yourproduct.com.", "CNAME", "edge.miosa.app."),
                rec("_acme-challenge.wrongacme.yourproduct.com.", "CNAME", "ws_2.acme.miosa.app."),
            ]
        );
        assert_eq!(out.expected[1], rec("_acme-challenge.wrongacme.yourproduct.com.", "CNAME", "ws_1.acme.miosa.app."));
    }

    #[tokio::test]
    async fn wrong_wildcard_target_is_not_verified() {
        let dns = start_dns().await;
        let out = verify_at(&dns, "wrongedge.yourproduct.com", DomainKind::Preview, Some("ws_1")).await;
        assert!(!out.verified, "{out:?}");
        assert_eq!(
            out.found,
            vec![
                rec("*.wrongedge.yourproduct.com.", "CNAME", "edge.elsewhere.example."),
                rec("_acme-challenge.wrongedge.yourproduct.com.", "CNAME", "ws_1.acme.miosa.app."),
            ]
        );
    }

    #[tokio::test]
    async fn domain_without_records_is_not_verified() {
        let dns = start_dns().await;
        // NXDOMAIN inside a zone the server is authoritative for.
        let out = verify_at(&dns, "missing.yourproduct.com", DomainKind::Preview, Some("ws_1")).await;
        assert!(!out.verified, "{out:?}");
        assert!(out.found.is_empty(), "{out:?}");
        assert_eq!(out.expected.len(), 2);
        // A zone the server does not serve at all (REFUSED).
        let out = verify_at(&dns, "preview.unknown.example", DomainKind::Preview, Some("ws_1")).await;
        assert!(!out.verified, "{out:?}");
        assert!(out.found.is_empty(), "{out:?}");
    }

    #[tokio::test]
    async fn missing_workspace_expects_only_the_wildcard() {
        let dns = start_dns().await;
        let out = verify_at(&dns, "preview.yourproduct.com", DomainKind::Preview, None).await;
        assert!(!out.verified, "{out:?}");
        assert_eq!(out.expected, vec![rec("*.preview.yourproduct.com.", "CNAME", "edge.miosa.app.")]);
        assert_eq!(out.found.len(), 2, "{out:?}");
    }

    #[tokio::test]
    async fn names_compare_case_insensitively() {
        let dns = start_dns().await;
        let out = verify_at(&dns, "mixed.yourproduct.com", DomainKind::Preview, Some("ws_1")).await;
        assert!(out.verified, "{out:?}");
        assert_eq!(
            out.found,
            vec![
                rec("*.mixed.yourproduct.com.", "CNAME", "edge.miosa.app."),
                rec("_acme-challenge.mixed.yourproduct.com.", "CNAME", "ws_1.acme.miosa.app."),
            ]
        );
    }

    #[tokio::test]
    async fn custom_cname_to_edge_is_verified() {
        let dns = start_dns().await;
        let out = verify_at(&dns, "app.customer.com", DomainKind::Custom, None).await;
        let want = vec![rec("app.customer.com.", "CNAME", "edge.miosa.app.")];
        assert!(out.verified, "{out:?}");
        assert_eq!(out.expected, want);
        assert_eq!(out.found, want);
    }

    #[tokio::test]
    async fn custom_cname_elsewhere_is_not_verified() {
        let dns = start_dns().await;
        let out = verify_at(&dns, "other.customer.com", DomainKind::Custom, None).await;
        assert!(!out.verified, "{out:?}");
        assert_eq!(out.found, vec![rec("other.customer.com.", "CNAME", "edge.elsewhere.example.")]);
    }

    #[tokio::test]
    async fn custom_apex_with_the_edge_addresses_is_verified() {
        let dns = start_dns().await;
        let out = verify_at(&dns, "customer.com", DomainKind::Custom, None).await;
        assert!(out.verified, "{out:?}");
        assert_eq!(out.expected, vec![rec("customer.com.", "CNAME", "edge.miosa.app.")]);
        assert_eq!(out.found, vec![rec("customer.com.", "A", "192.0.2.10"), rec("customer.com.", "AAAA", "2001:db8::10")]);
    }

    #[tokio::test]
    async fn custom_with_other_or_partial_addresses_is_not_verified() {
        let dns = start_dns().await;
        let out = verify_at(&dns, "wrongip.customer.com", DomainKind::Custom, None).await;
        assert!(!out.verified, "{out:?}");
        assert_eq!(out.found, vec![rec("wrongip.customer.com.", "A", "198.51.100.7")]);
        // The edge is dual-stack; only its IPv4 address is not the same address set.
        let out = verify_at(&dns, "v4only.customer.com", DomainKind::Custom, None).await;
        assert!(!out.verified, "{out:?}");
        assert_eq!(out.found, vec![rec("v4only.customer.com.", "A", "192.0.2.10")]);
        // Nothing at all.
        let out = verify_at(&dns, "nothing.customer.com", DomainKind::Custom, None).await;
        assert!(!out.verified, "{out:?}");
        assert!(out.found.is_empty(), "{out:?}");
    }

    #[tokio::test]
    async fn reverify_sees_records_added_after_a_miss() {
        let dns = start_dns().await;
        let verifier = Verifier::new(Some(&[dns.addr])).unwrap();
        let (h, w, d) = (host("later.yourproduct.com"), ws("ws_1"), domains());
        let first = verifier.verify(&h, DomainKind::Preview, Some(&w), &d).await;
        assert!(!first.verified, "{first:?}");
        assert!(first.found.is_empty(), "{first:?}");

        // The tenant fixes their DNS (the zone's negative TTL is 300 s).
        for (owner, target) in
            [("*.later.yourproduct.com.", "edge.miosa.app."), ("_acme-challenge.later.yourproduct.com.", "ws_1.acme.miosa.app.")]
        {
            assert!(dns.product.upsert(cname_record(owner, target), 2).await);
        }

        let second = verifier.verify(&h, DomainKind::Preview, Some(&w), &d).await;
        assert!(second.verified, "{second:?}");
        assert_eq!(second.found, second.expected);
    }

    #[tokio::test]
    async fn closed_nameserver_port_answers_false_quickly() {
        let addr = {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.local_addr().unwrap()
        }; // closed again here
        let verifier = Verifier::new(Some(&[addr])).unwrap();
        let started = Instant::now();
        let w = ws("ws_1");
        let out = verifier.verify(&host("preview.yourproduct.com"), DomainKind::Preview, Some(&w), &domains()).await;
        let took = started.elapsed();
        assert!(took <= LOOKUP_DEADLINE + Duration::from_secs(3), "took {took:?}");
        let started = Instant::now();
        let custom = verifier.verify(&host("customer.com"), DomainKind::Custom, None, &domains()).await;
        let took = started.elapsed();
        assert!(took <= LOOKUP_DEADLINE + Duration::from_secs(3), "took {took:?}");
        assert!(!out.verified && out.found.is_empty(), "{out:?}");
        assert_eq!(out.expected.len(), 2);
        assert!(!custom.verified && custom.found.is_empty(), "{custom:?}");
    }

    #[tokio::test]
    async fn silent_nameserver_times_out_within_bound() {
        // Bound but never read: every UDP query goes unanswered (TCP is refused).
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let verifier = Verifier::new(Some(&[addr])).unwrap();
        let started = Instant::now();
        let w = ws("ws_1");
        let out = verifier.verify(&host("preview.yourproduct.com"), DomainKind::Preview, Some(&w), &domains()).await;
        let took = started.elapsed();
        assert!(took <= LOOKUP_DEADLINE + Duration::from_secs(3), "took {took:?}");
        assert!(!out.verified && out.found.is_empty(), "{out:?}");
        drop(sock);
    }

    #[test]
    fn empty_nameserver_list_is_an_error() {
        let err = Verifier::new(Some(&[])).unwrap_err();
        assert!(matches!(err, VerifyError::NoNameservers));
        assert_eq!(err.to_string(), "no nameservers given");
    }

    #[test]
    fn api_shapes() {
        let v = Verification {
            verified: false,
            expected: vec![Record::cname("*.Preview.yourproduct.com", "edge.miosa.app.")],
            found: vec![Record::new("customer.com", "A", "192.0.2.10")],
        };
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            serde_json::json!({
                "verified": false,
                "expected": [{"name": "*.preview.yourproduct.com.", "type": "CNAME", "value": "edge.miosa.app."}],
                "found": [{"name": "customer.com.", "type": "A", "value": "192.0.2.10"}],
            })
        );
        let kind: DomainKind = serde_json::from_str(r#""custom""#).unwrap();
        assert_eq!(kind, DomainKind::Custom);
        assert_eq!(serde_json::to_string(&DomainKind::Preview).unwrap(), r#""preview""#);
        assert!(serde_json::from_str::<DomainKind>(r#""Preview""#).is_err());
    }

    #[test]
    fn display_name_is_total_and_normalised() {
        assert_eq!(display_name(&Name::from_ascii("Edge.Miosa.App.").unwrap()), "edge.miosa.app.");
        assert_eq!(display_name(&Name::root()), ".");
        let odd = Name::from_labels(vec![&b"a.b"[..], &b"\xff\x00"[..], &b"com"[..]]).unwrap();
        assert_eq!(display_name(&odd), "a\\046b.\\255\\000.com.");
        assert_eq!(fqdn("Edge.Miosa.App"), "edge.miosa.app.");
        assert_eq!(fqdn("edge.miosa.app."), "edge.miosa.app.");
    }
}
