use super::cookie::{self, Kind, Session};
use super::keys::mint::{self, SigningKey};
use super::password::{self, Passwords};
use super::*;
use crate::access::{KeyAlg, PreviewKeySpec, Tokens};
use crate::config::Config;
use crate::routing::RouteTable;
use crate::schema::Timestamp;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::signature::KeyPair;

const K1: &[u8] = b"k1-secret-0123456789abcdef0123456789";
const K2: &[u8] = b"k2-secret-0123456789abcdef0123456789";
const SESSION: &[u8] = b"session-key-0123456789abcdef0123456789";
const NOW: i64 = 1_800_000_000;
const SB: &str = "abc12345";

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// An ES256 key pair: (PKCS#8 private PEM, SPKI public PEM).
fn es256_pair() -> (String, String) {
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let mut spki = hex("3059301306072a8648ce3d020106082a8648ce3d030107034200");
    spki.extend_from_slice(pair.public_key().as_ref());
    (pem("PRIVATE KEY", pkcs8.as_ref()), pem("PUBLIC KEY", &spki))
}

/// An Ed25519 key pair: (PKCS#8 private PEM, SPKI public PEM).
fn ed25519_pair() -> (String, String) {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let mut spki = hex("302a300506032b6570032100");
    spki.extend_from_slice(pair.public_key().as_ref());
    (pem("PRIVATE KEY", pkcs8.as_ref()), pem("PUBLIC KEY", &spki))
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn spec(kid: &str, alg: KeyAlg, secret_env: Option<&str>, file: Option<&std::path::Path>) -> PreviewKeySpec {
    PreviewKeySpec { kid: kid.into(), alg, secret_env: secret_env.map(Into::into), public_key_file: file.map(Into::into) }
}

fn env(name: &str) -> Option<Vec<u8>> {
    match name {
        "K1" => Some(K1.to_vec()),
        "K2" => Some(K2.to_vec()),
        "SESSION" => Some(SESSION.to_vec()),
        "SHORT" => Some(b"too-short".to_vec()),
        _ => None,
    }
}

fn keys(specs: Vec<PreviewKeySpec>) -> Keys {
    let t = Tokens { session_key_env: "SESSION".into(), preview_keys: specs, ..Tokens::default() };
    Keys::load(&t, env).unwrap_or_else(|e| panic!("{e:?}"))
}

fn hs(kid: Option<&str>, key: &[u8], sub: &str, port: Option<u16>, iat: i64, exp: i64) -> String {
    mint::preview_token(SigningKey::Hs256(key), kid, sub, port, iat, exp).unwrap()
}

fn verify(k: &Keys, token: &str, port: u16, now: i64) -> Result<Grant, ErrorCode> {
    verify_preview(k, token.strip_prefix("mp_").unwrap_or(token), SB, port, now)
}

#[test]
fn hs256_claims_and_every_failure_row() {
    let k = keys(vec![spec("k1", KeyAlg::HS256, Some("K1"), None)]);
    let ok = hs(Some("k1"), K1, SB, Some(5173), NOW, NOW + 3600);
    assert_eq!(verify(&k, &ok, 5173, NOW), Ok(Grant { expires: NOW + 3600, share: None, needs_password: false }));
    // One key: `kid` may be omitted.
    assert!(verify(&k, &hs(None, K1, SB, None, NOW, NOW + 60), 3000, NOW).is_ok(), "no port claim: any port");
    let invalid = Err(ErrorCode::PreviewTokenInvalid);
    assert_eq!(verify(&k, &ok, 3000, NOW), invalid, "port claim must match");
    assert_eq!(verify(&k, &hs(Some("k1"), K1, "other", None, NOW, NOW + 60), 5173, NOW), invalid, "wrong sandbox");
    assert_eq!(verify(&k, &hs(Some("k1"), K2, SB, None, NOW, NOW + 60), 5173, NOW), invalid, "bad signature");
    assert_eq!(verify(&k, &hs(Some("k9"), K1, SB, None, NOW, NOW + 60), 5173, NOW), invalid, "unknown kid");
    assert_eq!(verify(&k, &hs(Some("k1"), K1, SB, None, NOW, NOW + 86_401), 5173, NOW), invalid, "exp - iat over 24 h");
    assert!(verify(&k, &hs(Some("k1"), K1, SB, None, NOW, NOW + 86_400), 5173, NOW).is_ok(), "exactly 24 h is fine");
    assert_eq!(verify(&k, &hs(Some("k1"), K1, SB, None, NOW + 31, NOW + 60), 5173, NOW), invalid, "issued in the future");
    // Expiry with 30 s leeway: 1 s beyond it is expired.
    let t = hs(Some("k1"), K1, SB, None, NOW - 600, NOW - 30);
    assert!(verify(&k, &t, 5173, NOW).is_ok(), "inside the leeway");
    assert_eq!(verify(&k, &t, 5173, NOW + 1), Err(ErrorCode::PreviewTokenExpired));
    // Malformed.
    for bad in ["", "a.b", "a.b.c", "a.b.c.d", "....", &"x".repeat(5000), "eyJhbGciOiJIUzI1NiJ9..", "\u{0}.\u{0}.\u{0}"] {
        assert_eq!(verify(&k, bad, 5173, NOW), invalid, "{bad:?}");
    }
}

/// Re-signs `token` after replacing its payload (or header) with `json`.
fn tamper(token: &str, header: Option<&str>, payload: Option<&str>, key: &[u8]) -> String {
    let jws = token.strip_prefix("mp_").unwrap();
    let mut parts: Vec<String> = jws.split('.').map(str::to_string).collect();
    if let Some(h) = header {
        parts[0] = B64.encode(h);
    }
    if let Some(p) = payload {
        parts[1] = B64.encode(p);
    }
    let msg = format!("{}.{}", parts[0], parts[1]);
    let sig = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), msg.as_bytes());
    format!("mp_{msg}.{}", B64.encode(sig.as_ref()))
}

