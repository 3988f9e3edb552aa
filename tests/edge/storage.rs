//! The storage front door end to end (CONTRACT §12): buckets in the routing state, the
//! S3 endpoint proxied unchanged to a real store, and egress per bucket.
//!
//! The store is `moto_server` ([`crate::s3::S3Server`]); with its signature checks on,
//! a real SDK (boto3, installed with moto) signs requests for the edge's storage host and
//! the store verifies them, so anything the edge changed on the way would fail there.
//! Where a test must see exactly what reached the store, the endpoint is a recording
//! origin ([`crate::support::Origin`]) instead.

use crate::s3::{S3Server, KEY_ID, KEY_SECRET};
use crate::support::{eventually, raw_request, Edge, Origin};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The routing state of these tests: workspace `ws_1`, bucket `bk_1` = store bucket
/// `proj-uploads`, alias `proj`.
const STATE: &str = r#"
[[workspaces]]
id = "ws_1"
slug = "acme"

[[buckets]]
id = "bk_1"
workspace = "ws_1"
bucket = "proj-uploads"
alias = "proj"
"#;

fn storage_section(endpoint: &str) -> String {
    format!("[storage]\nendpoint = \"{endpoint}\"\n")
}

fn storage_env() -> Vec<(&'static str, String)> {
    vec![("STORAGE_KEY_ID", KEY_ID.into()), ("STORAGE_KEY_SECRET", KEY_SECRET.into())]
}

