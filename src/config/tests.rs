use super::*;

fn issues(text: &str) -> Vec<ConfigIssue> {
    match Config::parse(text, Some(Path::new("t.toml"))) {
        Err(ConfigError::Invalid { issues, .. }) => issues,
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("expected errors"),
    }
}

#[test]
fn embedded_default_is_valid() {
    let c = Config::load(None).unwrap();
    assert_eq!(c.server.http, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.domains.sandbox.as_str(), "sandbox.localhost");
    assert!(c.state.sandboxes.iter().any(|s| s.id.as_str() == "demo"));
    assert!(c.source.is_none());
}

#[test]
fn syntax_error_has_line_and_column() {
    let i = issues("[server]\nhttp = \"127.0.0.1:8080\n");
    assert_eq!(i.len(), 1);
    assert_eq!(i[0].line, 2, "{:?}", i[0]);
}

#[test]
fn unknown_key_is_located() {
    let i = issues("[server]\nhttp = \"127.0.0.1:8080\"\nhtps = \"x\"\n");
    assert_eq!((i[0].line, i[0].column), (3, 1), "{:?}", i[0]);
    assert!(i[0].message.contains("unknown field `htps`"), "{:?}", i[0]);
    assert_eq!(i[0].path, "server.htps");
}

#[test]
fn wrong_type_in_array_of_tables_is_located() {
    let text = "[[workspaces]]\nid = \"w\"\nslug = \"s\"\n\n[[sandboxes]]\nid = \"a\"\nworkspace = \"w\"\naddress = \"10.0.0.1\"\n\n[[sandboxes]]\nid = \"b\"\nworkspace = \"w\"\naddress = \"10.0.3\"\n";
    let i = issues(text);
    assert_eq!(i[0].line, 13, "{:?}", i[0]);
    assert_eq!(i[0].path, "sandboxes[1].address", "{:?}", i[0]);
    assert!(i[0].message.contains("not an IP address"));
}

#[test]
fn semantic_errors_are_all_reported_with_positions() {
    let text = "[[workspaces]]\nid = \"w\"\nslug = \"s\"\n\n[[sandboxes]]\nid = \"a\"\nworkspace = \"nope\"\naddress = \"10.0.0.1\"\n\n[[sandboxes]]\nid = \"a\"\nworkspace = \"w\"\naddress = \"10.0.0.2\"\n";
    let i = issues(text);
    assert_eq!(i.len(), 2, "{i:?}");
    assert_eq!((i[0].path.as_str(), i[0].line), ("sandboxes[0].workspace", 7));
    assert_eq!((i[1].path.as_str(), i[1].line), ("sandboxes[1].id", 11));
}

#[test]
fn acme_needs_the_tls_listener_and_a_complete_dns01() {
    let i = issues("[acme]\ndirectory = \"https://example\"\n");
    assert_eq!(i[0].path, "acme");
    assert!(i[0].message.contains("server] https"), "{:?}", i[0]);
    assert_eq!(i[0].line, 1);
    let i = issues("[server]\nhttps = \"127.0.0.1:0\"\n[acme]\ndirectory = \"ftp://x\"\ncontact = [\"ops@example.com\"]\n[acme.dns01]\nprovider = \"rfc2136\"\n");
    let paths: Vec<&str> = i.iter().map(|x| x.path.as_str()).collect();
    assert_eq!(
        paths,
        ["acme.directory", "acme.contact[0]", "acme.dns01.server", "acme.dns01.tsig_key_name", "acme.dns01.tsig_secret_env"],
        "{i:?}"
    );
    let i =
        issues("[server]\nhttps = \"127.0.0.1:0\"\n[acme]\ndirectory = \"https://ca.test/dir\"\n[acme.dns01]\nprovider = \"webhook\"\n");
    assert_eq!(i[0].path, "acme.dns01.url");
    let i = issues("[tls]\nwatch_interval_ms = 1\n");
    assert_eq!(i[0].path, "tls.watch_interval_ms");
    let i = issues("[tls]\nhandshake_timeout_ms = 0\n");
    assert_eq!(i[0].path, "tls.handshake_timeout_ms");
    // The TLS listener is told apart by its port: another address on the same port is refused.
    let i = issues("[server]\nhttp = \"127.0.0.1:8080\"\nhttps = \"127.0.0.2:8080\"\n");
    assert_eq!((i[0].path.as_str(), i[0].message.as_str()), ("server.https", "must use another port than server.http"));
}

#[test]
fn domain_rules() {
    let i = issues("[domains]\nsandbox = \"x.example\"\napps = \"x.example\"\n");
    assert_eq!(i[0].path, "domains.apps");
    let i = issues("[domains]\nsandbox = \"Sandbox.example\"\n");
    assert!(i[0].message.contains("lower-case"), "{:?}", i[0]);
}

