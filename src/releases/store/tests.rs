use super::*;
use std::ffi::OsString;

fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
    pairs.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))).collect()
}

async fn dir_with(name: &str, bytes: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    tokio::fs::write(dir.path().join(name), bytes).await.expect("write");
    dir
}

#[tokio::test]
async fn dir_store_copies_the_archive() {
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let src = dir_with("abc.tar.gz", &body).await;
    let out = tempfile::tempdir().expect("tempdir");
    let dest = out.path().join("dl");
    let store = DirStore { root: src.path().to_owned() };
    let n = store.fetch("abc.tar.gz", &dest, body.len() as u64).await.expect("fetch");
    assert_eq!(n, body.len() as u64);
    assert_eq!(tokio::fs::read(&dest).await.expect("read"), body);
}

#[tokio::test]
async fn dir_store_missing_is_not_found() {
    let src = tempfile::tempdir().expect("tempdir");
    let dest = src.path().join("dl");
    let store = DirStore { root: src.path().to_owned() };
    let err = store.fetch("nope.tar.gz", &dest, 1 << 20).await.expect_err("missing");
    assert!(matches!(&err, StoreError::NotFound(n) if n == "nope.tar.gz"), "{err:?}");
    assert!(!dest.exists());
    // A missing root directory is the same answer.
    let store = DirStore { root: src.path().join("absent") };
    let err = store.fetch("nope.tar.gz", &dest, 1 << 20).await.expect_err("missing");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn dir_store_refuses_too_large_and_leaves_nothing() {
    let src = dir_with("big.tar.gz", &[7u8; 1001]).await;
    let dest = src.path().join("dl");
    let store = DirStore { root: src.path().to_owned() };
    let err = store.fetch("big.tar.gz", &dest, 1000).await.expect_err("too large");
    assert!(matches!(&err, StoreError::TooLarge { name, limit: 1000 } if name == "big.tar.gz"), "{err:?}");
    assert_eq!(err.to_string(), "release archive big.tar.gz is larger than 1000 bytes");
    assert!(!dest.exists());
    // Exactly at the limit is fine.
    assert_eq!(store.fetch("big.tar.gz", &dest, 1001).await.expect("fetch"), 1001);
}

#[tokio::test]
async fn dir_store_counts_while_copying() {
    // The length check passes, then the object grows: the copy still stops at the limit.
    let src = dir_with("grow.tar.gz", &[1u8; 10]).await;
    let dest = src.path().join("dl");
    let mut out = Download::create("grow.tar.gz", &dest, 16).await.expect("create");
    out.write(&[0u8; 10]).await.expect("first chunk");
    let err = out.write(&[0u8; 10]).await.expect_err("past the limit");
    assert!(matches!(err, StoreError::TooLarge { limit: 16, .. }), "{err:?}");
    assert!(out.finish(Err(err)).await.is_err());
    assert!(!dest.exists(), "the partial file is removed");
}

#[tokio::test]
async fn dir_store_takes_plain_names_only() {
    let src = dir_with("a.tar.gz", b"x").await;
    let inner = src.path().join("inner");
    tokio::fs::create_dir(&inner).await.expect("mkdir");
    let store = DirStore { root: inner.clone() };
    let dest = src.path().join("dl");
    for name in ["../a.tar.gz", "/etc/passwd", "..", ".", "", "a\\b", "a\nb"] {
        let err = store.fetch(name, &dest, 1 << 20).await.expect_err(name);
        assert!(matches!(err, StoreError::Other { .. }), "{name:?}: {err:?}");
    }
    // A directory where the archive should be is an error, not an empty archive.
    tokio::fs::create_dir(inner.join("d.tar.gz")).await.expect("mkdir");
    let err = store.fetch("d.tar.gz", &dest, 1 << 20).await.expect_err("directory");
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn spec_parsing() {
    let s3 = |bucket: Option<&str>, prefix: &str| StoreSpec::S3 { bucket: bucket.map(str::to_owned), prefix: prefix.into() };
    assert_eq!(parse_spec("releases"), Ok(StoreSpec::Dir("releases".into())));
    assert_eq!(parse_spec("/var/lib/miosa/releases"), Ok(StoreSpec::Dir("/var/lib/miosa/releases".into())));
    assert_eq!(parse_spec("s3://bucket/prefix"), Ok(s3(Some("bucket"), "prefix")));
    assert_eq!(parse_spec("S3://bucket/a/b/"), Ok(s3(Some("bucket"), "a/b")));
    assert_eq!(parse_spec("s3://my.bucket-1"), Ok(s3(Some("my.bucket-1"), "")));
    assert_eq!(parse_spec("s3://bucket/"), Ok(s3(Some("bucket"), "")));
    assert_eq!(parse_spec("s3://"), Ok(s3(None, "")));
    assert_eq!(parse_spec("s3:///releases"), Ok(s3(None, "releases")));
    assert!(check_spec("releases").is_ok());
    // Multi-byte characters where the scheme would be are a plain directory name.
    assert_eq!(parse_spec("\u{e9}\u{e9}"), Ok(StoreSpec::Dir("\u{e9}\u{e9}".into())));
    assert_eq!(parse_spec("s\u{e9}"), Ok(StoreSpec::Dir("s\u{e9}".into())));
    assert!(check_spec("s3://bucket/prefix").is_ok());
}

#[test]
fn spec_errors_name_the_problem() {
    for (spec, needle) in [
        ("", "empty"),
        ("s3://Bucket/x", "bad bucket name \"Bucket\""),
        ("s3://ab/x", "bad bucket name"),
        ("s3://-bucket/x", "bad bucket name"),
        ("s3://bu cket/x", "bad bucket name"),
        ("s3://user:pw@bucket/x", "bad bucket name"),
        ("s3://bucket/a//b", "bad prefix"),
        ("s3://bucket/a/../b", "bad prefix"),
        ("s3://bucket/x?versionId=1", "no query"),
        ("gs://bucket/x", "unsupported store gs://"),
        ("https://s3.example/bucket", "unsupported store https://"),
        ("s3:bucket/x", "s3://bucket/prefix"),
        ("s3:/\u{e9}", "s3://bucket/prefix"),
    ] {
        let err = check_spec(spec).expect_err(spec);
        assert!(err.contains(needle), "{spec:?}: {err}");
    }
}

#[test]
fn settings_from_vars() {
    let s = S3Settings::from_vars(vars(&[
        ("STORAGE_ENDPOINT", "http://127.0.0.1:9000"),
        ("STORAGE_BUCKET", "rel"),
        ("STORAGE_KEY_ID", "id"),
        ("STORAGE_KEY_SECRET", "very-secret"),
        ("AWS_REGION", "eu-west-1"),
        ("AWS_SECRET_ACCESS_KEY", "aws-secret"),
        ("AWS_ENDPOINT", ""),
        ("HOME", "/root"),
    ]));
    assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
    assert_eq!(s.bucket.as_deref(), Some("rel"));
    assert_eq!(s.key_id.as_deref(), Some("id"));
    assert_eq!(s.key_secret.as_deref(), Some("very-secret"));
    assert_eq!(s.aws, vec![("AWS_REGION".into(), "eu-west-1".into()), ("AWS_SECRET_ACCESS_KEY".into(), "aws-secret".into())]);
    let debug = format!("{s:?}");
    assert!(!debug.contains("very-secret") && !debug.contains("aws-secret") && !debug.contains("\"id\""), "{debug}");
}

fn config(b: &AmazonS3Builder, key: AmazonS3ConfigKey) -> Option<String> {
    b.get_config_value(&key)
}

#[test]
fn storage_variables_override_aws_ones_and_the_url_bucket_wins() {
    let s = S3Settings::from_vars(vars(&[
        ("AWS_ENDPOINT", "https://aws.example"),
        ("AWS_ACCESS_KEY_ID", "aws-id"),
        ("AWS_SECRET_ACCESS_KEY", "aws-secret"),
        ("AWS_SESSION_TOKEN", "aws-token"),
        ("AWS_BUCKET", "aws-bucket"),
        ("STORAGE_ENDPOINT", "http://127.0.0.1:9000"),
        ("STORAGE_KEY_ID", "st-id"),
        ("STORAGE_KEY_SECRET", "st-secret"),
        ("STORAGE_BUCKET", "st-bucket"),
    ]));
    let b = builder(Some("url-bucket"), &s).expect("builder");
    assert_eq!(config(&b, AmazonS3ConfigKey::Endpoint).as_deref(), Some("http://127.0.0.1:9000"));
    assert_eq!(config(&b, AmazonS3ConfigKey::AccessKeyId).as_deref(), Some("st-id"));
    assert_eq!(config(&b, AmazonS3ConfigKey::SecretAccessKey).as_deref(), Some("st-secret"));
    assert_eq!(config(&b, AmazonS3ConfigKey::Token), None, "the AWS session token is dropped with STORAGE_KEY_*");
    assert_eq!(config(&b, AmazonS3ConfigKey::Bucket).as_deref(), Some("url-bucket"));
    assert_eq!(config(&b, AmazonS3ConfigKey::VirtualHostedStyleRequest).as_deref(), Some("false"));
    assert_eq!(config(&b, AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)).as_deref(), Some("true"));
    // Without a URL bucket, STORAGE_BUCKET beats AWS_BUCKET.
    let b = builder(None, &s).expect("builder");
    assert_eq!(config(&b, AmazonS3ConfigKey::Bucket).as_deref(), Some("st-bucket"));
    // AWS_* alone still work, and an https endpoint does not allow plain HTTP.
    let aws_only = S3Settings { aws: s.aws.clone(), ..S3Settings::default() };
    let b = builder(None, &aws_only).expect("builder");
    assert_eq!(config(&b, AmazonS3ConfigKey::Endpoint).as_deref(), Some("https://aws.example"));
    assert_eq!(config(&b, AmazonS3ConfigKey::Token).as_deref(), Some("aws-token"));
    assert_eq!(config(&b, AmazonS3ConfigKey::Bucket).as_deref(), Some("aws-bucket"));
    assert_ne!(config(&b, AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp)).as_deref(), Some("true"));
}