/// Runs a Python script with boto3 (moto's dependency); `*.localhost` resolves to the
/// loopback inside it, as browsers resolve it. Returns stdout; panics with stderr.
fn python(script: &str, env: &[(&str, String)]) -> String {
    let prelude = r#"
import socket, sys, json
_gai = socket.getaddrinfo
def _loopback(host, *a, **k):
    if isinstance(host, str) and (host == "localhost" or host.endswith(".localhost")):
        host = "127.0.0.1"
    return _gai(host, *a, **k)
socket.getaddrinfo = _loopback
import boto3
from botocore.config import Config
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!("{prelude}\n{script}"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("python3 (scripts/deps installs boto3 with moto)");
    assert!(out.status.success(), "python failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The edge's storage endpoint for an SDK: `http://storage.localhost:PORT`.
fn endpoint_of(edge: &Edge) -> String {
    format!("http://storage.localhost:{}", edge.addr.port())
}

#[tokio::test]
async fn the_s3_endpoint_passes_requests_unchanged_and_no_cookie_reaches_the_store() {
    let store = Origin::start("store", "127.0.0.1").await;
    let log = tempfile::tempdir().expect("tempdir");
    let access = log.path().join("access.log");
    let body = format!("[log]\naccess = \"{}\"\n{}{STATE}", access.display(), storage_section(&format!("http://{}", store.addr)));
    let edge = Edge::start_env(&storage_env(), &body).await;
    let host = format!("storage.localhost:{}", edge.addr.port());
    let target = "/proj-uploads/a%20b/..%2F%2e%2E/c.txt?partNumber=2&uploadId=x%2By&X-Amz-Signature=c0ffee";
    let r = raw_request(
        edge.addr,
        &format!(
            "PUT {target} HTTP/1.1\r\nHost: {host}\r\nCookie: miosa_session=secret; app=1\r\nX-Miosa-Token: t\r\n\
             x-amz-content-sha256: UNSIGNED-PAYLOAD\r\nAuthorization: AWS4-HMAC-SHA256 Credential=k/20260101/us-east-1/s3/aws4_request\r\n\
             Content-Length: 5\r\nConnection: close\r\n\r\nhello"
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), edge.log());
    assert_eq!(r.header("x-origin"), Some("store"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "every storage response");
    let seen = r.json();
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["path"], target, "path and query byte for byte");
    assert_eq!(seen["body_len"], 5);
    let headers = &seen["headers"];
    assert_eq!(headers["host"][0], host, "Host unchanged: signatures cover it");
    assert_eq!(headers["x-amz-content-sha256"][0], "UNSIGNED-PAYLOAD");
    assert!(headers["authorization"][0].as_str().is_some_and(|a| a.starts_with("AWS4-HMAC-SHA256")), "{headers}");
    assert!(headers.get("cookie").is_none(), "no cookie reaches the store: {headers}");
    assert!(headers.get("x-miosa-token").is_none(), "credential firewall: {headers}");

    // Egress of a path-style request is the bucket's and its workspace's.
    let usage = eventually(Duration::from_secs(10), || async {
        let u = edge.api("GET", "/v1/usage", None).await.json();
        let bucket = u["buckets"].as_array()?.iter().find(|e| e["id"] == "bk_1")?.clone();
        let ws = u["workspaces"].as_array()?.iter().find(|e| e["id"] == "ws_1")?.clone();
        Some((bucket, ws))
    })
    .await
    .expect("bk_1 and ws_1 in /v1/usage");
    assert_eq!(usage.0["requests"], 1);
    assert_eq!(usage.0["bytes"].as_u64(), Some(r.body.len() as u64), "egress: the body bytes sent");
    assert_eq!(usage.1["bytes"], usage.0["bytes"]);

    // The access log names the bucket and never the presigned signature.
    let line =
        eventually(Duration::from_secs(10), || async { std::fs::read_to_string(&access).ok().filter(|l| l.contains("proj-uploads")) })
            .await
            .expect("an access-log line");
    assert!(line.contains("X-Amz-Signature=REDACTED") && !line.contains("c0ffee"), "{line}");
    assert!(line.contains(r#""bucket":"bk_1""#) && line.contains(r#""route":"storage""#), "{line}");
}

#[tokio::test]
async fn without_storage_the_storage_hosts_are_unknown_and_buckets_are_still_state() {
    let edge = Edge::start(STATE).await;
    for host in ["storage.localhost", "proj.storage.localhost"] {
        let r = edge.get(host, "/x").await;
        assert_eq!((r.status, r.code()), (404, "unknown_host".into()), "{host}");
    }
    // Buckets through the control API, validated like the other kinds.
    let r = edge.api("PUT", "/v1/workspaces/ws_2", Some(r#"{"id":"ws_2","slug":"second"}"#)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b = r#"{"id":"bk_2","workspace":"ws_2","bucket":"miosa-proj_2","alias":"two","public":true,
                "domains":[{"host":"assets.customer.com","verified":true}]}"#;
    let r = edge.api("PUT", "/v1/buckets/bk_2", Some(b)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = edge.api("GET", "/v1/buckets/bk_2", None).await.json();
    assert_eq!(got["bucket"], "miosa-proj_2");
    assert_eq!(got["public"], true);
    let state = edge.api("GET", "/v1/state", None).await.json();
    assert_eq!(state["buckets"].as_array().map(Vec::len), Some(1), "the API part: {state}");
    let dup = r#"{"id":"bk_3","workspace":"ws_1","bucket":"other","alias":"two"}"#;
    let r = edge.api("PUT", "/v1/buckets/bk_3", Some(dup)).await;
    assert_eq!((r.status, r.json()["error"]["path"].as_str()), (400, Some("alias")), "{}", r.text());
    let pinned = r#"{"id":"bk_3","workspace":"ws_1","bucket":"proj-uploads","alias":"three"}"#;
    let r = edge.api("PUT", "/v1/buckets/bk_3", Some(pinned)).await;
    assert_eq!((r.status, r.json()["error"]["path"].as_str()), (400, Some("bucket")), "{}", r.text());
    let in_zone = r#"{"id":"bk_3","workspace":"ws_1","bucket":"b3","alias":"three","domains":[{"host":"x.storage.localhost"}]}"#;
    let r = edge.api("PUT", "/v1/buckets/bk_3", Some(in_zone)).await;
    assert_eq!((r.status, r.json()["error"]["path"].as_str()), (400, Some("domains[0].host")), "{}", r.text());
    let r = edge.api("DELETE", "/v1/workspaces/ws_2", None).await;
    assert_eq!(r.status, 400, "a workspace in use by a bucket stays: {}", r.text());
    let r = edge.api("DELETE", "/v1/buckets/bk_2", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = edge.api("DELETE", "/v1/workspaces/ws_2", None).await;
    assert_eq!(r.status, 200, "then it goes: {}", r.text());
    let r = edge.api("DELETE", "/v1/buckets/bk_1", None).await;
    assert_eq!(r.status, 409, "a TOML bucket is the operator's: {}", r.text());
}

#[tokio::test]
async fn a_config_with_a_bad_storage_section_is_refused_with_every_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("edge.toml");
    std::fs::write(
        &file,
        "[storage]\nendpoint = \"ftp://store\"\nregion = \"us east\"\naccess_key_env = \"NOT_SET_ANYWHERE_1\"\n\n\
         [[buckets]]\nid = \"b\"\nworkspace = \"nope\"\nbucket = \"a/b\"\nalias = \"x\"\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_miosa-edge")).args(["check", "--config"]).arg(&file).output().expect("run check");
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for needle in ["storage.endpoint", "storage.region", "storage.access_key_env", "$NOT_SET_ANYWHERE_1 is not set", "buckets[0].bucket"] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
}

/// moto with signature checks on after the set-up's unsigned calls: `GET /` (readiness)
/// and three IAM calls making a user with S3 rights; returns the server and its keys.
async fn verifying_store() -> (S3Server, String, String) {
    let s3 = S3Server::start_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "4")]).await;
    let out = python(
        r#"
import os
iam = boto3.client("iam", endpoint_url=os.environ["S3"], region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam.create_user(UserName="edge")
k = iam.create_access_key(UserName="edge")["AccessKey"]
iam.put_user_policy(UserName="edge", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
print(k["AccessKeyId"], k["SecretAccessKey"])
"#,
        &[("S3", s3.endpoint())],
    );
    let mut it = out.split_whitespace();
    let (id, secret) = (it.next().expect("key id").to_string(), it.next().expect("secret").to_string());
    (s3, id, secret)
}

#[tokio::test]
async fn sdk_requests_through_the_edge_verify_at_the_store() {
    let (s3, id, secret) = verifying_store().await;
    let env = vec![("STORAGE_KEY_ID", id.clone()), ("STORAGE_KEY_SECRET", secret.clone())];
    let edge = Edge::start_env(&env, &format!("{}{STATE}", storage_section(&s3.endpoint()))).await;
    let out = python(
        r#"
import os, io, hashlib
cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 1})
s3 = boto3.client("s3", endpoint_url=os.environ["EP"], region_name="us-east-1",
                  aws_access_key_id=os.environ["ID"], aws_secret_access_key=os.environ["SECRET"], config=cfg)
s3.create_bucket(Bucket="proj-uploads")
s3.put_object(Bucket="proj-uploads", Key="docs/hello world.txt", Body=b"hello", ContentType="text/plain")
# A multipart upload (3 parts of 5 MiB + a tail) streamed through the edge.
data = bytes((i * 2654435761 >> 24) & 0xff for i in range(16 * 1024 * 1024 + 123))
from boto3.s3.transfer import TransferConfig
s3.upload_fileobj(io.BytesIO(data), "proj-uploads", "big.bin", Config=TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20))
got = s3.get_object(Bucket="proj-uploads", Key="big.bin")["Body"].read()
print("big", hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), len(got))
print("hello", s3.get_object(Bucket="proj-uploads", Key="docs/hello world.txt")["Body"].read().decode())
print("keys", sorted(o["Key"] for o in s3.list_objects_v2(Bucket="proj-uploads")["Contents"]))
bad = boto3.client("s3", endpoint_url=os.environ["EP"], region_name="us-east-1",
                   aws_access_key_id=os.environ["ID"], aws_secret_access_key="wrong", config=cfg)
try:
    bad.get_object(Bucket="proj-uploads", Key="big.bin")
    print("refused", False)
except Exception as e:
    print("refused", "SignatureDoesNotMatch" in str(e))
"#,
        &[("EP", endpoint_of(&edge)), ("ID", id), ("SECRET", secret)],
    );
    assert!(out.contains(&format!("big True {}", 16 * 1024 * 1024 + 123)), "{out}\n{}", edge.log());
    assert!(out.contains("hello hello"), "{out}");
    assert!(out.contains("keys ['big.bin', 'docs/hello world.txt']"), "{out}");
    assert!(out.contains("refused True"), "a wrong signature is the store's to refuse: {out}");
    drop(s3);
}

#[tokio::test]
async fn presigned_urls_made_for_the_edge_work_through_it() {
    let s3 = S3Server::start().await;
    s3.create_bucket("proj-uploads").await;
    let edge = Edge::start_env(&storage_env(), &format!("{}{STATE}", storage_section(&s3.endpoint()))).await;
    let out = python(
        r#"
import os
cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"})
s3 = boto3.client("s3", endpoint_url=os.environ["EP"], region_name="us-east-1",
                  aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret", config=cfg)
print(s3.generate_presigned_url("put_object", Params={"Bucket": "proj-uploads", "Key": "up/page.html", "ContentType": "text/html"}, ExpiresIn=600))
print(s3.generate_presigned_url("get_object", Params={"Bucket": "proj-uploads", "Key": "up/page.html"}, ExpiresIn=600))
"#,
        &[("EP", endpoint_of(&edge))],
    );
    let mut urls = out.lines();
    let (put, get) = (urls.next().expect("put url"), urls.next().expect("get url"));
    let path_of = |u: &str| u.split_once(&format!(":{}", edge.addr.port())).expect("edge url").1.to_string();
    let host = format!("storage.localhost:{}", edge.addr.port());
    let page = b"<script>alert(1)</script>";
    let r = raw_request(
        edge.addr,
        &format!(
            "PUT {} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            path_of(put),
            page.len(),
            String::from_utf8_lossy(page)
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), s3.log());
    let r = raw_request(edge.addr, &format!("GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n", path_of(get))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, page);
    assert_eq!(r.header("content-security-policy"), Some("sandbox"), "an uploaded page never runs script on the storage origin");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).expect("VmHWM")
}

#[tokio::test]
async fn uploads_stream_through_the_s3_endpoint_with_bounded_memory() {
    // A sink that reads the whole body at its own pace and answers its length.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sink_addr: SocketAddr = sink.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = sink.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut head = Vec::new();
                let mut total = 0u64;
                loop {
                    let Ok(n) = s.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    if head.len() < 4096 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        head.extend_from_slice(&buf[..n]);
                        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            total += (head.len() - end - 4) as u64;
                        }
                    } else {
                        total += n as u64;
                    }
                    if total >= 256 << 20 {
                        let body = total.to_string();
                        let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes()).await;
                        return;
                    }
                }
            });
        }
    });
    let edge = Edge::start_env(&storage_env(), &format!("{}{STATE}", storage_section(&format!("http://{sink_addr}")))).await;
    let before = peak_rss_kib(edge.child.id());
    let mut s = TcpStream::connect(edge.addr).await.expect("connect");
    let len: u64 = 256 << 20;
    let head = format!(
        "PUT /proj-uploads/huge.bin HTTP/1.1\r\nHost: storage.localhost:{}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
        edge.addr.port()
    );
    s.write_all(head.as_bytes()).await.expect("head");
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..256 {
        s.write_all(&chunk).await.expect("body");
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut answer)).await.expect("answer in time").expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200") && text.ends_with(&len.to_string()), "{text}\n{}", edge.log());
    let grew = peak_rss_kib(edge.child.id()).saturating_sub(before);
    assert!(grew < 32 * 1024, "a 256 MiB upload grew the edge's peak RSS by {grew} KiB");
}

