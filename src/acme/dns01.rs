//! DNS-01: writing `_acme-challenge` TXT records, and waiting until they can be seen.

use crate::hook::HookUrl;
use async_trait::async_trait;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on one provider call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Something that can set and clear TXT records. Names are fully qualified with their
/// trailing dot (`_acme-challenge.example.com.`).
#[async_trait]
pub trait Dns01Solver: Send + Sync + std::fmt::Debug {
    /// Adds `value` at `fqdn` (other values there are kept: a wildcard and its base name
    /// may be validated at the same time).
    async fn set_txt(&self, fqdn: &str, value: &str) -> Result<(), String>;
    /// Removes `value` at `fqdn`.
    async fn clear_txt(&self, fqdn: &str, value: &str) -> Result<(), String>;
}

/// POSTs `{"host": fqdn, "value": v}` to `<url>/set-txt` and `{"host": fqdn}` (with the
/// value, for providers that keep several) to `<url>/clear-txt` — the shape
/// pebble-challtestsrv speaks.
#[derive(Debug)]
pub struct Webhook {
    pub url: HookUrl,
}

impl Webhook {
    async fn call(&self, path: &str, body: serde_json::Value) -> Result<(), String> {
        let body = body.to_string();
        match tokio::time::timeout(CALL_TIMEOUT, self.url.post_json(path, &body)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dns-01 webhook {path}: {e}")),
            Err(_) => Err(format!("dns-01 webhook {path}: no answer within {CALL_TIMEOUT:?}")),
        }
    }
}

#[async_trait]
impl Dns01Solver for Webhook {
    async fn set_txt(&self, fqdn: &str, value: &str) -> Result<(), String> {
        self.call("/set-txt", serde_json::json!({ "host": fqdn, "value": value })).await
    }

    async fn clear_txt(&self, fqdn: &str, value: &str) -> Result<(), String> {
        self.call("/clear-txt", serde_json::json!({ "host": fqdn, "value": value })).await
    }
}

/// The TXT strings at `fqdn` as `server` answers them, asked directly over TCP (not
/// through a stub resolver, which answers names under `localhost.` itself, RFC 6761).
pub async fn txt_at(server: std::net::SocketAddr, fqdn: &str) -> Result<Vec<String>, String> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut name = Name::from_ascii(fqdn).map_err(|e| format!("{fqdn}: not a domain name: {e}"))?;
    name.set_fqdn(true);
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name.clone(), RecordType::TXT));
    let request = msg.to_vec().map_err(|e| format!("encoding a TXT query: {e}"))?;
    let bytes = tokio::time::timeout(CALL_TIMEOUT, tcp_exchange(server, &request))
        .await
        .map_err(|_| format!("{server}: no answer within {CALL_TIMEOUT:?}"))?
        .map_err(|e| format!("{server}: {e}"))?;
    let answer = Message::from_vec(&bytes).map_err(|e| format!("{server}: malformed answer: {e}"))?;
    let mut out = Vec::new();
    for r in &answer.answers {
        if let RData::TXT(txt) = &r.data {
            if r.name.eq_case(&name) || r.name.to_lowercase() == name.to_lowercase() {
                out.push(txt.txt_data.iter().map(|d| String::from_utf8_lossy(d)).collect::<String>());
            }
        }
    }
    Ok(out)
}

/// Sends one length-prefixed message over a new TCP connection and reads one back.
pub async fn tcp_exchange(server: SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let len = u16::try_from(request.len()).map_err(|_| std::io::Error::other("request longer than 65535 bytes"))?;
    let mut stream = TcpStream::connect(server).await?;
    let mut framed = Vec::with_capacity(request.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(request);
    stream.write_all(&framed).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).await?;
    Ok(answer)
}