#[test]
fn s3_store_setup_errors() {
    let creds = S3Settings { key_id: Some("id".into()), key_secret: Some("secret".into()), ..S3Settings::default() };
    let err = S3Store::new("s3:///prefix", &creds).expect_err("no bucket");
    assert!(err.contains("no bucket") && err.contains("STORAGE_BUCKET"), "{err}");
    let half = S3Settings { key_id: Some("id".into()), ..S3Settings::default() };
    let err = S3Store::new("s3://bucket", &half).expect_err("half credentials");
    assert!(err.contains("STORAGE_KEY_SECRET is not"), "{err}");
    let err = S3Store::new("releases", &creds).expect_err("not s3");
    assert!(err.contains("not an s3:// URL"), "{err}");
    let err = open_spec(&StoreSpec::S3 { bucket: None, prefix: String::new() }, &creds).expect_err("no bucket");
    assert!(err.contains("no bucket"), "{err}");
}

#[test]
fn s3_store_debug_hides_secrets_and_keys_sit_under_the_prefix() {
    let settings = S3Settings {
        endpoint: Some("http://127.0.0.1:1".into()),
        key_id: Some("AKIDEXAMPLE".into()),
        key_secret: Some("wJalrXUtnFEMI-secret".into()),
        ..S3Settings::default()
    };
    let store = S3Store::new("s3://bucket/a/b", &settings).expect("store");
    let debug = format!("{store:?}");
    assert!(!debug.contains("AKIDEXAMPLE") && !debug.contains("secret"), "{debug}");
    assert!(debug.contains("bucket") && debug.contains("a/b"), "{debug}");
    assert_eq!(store.key("x.tar.gz").expect("key").as_ref(), "a/b/x.tar.gz");
    let store = S3Store::new("s3://bucket", &settings).expect("store");
    assert_eq!(store.key("x.tar.gz").expect("key").as_ref(), "x.tar.gz");
    let dyn_store = open_spec(&StoreSpec::S3 { bucket: Some("bucket".into()), prefix: "p".into() }, &settings).expect("open");
    assert!(!format!("{dyn_store:?}").contains("secret"));
}

#[tokio::test]
async fn s3_store_unreachable_endpoint_is_an_error_naming_the_cause() {
    // A closed loopback port: connection refused, after object_store's few retries.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let settings = S3Settings {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        key_id: Some("id".into()),
        key_secret: Some("secret".into()),
        ..S3Settings::default()
    };
    let store = S3Store::new("s3://bucket/p", &settings).expect("store");
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("dl");
    let err = store.fetch("x.tar.gz", &dest, 1 << 20).await.expect_err("refused");
    assert!(matches!(err, StoreError::Other { .. }), "{err:?}");
    assert!(!err.to_string().contains("secret"), "{err}");
    assert!(!dest.exists());
}
