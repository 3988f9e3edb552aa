//! Placeholder until the object reader lands (same branch of work): the API only.

pub mod endpoint;

pub use endpoint::Endpoint;

use http::header::{HeaderName, HeaderValue};
use std::time::Duration;

/// Resolved `[storage]` settings.
pub struct StorageSettings {
    pub endpoint: String,
    pub region: String,
    pub key_id: String,
    pub key_secret: String,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
}

#[derive(Debug)]
pub struct Storage;

impl Storage {
    pub fn new(_settings: StorageSettings) -> Result<Storage, String> {
        Ok(Storage)
    }
    pub async fn object(&self, _b: &str, _p: bool, _k: &str, _r: &pingora::http::RequestHeader) -> Result<ObjectPlan, StorageError> {
        Err(StorageError::Unavailable("placeholder".into()))
    }
}

pub fn key_of(path: &[u8]) -> Option<String> {
    String::from_utf8(path.get(1..)?.to_vec()).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("not found")]
    NotFound,
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("timeout")]
    Timeout,
}

pub struct ObjectPlan {
    pub status: u16,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub content_length: Option<u64>,
    pub body: Option<ObjectBody>,
}

pub struct ObjectBody;

pub async fn stream_object(_session: &mut pingora::proxy::Session, _body: ObjectBody) -> pingora::Result<()> {
    Ok(())
}

pub fn runs_script(_content_type: &[u8]) -> bool {
    false
}