/// Two buckets: `proj` (private: only objects marked public are served) and `pub`
/// (public), with a verified and an unverified domain.
const OBJECT_STATE: &str = r##"
[[workspaces]]
id = "ws_1"
slug = "acme"
branding = { accent_color = "#123456" }

[[buckets]]
id = "bk_1"
workspace = "ws_1"
bucket = "proj-uploads"
alias = "proj"

[[buckets]]
id = "bk_pub"
workspace = "ws_1"
bucket = "pub-assets"
alias = "pub"
public = true
domains = [{ host = "files.customer.test", verified = true }, { host = "cdn.customer.test" }]
"##;

const PAGE: &[u8] = b"<script>alert(1)</script>";
const SVG: &[u8] = b"<svg xmlns='http://www.w3.org/2000/svg'/>";
const PNG: &[u8] = b"\x89PNG....";

async fn object_store_with_objects() -> S3Server {
    let s3 = S3Server::start().await;
    s3.create_bucket("proj-uploads").await;
    s3.create_bucket("pub-assets").await;
    let public = [("x-amz-meta-miosa-public", "true"), ("Content-Type", "text/plain")];
    s3.put_with_headers("proj-uploads", "docs/public.txt", &public, b"hello public world").await;
    s3.put_with_headers("proj-uploads", "docs/hello world.txt", &[("x-amz-meta-miosa-public", "TRUE")], b"spaced").await;
    s3.put_with_headers("proj-uploads", "docs/100%25.txt", &[("x-amz-meta-miosa-public", "true")], b"percent").await;
    s3.put_with_headers("proj-uploads", "private.txt", &[("Content-Type", "text/plain")], b"secret").await;
    s3.put_with_headers("pub-assets", "page.html", &[("Content-Type", "text/html"), ("Cache-Control", "max-age=3600")], PAGE).await;
    s3.put_with_headers("pub-assets", "logo.svg", &[("Content-Type", "image/svg+xml")], SVG).await;
    s3.put_with_headers("pub-assets", "pixel.png", &[("Content-Type", "image/png")], PNG).await;
    s3
}