#[test]
fn line_col_counts_characters() {
    assert_eq!(line_col("ab\ncdé f", 8), (2, 5));
    assert_eq!(line_col("", 10), (1, 1));
}

#[test]
fn mangled_files_are_errors_not_panics() {
    let base = include_str!("../../config/edge.example.toml");
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    };
    let junk = ["[", "]", "=", "\"", "[[sandboxes]]\n", "port = 0\n", "\n", "x", "1e999", "-", "{", "}", ",", "é", "\u{0}"];
    let mut errors = 0;
    for _ in 0..1500 {
        let mut text = base.to_string();
        for _ in 0..(1 + next() % 4) {
            let mut at = (next() as usize) % (text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            if next() % 2 == 0 {
                text.insert_str(at, junk[(next() % junk.len() as u64) as usize]);
            } else {
                let mut end = (at + 1 + (next() % 20) as usize).min(text.len());
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                text.replace_range(at..end, "");
            }
        }
        match Config::parse(&text, None) {
            Ok(_) => {}
            Err(ConfigError::Invalid { issues, .. }) => {
                errors += 1;
                assert!(!issues.is_empty());
                for i in &issues {
                    assert!(i.line >= 1 && i.line <= text.lines().count() + 1, "{i:?}");
                }
            }
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
    assert!(errors > 500, "the mangling did produce errors ({errors})");
}

#[test]
fn hostile_client_limits_have_defaults_and_bounds() {
    let c = Config::parse("", None).unwrap();
    assert_eq!(
        (c.server.client_header_timeout_ms, c.server.client_body_timeout_ms, c.server.max_connections_per_ip),
        (10_000, 60_000, 256)
    );
    let c = Config::parse("[server]\nmax_connections_per_ip = 0\nclient_header_timeout_ms = 1500\n", None).unwrap();
    assert_eq!((c.server.max_connections_per_ip, c.server.client_header_timeout_ms), (0, 1500));
    let i = issues("[server]\nclient_header_timeout_ms = 0\nclient_body_timeout_ms = 99\n");
    let paths: Vec<&str> = i.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(paths, ["server.client_header_timeout_ms", "server.client_body_timeout_ms"], "{i:?}");
    let i = issues("[server]\nmax_connections_per_ip = -1\n");
    assert_eq!(i[0].path, "server.max_connections_per_ip", "{:?}", i[0]);
}

#[test]
fn cluster_reads_its_secrets_from_the_environment_and_says_what_is_wrong() {
    // Names only this test sets.
    std::env::set_var("CFGTEST_REDIS_OK", "redis://:pw@127.0.0.1:6390/0");
    std::env::set_var("CFGTEST_REDIS_HTTP", "http://127.0.0.1:6390");
    std::env::set_var("CFGTEST_SEAL_SHORT", "too short");
    std::env::set_var("CFGTEST_SEAL_OK", "0123456789abcdef0123456789abcdef");
    let section = |url: &str, seal: &str, extra: &str| format!("[cluster]\nredis_url_env = \"{url}\"\nseal_key_env = \"{seal}\"\n{extra}");
    let c = Config::parse(&section("CFGTEST_REDIS_OK", "CFGTEST_SEAL_OK", "node = \"edge-7\"\n"), None).expect("valid");
    let cl = c.cluster.expect("cluster");
    assert_eq!((cl.node.as_str(), cl.prefix.as_str()), ("edge-7", "miosa-edge"));
    assert_eq!(cl.seal_key.as_deref().map(<[u8]>::len), Some(32));
    assert!(!format!("{cl:?}").contains("pw@"), "the URL's password is not in Debug output");
    // The node defaults to the host name.
    assert!(!Config::parse(&section("CFGTEST_REDIS_OK", "CFGTEST_SEAL_OK", ""), None)
        .expect("valid")
        .cluster
        .expect("cluster")
        .node
        .is_empty());

    let i = issues(&section("CFGTEST_REDIS_UNSET", "CFGTEST_SEAL_SHORT", "node = \"no spaces allowed\"\n"));
    let paths: Vec<&str> = i.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(paths, ["cluster.node"], "names are checked first: {i:?}");
    let i = issues(&section("CFGTEST_REDIS_UNSET", "CFGTEST_SEAL_SHORT", ""));
    let paths: Vec<&str> = i.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(paths, ["cluster.redis_url_env", "cluster.seal_key_env"], "{i:?}");
    assert!(i[0].message.contains("CFGTEST_REDIS_UNSET is not set") && i[1].message.contains("at least 32 bytes"), "{i:?}");
    let i = issues(&section("CFGTEST_REDIS_HTTP", "CFGTEST_SEAL_OK", ""));
    assert!(i[0].message.contains("redis:// or rediss://"), "{i:?}");
    // With TLS, the seal key is required (the fleet keeps its certificates' keys sealed).
    let i = issues(&format!("[server]\nhttps = \"127.0.0.1:0\"\n{}", section("CFGTEST_REDIS_OK", "CFGTEST_SEAL_UNSET", "")));
    assert!(i.iter().any(|i| i.path == "cluster.seal_key_env" && i.message.contains("is not set")), "{i:?}");
}

#[test]
fn every_error_is_reported_not_only_the_first() {
    // A bad value in [branding] and a bad one in a sandbox: both, in the file's order,
    // each at the value it names.
    let text = "[branding]\naccent_color = \"blue\"\n\n[[workspaces]]\nid = \"w\"\nslug = \"s\"\n\n[[sandboxes]]\nid = \"a\"\nworkspace = \"w\"\naddress = \"10.0.3\"\n\n[server]\nthreads = \"many\"\n";
    let i = issues(text);
    let got: Vec<(&str, usize, usize)> = i.iter().map(|i| (i.path.as_str(), i.line, i.column)).collect();
    assert_eq!(got, [("branding.accent_color", 2, 16), ("sandboxes[0].address", 11, 11), ("server.threads", 14, 11)], "{i:?}");
    assert!(i[1].message.contains("not an IP address"), "{:?}", i[1]);
    let shown = Config::parse(text, Some(Path::new("t.toml"))).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(shown.contains("\n  t.toml:2:16: branding.accent_color: "), "{shown}");
    assert!(shown.contains("\n  t.toml:11:11: sandboxes[0].address: "), "{shown}");
    // A left-out sandbox does not make the share token that references it dangle.
    let text = "[[workspaces]]\nid = \"w\"\nslug = \"s\"\n\n[[sandboxes]]\nid = \"a\"\nworkspace = \"w\"\naddress = \"x\"\n\n[[sandboxes]]\nid = \"b\"\nworkspace = \"w\"\naddress = \"10.0.0.2\"\ncolour = 1\n";
    let i = issues(text);
    let paths: Vec<&str> = i.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(paths, ["sandboxes[0].address", "sandboxes[1].colour"], "{i:?}");
}

#[test]
fn error_paths_go_through_releases() {
    let dep = |release: &str| {
        format!("[[workspaces]]\nid = \"w\"\nslug = \"s\"\n\n[[deployments]]\nid = \"d\"\nworkspace = \"w\"\nname = \"app\"\nactive_version = \"v1\"\n\n[[deployments.versions]]\nid = \"v1\"\nrelease = {release}\n")
    };
    let i = issues(&dep(r#"{ kind = "dynamic", instances = ["10.0.0.1:80", "10.0.0.2"] }"#));
    assert_eq!(i[0].path, "deployments[0].versions[0].release.instances[1]", "{i:?}");
    assert_eq!((i[0].line, i[0].column), (13, 59), "{i:?}");
    let i = issues(&dep(r#"{ kind = "static", sha256 = "abc" }"#));
    assert_eq!(i[0].path, "deployments[0].versions[0].release.sha256", "{i:?}");
    let i = issues(&dep(r#"{ kind = "static", spa = true, color = 1 }"#));
    assert_eq!(i[0].path, "deployments[0].versions[0].release.color", "{i:?}");
    let i = issues(&dep(r#"{ kind = "lambda" }"#));
    assert_eq!(i[0].path, "deployments[0].versions[0].release.kind", "{i:?}");
    let i = issues(&dep(&format!(r#"{{ kind = "static", sha256 = "{}", instances = [] }}"#, "a".repeat(64))));
    assert_eq!(i[0].path, "deployments[0].versions[0].release", "{i:?}");
    assert!(i[0].message.contains("unknown field `instances` for a static release"), "{i:?}");
    let ok = dep(&format!(r#"{{ kind = "static", sha256 = "{}", spa = true }}"#, "a".repeat(64)));
    let c = Config::parse(&ok, None).expect("valid");
    assert!(matches!(c.state.deployments[0].versions[0].release, schema::Release::Static { spa: true, .. }));
}

#[test]
fn sections_and_routing_objects_must_be_tables() {
    // serde reads a struct from an array too: `branding = ["x"]` would be a branding.
    let i = issues("branding = [\"x\"]\nsandboxes = [[\"a\", \"w\", \"10.0.0.1\"]]\n");
    let got: Vec<(&str, bool)> = i.iter().map(|i| (i.path.as_str(), i.message.contains("must be a table"))).collect();
    assert_eq!(got, [("branding", true), ("sandboxes[0]", true)], "{i:?}");
    let i = issues("sandboxes = 3\n");
    assert_eq!(i[0].path, "sandboxes");
    let i = issues("[serverr]\n");
    assert!(i[0].path == "serverr" && i[0].message.starts_with("unknown field `serverr`"), "{i:?}");
}