#[test]
fn tampering_none_and_claim_types() {
    let k = keys(vec![spec("k1", KeyAlg::HS256, Some("K1"), None)]);
    let ok = hs(Some("k1"), K1, SB, None, NOW, NOW + 60);
    let jws = ok.strip_prefix("mp_").unwrap();
    let (h, rest) = jws.split_once('.').unwrap();
    let (_, sig) = rest.split_once('.').unwrap();
    // A payload swapped under the original signature.
    let forged = B64.encode(format!(r#"{{"sub":"{SB}","iat":{NOW},"exp":{}}}"#, NOW + 86_000));
    assert_eq!(verify(&k, &format!("{h}.{forged}.{sig}"), 1, NOW), Err(ErrorCode::PreviewTokenInvalid));
    // alg none, with or without a signature.
    let none = tamper(&ok, Some(r#"{"alg":"none","kid":"k1"}"#), None, K1);
    assert_eq!(verify(&k, &none, 1, NOW), Err(ErrorCode::PreviewTokenInvalid));
    let unsigned = format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), rest.split_once('.').unwrap().0);
    assert_eq!(verify(&k, &unsigned, 1, NOW), Err(ErrorCode::PreviewTokenInvalid));
    // Correctly signed but with bad claims.
    for p in [
        format!(r#"{{"iat":{NOW},"exp":{}}}"#, NOW + 60),                                 // no sub
        format!(r#"{{"sub":"{SB}","exp":{}}}"#, NOW + 60),                                // no iat
        format!(r#"{{"sub":"{SB}","iat":{NOW}}}"#),                                       // no exp
        format!(r#"{{"sub":"{SB}","iat":"{NOW}","exp":{}}}"#, NOW + 60),                  // string iat
        format!(r#"{{"sub":"{SB}","iat":{NOW},"exp":{}.5}}"#, NOW + 60),                  // fractional exp
        format!(r#"{{"sub":"{SB}","iat":{NOW},"exp":{},"port":70000}}"#, NOW + 60),       // port out of range
        format!(r#"{{"sub":"{SB}","iat":{NOW},"exp":{},"nbf":{}}}"#, NOW + 60, NOW + 40), // not yet valid
        format!(r#"{{"sub":"{SB}","iat":{NOW},"exp":{}}}"#, NOW - 1),                     // exp before iat
        "[]".to_string(),
    ] {
        assert_eq!(verify(&k, &tamper(&ok, None, Some(&p), K1), 1, NOW), Err(ErrorCode::PreviewTokenInvalid), "{p}");
    }
    // Unknown claims are fine; critical header extensions are not.
    let extra = format!(r#"{{"sub":"{SB}","iat":{NOW},"exp":{},"aud":"x","jti":"1"}}"#, NOW + 60);
    assert!(verify(&k, &tamper(&ok, None, Some(&extra), K1), 1, NOW).is_ok());
    let crit = tamper(&ok, Some(r#"{"alg":"HS256","kid":"k1","crit":["exp"]}"#), None, K1);
    assert_eq!(verify(&k, &crit, 1, NOW), Err(ErrorCode::PreviewTokenInvalid));
}

#[test]
fn rotation_requires_kid_and_pins_alg() {
    let dir = tempfile::tempdir().unwrap();
    let (es_priv, es_pub) = es256_pair();
    let (ed_priv, ed_pub) = ed25519_pair();
    let es_file = dir.path().join("es.pem");
    let ed_file = dir.path().join("ed.pem");
    std::fs::write(&es_file, &es_pub).unwrap();
    std::fs::write(&ed_file, &ed_pub).unwrap();
    let k = keys(vec![
        spec("k1", KeyAlg::HS256, Some("K1"), None),
        spec("k2", KeyAlg::HS256, Some("K2"), None),
        spec("es", KeyAlg::ES256, None, Some(&es_file)),
        spec("ed", KeyAlg::EdDSA, None, Some(&ed_file)),
    ]);
    assert!(verify(&k, &hs(Some("k1"), K1, SB, None, NOW, NOW + 60), 1, NOW).is_ok());
    assert!(verify(&k, &hs(Some("k2"), K2, SB, None, NOW, NOW + 60), 1, NOW).is_ok());
    assert!(verify(&k, &hs(Some("k2"), K1, SB, None, NOW, NOW + 60), 1, NOW).is_err(), "k1's secret under k2's kid");
    assert!(verify(&k, &hs(None, K1, SB, None, NOW, NOW + 60), 1, NOW).is_err(), "kid is required with several keys");
    let es = mint::preview_token(SigningKey::Pem(KeyAlg::ES256, es_priv.as_bytes()), Some("es"), SB, None, NOW, NOW + 60).unwrap();
    let ed = mint::preview_token(SigningKey::Pem(KeyAlg::EdDSA, ed_priv.as_bytes()), Some("ed"), SB, None, NOW, NOW + 60).unwrap();
    assert!(verify(&k, &es, 1, NOW).is_ok(), "ES256");
    assert!(verify(&k, &ed, 1, NOW).is_ok(), "EdDSA");
    // The ES256 key's kid on an EdDSA token, and the reverse: refused.
    let ed_as_es = tamper(&ed, Some(r#"{"alg":"EdDSA","kid":"es"}"#), None, b"irrelevant");
    assert!(verify(&k, &ed_as_es, 1, NOW).is_err());
    // Algorithm confusion: an HS256 token whose HMAC secret is the ES256 public key.
    let confused = tamper(&es, Some(r#"{"alg":"HS256","kid":"es","typ":"JWT"}"#), None, es_pub.as_bytes());
    assert_eq!(verify(&k, &confused, 1, NOW), Err(ErrorCode::PreviewTokenInvalid));
    let confused_no_kid = tamper(&es, Some(r#"{"alg":"HS256"}"#), None, es_pub.as_bytes());
    assert!(verify(&k, &confused_no_kid, 1, NOW).is_err());
    // A tampered ES256 payload fails its signature.
    let jws = es.strip_prefix("mp_").unwrap();
    let (h, rest) = jws.split_once('.').unwrap();
    let sig = rest.split_once('.').unwrap().1;
    let forged = B64.encode(format!(r#"{{"sub":"{SB}","iat":{NOW},"exp":{}}}"#, NOW + 600));
    assert!(verify(&k, &format!("{h}.{forged}.{sig}"), 1, NOW).is_err());
}

#[test]
fn key_loading_errors() {
    let t = |specs| Tokens { session_key_env: "SHORT".into(), preview_keys: specs, ..Tokens::default() };
    let dir = tempfile::tempdir().unwrap();
    let (es_priv, _) = es256_pair();
    let private_file = dir.path().join("priv.pem");
    std::fs::write(&private_file, es_priv).unwrap();
    let errs = Keys::load(
        &t(vec![
            spec("a", KeyAlg::HS256, Some("UNSET"), None),
            spec("b", KeyAlg::HS256, Some("SHORT"), None),
            spec("c", KeyAlg::ES256, None, Some(&private_file)),
            spec("d", KeyAlg::EdDSA, Some("K1"), None),
            spec("e", KeyAlg::HS256, None, Some(&private_file)),
        ]),
        env,
    )
    .unwrap_err();
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "tokens.session_key_env",
            "tokens.preview_keys[0].secret_env",
            "tokens.preview_keys[1].secret_env",
            "tokens.preview_keys[2].public_key_file",
            "tokens.preview_keys[3].public_key_file",
            "tokens.preview_keys[4].secret_env"
        ],
        "{errs:?}"
    );
    assert!(errs[3].message.contains("no private key"), "a private key file is refused: {}", errs[3].message);
    // No session variable: not an error (the server generates one), but no session yet.
    let k = Keys::load(&Tokens { session_key_env: "UNSET".into(), ..Tokens::default() }, env).unwrap();
    assert!(!k.has_session_key());
    assert!(cookie::encode(&k, "h", &Session { kind: Kind::Preview, cross_site: false, expires: NOW + 1, share: None }).is_none());
    let k = k.with_session_key(SESSION);
    assert!(k.has_session_key());
}

fn table_with_shares(extra: &str) -> RouteTable {
    let toml = format!(
        r#"
[[workspaces]]
id = "ws_1"
slug = "one"

[[sandboxes]]
id = "{SB}"
workspace = "ws_1"
address = "10.0.0.1"
previews = [{{ port = 5173 }}, {{ port = 3000 }}]
{extra}"#
    );
    let cfg = Config::parse(&toml, None).unwrap_or_else(|e| panic!("{e}"));
    RouteTable::build(&cfg.domains, &cfg.branding, &cfg.state, 1).unwrap().with_access(std::sync::Arc::new(keys(vec![])))
}

fn share_record(id: &str, token: &str, port: Option<u16>, expires: Option<&str>, pw: Option<&str>) -> String {
    let sha: String = share_hash(token).iter().map(|b| format!("{b:02x}")).collect();
    let mut s = format!("\n[[share_tokens]]\nid = \"{id}\"\ntoken_sha256 = \"{sha}\"\nsandbox = \"{SB}\"\n");
    if let Some(p) = port {
        s += &format!("port = {p}\n");
    }
    if let Some(e) = expires {
        s += &format!("expires_at = \"{e}\"\n");
    }
    if let Some(h) = pw {
        s += &format!("password_hash = \"{h}\"\n");
    }
    s
}

#[test]
fn share_tokens() {
    let a = "ms_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let b = "ms_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";
    let c = "ms_CCCCCCCCCCCCCCCCCCCCCC";
    let extra = share_record("sh_a", a, Some(5173), None, None)
        + &share_record("sh_b", b, None, Some("2027-01-15T00:00:00Z"), None)
        + &share_record("sh_c", c, None, None, Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"));
    let t = table_with_shares(&extra);
    let g = verify_share(&t, a, SB, 5173, NOW).unwrap();
    assert_eq!(g, Grant { expires: NOW + 7 * 86_400, share: Some(share_hash(a)), needs_password: false });
    assert_eq!(verify_share(&t, a, SB, 3000, NOW), Err(ErrorCode::ShareTokenInvalid), "another port");
    assert_eq!(verify_share(&t, a, "other", 5173, NOW), Err(ErrorCode::ShareTokenInvalid), "another sandbox");
    let exp = Timestamp::parse_rfc3339("2027-01-15T00:00:00Z").unwrap().0;
    assert_eq!(verify_share(&t, b, SB, 3000, exp - 10).map(|g| g.expires), Ok(exp), "the session ends with the share");
    assert_eq!(verify_share(&t, b, SB, 3000, exp), Err(ErrorCode::ShareTokenExpired));
    assert!(verify_share(&t, c, SB, 3000, NOW).unwrap().needs_password);
    // Unknown, malformed, or too short.
    for bad in [
        "ms_DDDDDDDDDDDDDDDDDDDDDDDDDDDD",
        "ms_short",
        "ms_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "ms_",
        "ms_A/AAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        assert_eq!(verify_share(&t, bad, SB, 5173, NOW), Err(ErrorCode::ShareTokenInvalid), "{bad}");
    }
    // Revocation: the same grant against a table without the record.
    let without = table_with_shares(&share_record("sh_b", b, None, None, None));
    assert!(still_valid(&t, &g, SB, 5173, NOW));
    assert!(!still_valid(&without, &g, SB, 5173, NOW));
    assert_eq!(verify_token(&t, "xx_1", SB, 1, NOW), Err(ErrorCode::PreviewTokenInvalid));
    assert_eq!(verify_token(&t, a, SB, 5173, NOW).map(|g| g.share), Ok(Some(share_hash(a))));
}

#[test]
fn session_cookies_are_host_bound_and_tamper_evident() {
    let k = keys(vec![]);
    let host = "5173-abc12345.sandbox.miosa.app";
    let s = Session { kind: Kind::Share, cross_site: true, expires: NOW + 60, share: Some([7; 32]) };
    let v = cookie::encode(&k, host, &s).unwrap();
    assert!(v.len() < 100, "{v}");
    assert_eq!(cookie::decode(&k, host, &v, NOW), Some(s));
    assert_eq!(cookie::decode(&k, "3000-abc12345.sandbox.miosa.app", &v, NOW), None, "another port's host");
    assert_eq!(cookie::decode(&k, host, &v, NOW + 60), None, "expired");
    // Each byte changed, one at a time, breaks the MAC or the format.
    for i in 0..v.len() {
        let mut b = v.clone().into_bytes();
        b[i] = if b[i] == b'A' { b'B' } else { b'A' };
        let t = String::from_utf8(b).unwrap();
        assert_eq!(cookie::decode(&k, host, &t, NOW), None, "byte {i}: {t}");
    }
    // A preview session carries no share; a pending one does.
    let p = Session { kind: Kind::Preview, cross_site: false, expires: NOW + 5, share: None };
    assert_eq!(cookie::decode(&k, host, &cookie::encode(&k, host, &p).unwrap(), NOW), Some(p));
    assert!(cookie::decode(&k, host, "", NOW).is_none());
    assert!(cookie::decode(&k, host, &"A".repeat(500), NOW).is_none());
    // Another session key (another edge cluster) cannot read it.
    let t = Tokens { session_key_env: "K2".into(), ..Tokens::default() };
    let k2 = Keys::load(&t, env).unwrap();
    assert_eq!(cookie::decode(&k2, host, &v, NOW), None);
}

#[test]
fn cookie_lines_and_header_rewriting() {
    let secure_frame = cookie::Context { secure: true, cross_site: true };
    let line = cookie::set_cookie(secure_frame, secure_frame.session_name(), "v", 42);
    assert_eq!(line, "__Host-miosa_session=v; Path=/; Max-Age=42; HttpOnly; Secure; SameSite=None; Partitioned");
    let plain = cookie::Context { secure: false, cross_site: true };
    assert_eq!(cookie::set_cookie(plain, plain.session_name(), "v", 1), "miosa_session=v; Path=/; Max-Age=1; HttpOnly; SameSite=Lax");
    assert_eq!(
        cookie::clear_cookie(cookie::Context { secure: true, cross_site: false }, cookie::PENDING_SECURE),
        "__Host-miosa_share_pending=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Lax"
    );
    let headers: Vec<&[u8]> = vec![b"a=1; __Host-miosa_session=abc; b=2", b"miosa_session=plain"];
    assert_eq!(cookie::find(headers.iter().copied(), "__Host-miosa_session"), Some("abc"));
    assert_eq!(cookie::find(headers.iter().copied(), "miosa_session"), Some("plain"));
    assert_eq!(cookie::find(headers.iter().copied(), "c"), None);
    // An app's cookie of other bytes than UTF-8 does not hide the session beside it;
    // names are whole, values keep their `=`, spaces around either go.
    let headers: Vec<&[u8]> = vec![b"app=\xff\xfe; xmiosa_session=no;  miosa_session = v=1 ;b", b"miosa_session=second"];
    assert_eq!(cookie::find(headers.iter().copied(), "miosa_session"), Some("v=1"));
    assert_eq!(cookie::find(headers.iter().copied(), "app"), None, "not UTF-8");
    assert_eq!(cookie::find(headers.iter().copied(), "b"), None, "a name without a value");
    assert_eq!(cookie::without_edge_cookies(b"a=1; __Host-miosa_session=abc; b=2").as_deref(), Some(&b"a=1; b=2"[..]));
    assert_eq!(cookie::without_edge_cookies(b"__Host-miosa_session=abc;miosa_share_pending=x"), None);
    assert_eq!(cookie::without_edge_cookies(b"xmiosa_session=1; a=2").as_deref(), Some(&b"xmiosa_session=1; a=2"[..]));
}

#[test]
fn password_limits_forms_and_hashes() {
    let p = Passwords::new();
    let ip: std::net::IpAddr = "192.0.2.1".parse().unwrap();
    let other: std::net::IpAddr = "192.0.2.2".parse().unwrap();
    let share = [1u8; 32];
    for i in 0..10 {
        assert!(p.allowed(&share, ip, NOW + i), "try {i}");
        p.failed(&share, ip, NOW + i);
    }
    assert!(!p.allowed(&share, ip, NOW + 30), "the 11th try within the minute is refused");
    assert!(p.allowed(&share, other, NOW + 30), "per client IP");
    assert!(p.allowed(&[2; 32], ip, NOW + 30), "per share");
    assert!(p.allowed(&share, ip, NOW + 60), "a new minute");
    p.failed(&share, ip, NOW + 60);
    assert!(p.allowed(&share, ip, NOW + 61), "the window restarted");
    p.succeeded(&share, ip);

    assert_eq!(
        password::parse_form(b"next=%2Fa%3Fb%3D1&password=p%C3%A4ss+word&x=1"),
        password::Form { password: "päss word".into(), next: "/a?b=1".into() }
    );
    assert_eq!(password::parse_form(b"password=%zz%4"), password::Form { password: "%zz%4".into(), next: String::new() });
    for (next, safe) in [("/a/b?c=d", "/a/b?c=d"), ("//evil.example", "/"), ("/\\evil", "/"), ("https://x", "/"), ("", "/"), ("/a b", "/")]
    {
        assert_eq!(password::safe_next(next), safe, "{next}");
    }

    let h = password::hash("s3cret").unwrap();
    assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
    assert!(crate::schema::PasswordHash::try_from(h.as_str()).is_ok(), "the CLI's hashes pass state validation");
    assert!(password::verify_now(&h, "s3cret"));
    assert!(!password::verify_now(&h, "s3cret "));
    assert!(!password::verify_now("$argon2id$v=19$m=19456,t=2,p=1$bad", "x"));
}

#[test]
fn minted_share_tokens_have_the_contract_shape() {
    let (t, sha) = mint::share_token().unwrap();
    assert!(is_share_token(&t) && t.len() == 46, "{t}");
    assert_eq!(sha.len(), 64);
    let (t2, _) = mint::share_token().unwrap();
    assert_ne!(t, t2);
}

#[tokio::test]
async fn a_live_exchange_checks_its_share_once_until_the_table_changes() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    let a = "ms_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let current = Arc::new(Mutex::new(Arc::new(table_with_shares(&share_record("sh_a", a, None, None, None)))));
    let loads = Arc::new(AtomicUsize::new(0));
    let load = {
        let (current, loads) = (current.clone(), loads.clone());
        move || {
            loads.fetch_add(1, Ordering::SeqCst);
            current.lock().unwrap().clone()
        }
    };
    // The proxy's receiver was made at start; publishes since are unseen by its clones.
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    tx.send_replace(1);
    let mut live = Box::pin(until_revoked(load, Some(rx.clone()), share_hash(a), SB, 5173));
    let short = Duration::from_millis(30);
    assert!(tokio::time::timeout(short, &mut live).await.is_err(), "the share holds");
    assert_eq!(loads.load(Ordering::SeqCst), 1, "one check when the exchange starts, not one per unseen publish");
    tx.send_replace(2);
    assert!(tokio::time::timeout(short, &mut live).await.is_err(), "a publish that keeps the share");
    assert_eq!(loads.load(Ordering::SeqCst), 2, "rechecked once per publish");
    *current.lock().unwrap() = Arc::new(table_with_shares(""));
    tx.send_replace(3);
    tokio::time::timeout(Duration::from_secs(5), &mut live).await.expect("the exchange ends with its share");
    assert_eq!(loads.load(Ordering::SeqCst), 3);
}