#[tokio::test]
async fn public_objects_are_served_private_and_missing_ones_are_one_404() {
    let s3 = object_store_with_objects().await;
    let edge = Edge::start_env(&storage_env(), &format!("{}{OBJECT_STATE}", storage_section(&s3.endpoint()))).await;
    let r = edge.get("proj.storage.localhost", "/docs/public.txt").await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello public world"), "{}\n{}", edge.log(), s3.log());
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.header("content-length"), Some("18"));
    assert_eq!(r.header("cache-control"), Some("public, max-age=60"), "the default for objects without their own");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert!(r.header("etag").is_some_and(|e| e.starts_with('"')), "{:?}", r.headers);
    assert!(r.header("last-modified").is_some_and(|l| l.ends_with(" GMT")), "{:?}", r.headers);
    assert!(r.header("content-security-policy").is_none(), "plain text runs nothing");
    assert!(r.header("set-cookie").is_none() && r.header("x-request-id").is_some());
    let etag = r.header("etag").expect("etag").to_string();

    // The key is the path percent-decoded exactly once.
    let r = edge.get("proj.storage.localhost", "/docs/hello%20world.txt").await;
    assert_eq!((r.status, r.text().as_str()), (200, "spaced"), "metadata compares case-insensitively");
    let r = edge.get("proj.storage.localhost", "/docs/100%2525.txt").await;
    assert_eq!((r.status, r.text().as_str()), (200, "percent"), "`%2525` names `%25`, not `%`");

    // Private and missing: the same answer.
    let private = edge.get("proj.storage.localhost", "/private.txt").await;
    let missing = edge.get("proj.storage.localhost", "/missing.txt").await;
    assert_eq!((private.status, private.code()), (404, "object_not_found".into()));
    assert_eq!((missing.status, missing.body.clone()), (private.status, private.body.clone()), "indistinguishable");
    for path in ["/", "/docs/../private.txt", "/a//b", "/%ff"] {
        let r = edge.get("proj.storage.localhost", path).await;
        assert_eq!((r.status, r.code()), (404, "object_not_found".into()), "{path}: {}", r.text());
    }
    let page = edge.request("GET /private.txt HTTP/1.1\r\nHost: proj.storage.localhost\r\nAccept: text/html\r\n").await;
    assert_eq!(page.status, 404);
    assert!(page.text().contains("#123456"), "the workspace's branded page");

    // HEAD, Range, conditionals, methods.
    let r = edge.request("HEAD /docs/public.txt HTTP/1.1\r\nHost: proj.storage.localhost\r\n").await;
    assert_eq!((r.status, r.header("content-length"), r.body.len()), (200, Some("18"), 0));
    let r = edge.request("GET /docs/public.txt HTTP/1.1\r\nHost: proj.storage.localhost\r\nRange: bytes=6-11\r\n").await;
    assert_eq!((r.status, r.text().as_str(), r.header("content-range")), (206, "public", Some("bytes 6-11/18")));
    let r = edge.request("GET /docs/public.txt HTTP/1.1\r\nHost: proj.storage.localhost\r\nRange: bytes=-5\r\n").await;
    assert_eq!((r.status, r.text().as_str()), (206, "world"));
    let r = edge.request("GET /docs/public.txt HTTP/1.1\r\nHost: proj.storage.localhost\r\nRange: bytes=100-200\r\n").await;
    assert_eq!((r.status, r.header("content-range")), (416, Some("bytes */18")), "{}", r.text());
    let r = edge.request("GET /private.txt HTTP/1.1\r\nHost: proj.storage.localhost\r\nRange: bytes=100-200\r\n").await;
    assert_eq!(r.status, 404, "a private object's size is not told either");
    let r = edge.request(&format!("GET /docs/public.txt HTTP/1.1\r\nHost: proj.storage.localhost\r\nIf-None-Match: {etag}\r\n")).await;
    assert_eq!((r.status, r.body.len(), r.header("etag")), (304, 0, Some(etag.as_str())));
    let r = edge.request("GET /private.txt HTTP/1.1\r\nHost: proj.storage.localhost\r\nIf-None-Match: *\r\n").await;
    assert_eq!(r.status, 404, "a condition does not reveal a private object");
    let r = edge.request("POST /docs/public.txt HTTP/1.1\r\nHost: proj.storage.localhost\r\nContent-Length: 0\r\n").await;
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));

    // A public bucket: every object; the object's own Cache-Control; CSP sandbox on
    // HTML and SVG, not on images; its verified domain, and 421 on the unverified one.
    let r = edge.get("pub.storage.localhost", "/page.html").await;
    assert_eq!((r.status, r.header("content-security-policy"), r.header("cache-control")), (200, Some("sandbox"), Some("max-age=3600")));
    let r = edge.get("files.customer.test", "/logo.svg").await;
    assert_eq!((r.status, r.header("content-security-policy")), (200, Some("sandbox")));
    let r = edge.get("files.customer.test", "/pixel.png").await;
    assert_eq!((r.status, r.header("content-security-policy"), r.header("content-type")), (200, None, Some("image/png")));
    let r = edge.get("cdn.customer.test", "/pixel.png").await;
    assert_eq!((r.status, r.code()), (421, "domain_not_verified".into()));
    let r = edge.get("nope.storage.localhost", "/pixel.png").await;
    assert_eq!((r.status, r.code()), (404, "unknown_host".into()));

    // Egress per bucket: the body bytes of what was sent.
    let u = edge.api("GET", "/v1/usage", None).await.json();
    let pub_bytes = u["buckets"].as_array().and_then(|b| b.iter().find(|e| e["id"] == "bk_pub")).map(|e| e["bytes"].clone());
    let expected = PAGE.len() + SVG.len() + PNG.len();
    assert_eq!(pub_bytes, Some(serde_json::json!(expected)), "{u}");
}

#[tokio::test]
async fn a_store_that_refuses_or_stalls_is_502_or_504() {
    let refused = crate::support::closed_port("127.0.0.1");
    let edge = Edge::start_env(
        &storage_env(),
        &format!("{}timeout_ms = 500\n{OBJECT_STATE}", storage_section(&format!("http://127.0.0.1:{refused}"))),
    )
    .await;
    let r = edge.get("pub.storage.localhost", "/x").await;
    assert_eq!((r.status, r.code()), (502, "storage_unavailable".into()), "{}", r.text());
    let page = edge.request("GET /x HTTP/1.1\r\nHost: pub.storage.localhost\r\nAccept: text/html\r\n").await;
    assert!(page.text().contains("#123456") && page.status == 502, "the tenant's page");
    // A store that takes the connection and never answers.
    let stall = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let stall_addr = stall.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut socks = Vec::new();
        while let Ok((s, _)) = stall.accept().await {
            socks.push(s);
        }
    });
    edge.write_config(&format!("{}timeout_ms = 500\n{OBJECT_STATE}", storage_section(&format!("http://{stall_addr}"))));
    let r = eventually(Duration::from_secs(10), || async {
        let r = edge.get("pub.storage.localhost", "/x").await;
        (r.status != 502).then_some(r)
    })
    .await
    .expect("the reload takes the new endpoint");
    assert_eq!((r.status, r.code()), (504, "upstream_timeout".into()), "{}", r.text());
    held.abort();
}

#[tokio::test]
async fn storage_reloads_live() {
    let s3 = object_store_with_objects().await;
    let edge = Edge::start_env(&storage_env(), OBJECT_STATE).await;
    let r = edge.get("pub.storage.localhost", "/pixel.png").await;
    assert_eq!((r.status, r.code()), (404, "unknown_host".into()), "no [storage] yet");
    edge.write_config(&format!("{}{OBJECT_STATE}", storage_section(&s3.endpoint())));
    let served = eventually(Duration::from_secs(10), || async {
        let r = edge.get("pub.storage.localhost", "/pixel.png").await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert!(served.is_some(), "[storage] added by a reload serves objects: {}", edge.log());
}

#[tokio::test]
async fn a_large_object_streams_to_a_slow_client_with_flat_memory() {
    let s3 = S3Server::start().await;
    s3.create_bucket("pub-assets").await;
    let len = 100usize << 20;
    let big: Vec<u8> = (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0]).collect();
    s3.put_with_headers("pub-assets", "big.bin", &[("Content-Type", "application/octet-stream")], &big).await;
    s3.put_with_headers("pub-assets", "small.txt", &[], b"warm").await;
    let edge = Edge::start_env(&storage_env(), &format!("{}{OBJECT_STATE}", storage_section(&s3.endpoint()))).await;
    // Warm: the store's client, its connection pool and TLS roots are set up by a first
    // read, so what follows measures the streaming alone.
    let r = edge.get("pub.storage.localhost", "/small.txt").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let before = peak_rss_kib(edge.child.id());
    let mut s = TcpStream::connect(edge.addr).await.expect("connect");
    s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: pub.storage.localhost\r\nConnection: close\r\n\r\n").await.expect("request");
    // About 24 MB/s: 64 KiB, then a pause.
    let mut got = Vec::with_capacity(len + 4096);
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf)).await.expect("in time").expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        tokio::time::sleep(Duration::from_micros(2500)).await;
    }
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got[..end]));
    assert!(got[end..] == big[..], "the object, byte for byte ({} of {len} bytes)", got.len() - end);
    let grew = peak_rss_kib(edge.child.id()).saturating_sub(before);
    // The issue's bound for 100 MiB. Measured: 12-15 MiB in a debug build, the same for
    // 48 or 144 MiB (buffers and the allocator's pages, not the object); 5-6 MiB in release.
    assert!(grew < 32 * 1024, "a 100 MiB object to a slow client grew the edge's peak RSS by {grew} KiB");
}

#[tokio::test]
async fn a_client_that_leaves_cancels_the_store_read() {
    // A store whose every object is 1 GiB, sent for as long as someone reads; it tells
    // when the edge closed its connection.
    let store = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let store_addr = store.local_addr().expect("addr");
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = store.accept().await {
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                let mut head = [0u8; 8192];
                let _ = s.read(&mut head).await;
                let len: u64 = 1 << 30;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nETag: \"big\"\r\n\
                     Last-Modified: Mon, 07 Dec 2026 00:00:00 GMT\r\n\r\n"
                );
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![0u8; 64 * 1024];
                let mut sent = 0u64;
                while sent < len {
                    if s.write_all(&chunk).await.is_err() {
                        let _ = closed.send(sent);
                        return;
                    }
                    sent += chunk.len() as u64;
                }
            });
        }
    });
    let edge = Edge::start_env(&storage_env(), &format!("{}{OBJECT_STATE}", storage_section(&format!("http://{store_addr}")))).await;
    let mut c = TcpStream::connect(edge.addr).await.expect("connect");
    c.write_all(b"GET /huge.bin HTTP/1.1\r\nHost: pub.storage.localhost\r\n\r\n").await.expect("request");
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while got < 4 << 20 {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await.expect("bytes flow").expect("read");
        assert!(n > 0, "the edge ended the response early");
        got += n;
    }
    drop(c);
    let sent = tokio::time::timeout(Duration::from_secs(10), closed_rx.recv()).await.expect("the store read is cancelled").expect("sent");
    assert!(sent < 256 << 20, "the edge read {sent} bytes of the store's body for a client that took 4 MiB");
}

#[tokio::test]
async fn public_objects_are_read_with_requests_the_store_verifies() {
    let (s3, id, secret) = verifying_store().await;
    python(
        r#"
import os
cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"})
s3 = boto3.client("s3", endpoint_url=os.environ["S3"], region_name="us-east-1",
                  aws_access_key_id=os.environ["ID"], aws_secret_access_key=os.environ["SECRET"], config=cfg)
s3.create_bucket(Bucket="pub-assets")
s3.put_object(Bucket="pub-assets", Key="dir/hello world.txt", Body=b"signed hello", ContentType="text/plain")
"#,
        &[("S3", s3.endpoint()), ("ID", id.clone()), ("SECRET", secret.clone())],
    );
    let section = storage_section(&s3.endpoint());
    let edge =
        Edge::start_env(&[("STORAGE_KEY_ID", id.clone()), ("STORAGE_KEY_SECRET", secret)], &format!("{section}{OBJECT_STATE}")).await;
    let r = edge.get("pub.storage.localhost", "/dir/hello%20world.txt").await;
    assert_eq!((r.status, r.text().as_str()), (200, "signed hello"), "{}\n{}", edge.log(), s3.log());
    let r = edge.request("GET /dir/hello%20world.txt HTTP/1.1\r\nHost: pub.storage.localhost\r\nRange: bytes=7-11\r\n").await;
    assert_eq!((r.status, r.text().as_str()), (206, "hello"), "a signed Range");
    let r = edge.request("HEAD /dir/hello%20world.txt HTTP/1.1\r\nHost: pub.storage.localhost\r\n").await;
    assert_eq!((r.status, r.header("content-length")), (200, Some("12")));
    // The same edge with a wrong secret: the store refuses every read.
    let wrong =
        Edge::start_env(&[("STORAGE_KEY_ID", id), ("STORAGE_KEY_SECRET", "not-the-secret".into())], &format!("{section}{OBJECT_STATE}"))
            .await;
    let r = wrong.get("pub.storage.localhost", "/dir/hello%20world.txt").await;
    assert_eq!((r.status, r.code()), (502, "storage_unavailable".into()), "{}", r.text());
}
