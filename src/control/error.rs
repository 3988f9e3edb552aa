//! The control API's errors: one enum that knows each answer's status and code
//! (CONTRACT §4), and the body parsing that produces most of them.
//!
//! Every error is answered as `{"error":{"code","message","path"?}}`; `path` names the
//! innermost offending field of the request.

use crate::schema::strict::Strict;
use crate::schema::StateError;
use crate::store::WriteError;
use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use serde::de::DeserializeOwned;

/// An error answer of the control API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_json`: the body is not JSON.
    #[error("{0}")]
    InvalidJson(String),
    /// 400 `invalid_state`: the body (or a query parameter) breaks the schema or its rules.
    #[error("{message}")]
    InvalidState { message: String, path: Option<String> },
    /// 401 `unauthorized`.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// 404 `not_found`.
    #[error("{message}")]
    NotFound { message: String, path: Option<String> },
    /// 405 `method_not_allowed`, with the methods the path offers (its `Allow` header).
    #[error("this path offers {0}")]
    MethodNotAllowed(&'static str),
    /// 409 `conflict`: an id or host pinned by the TOML file.
    #[error("{message}")]
    Conflict { message: String, path: Option<String> },
    /// 412 `precondition_failed`: `If-Match` is not the current generation.
    #[error("{0}")]
    PreconditionFailed(String),
    /// 413 `payload_too_large`: over `[control] max_body_bytes`.
    #[error("the body is larger than control.max_body_bytes ({0} bytes)")]
    PayloadTooLarge(u64),
    /// 415 `unsupported_media_type`.
    #[error("send the body as Content-Type: application/json")]
    UnsupportedMediaType,
    /// 503 `cluster_unavailable`: fleet mode, and Redis cannot take the write.
    #[error("{0}")]
    ClusterUnavailable(String),
    /// 503 `dns_unavailable`: domain verification has no resolver.
    #[error("no DNS resolver is configured or reachable")]
    DnsUnavailable,
    /// 500 `internal_error`.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 `invalid_state` at `path` (none when empty).
    pub fn invalid(message: impl Into<String>, path: impl Into<String>) -> ApiError {
        ApiError::InvalidState { message: message.into(), path: non_empty(path.into()) }
    }

    /// A 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::NotFound { message: message.into(), path: None }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_) | ApiError::InvalidState { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::DnsUnavailable | ApiError::ClusterUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidState { .. } => "invalid_state",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound { .. } => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Conflict { .. } => "conflict",
            ApiError::PreconditionFailed(_) => "precondition_failed",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::DnsUnavailable => "dns_unavailable",
            ApiError::ClusterUnavailable(_) => "cluster_unavailable",
            ApiError::Internal(_) => "internal_error",
        }
    }

    fn path(&self) -> Option<&str> {
        match self {
            ApiError::InvalidState { path, .. } | ApiError::Conflict { path, .. } | ApiError::NotFound { path, .. } => path.as_deref(),
            _ => None,
        }
    }

    /// The JSON answer.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut e = serde_json::json!({"code": self.code(), "message": self.to_string()});
        if let Some(p) = self.path() {
            e["path"] = p.into();
        }
        let mut r = json(self.status(), &serde_json::json!({ "error": e }));
        match &self {
            ApiError::Unauthorized => {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed(allow) => {
                r.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static(allow));
            }
            _ => {}
        }
        r
    }
}

fn non_empty(p: String) -> Option<String> {
    (!p.is_empty()).then_some(p)
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> ApiError {
        match e {
            WriteError::Invalid(errs) => {
                let first = errs.into_iter().next().unwrap_or(StateError { path: String::new(), message: "invalid state".into() });
                ApiError::invalid(first.message, first.path)
            }
            WriteError::Conflict(c) => ApiError::Conflict { message: c.message, path: non_empty(c.path) },
            e @ WriteError::Stale { .. } => ApiError::PreconditionFailed(e.to_string()),
            WriteError::NotFound(m) => ApiError::not_found(m),
            WriteError::Unavailable(m) => ApiError::ClusterUnavailable(m),
            e @ WriteError::Persist(_) => {
                tracing::error!(error = %e, "state write not persisted");
                ApiError::Internal(e.to_string())
            }
        }
    }
}

/// A schema error found at `e.path()` inside the part of the request at `prefix`.
pub fn invalid_at(prefix: &str, e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let inner_path = e.path().to_string();
    let path = match (prefix.is_empty(), inner_path.as_str()) {
        (_, ".") => prefix.to_string(),
        (true, p) => p.to_string(),
        (false, p) if p.starts_with('[') => format!("{prefix}{p}"),
        (false, p) => format!("{prefix}.{p}"),
    };
    ApiError::invalid(e.into_inner().to_string(), path)
}

/// Parses a JSON body: syntax errors are `invalid_json`, schema errors `invalid_state`
/// with the path of the bad field.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    object_body(body)?;
    // Valid bodies (nearly all) parse without tracking the path, about a fifth faster on a
    // 100k-sandbox state; a refused one is parsed again, with it, for the error's path.
    let mut de = serde_json::Deserializer::from_slice(body);
    if let Ok(v) = T::deserialize(Strict(&mut de)).and_then(|v| de.end().map(|()| v)) {
        return Ok(v);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    // Structs from JSON objects only, at every depth (serde reads them from arrays too).
    let v: T = match serde_path_to_error::deserialize(Strict(&mut de)) {
        Ok(v) => v,
        Err(e) if e.inner().is_syntax() || e.inner().is_eof() => return Err(ApiError::InvalidJson(e.into_inner().to_string())),
        Err(e) => return Err(invalid_at("", e)),
    };
    de.end().map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    Ok(v)
}

/// Every write takes a JSON object: serde would read a struct from an array too (`[]` as
/// an empty state), so anything else is refused as `invalid_json` before it is read.
pub fn object_body(body: &[u8]) -> Result<(), ApiError> {
    match body.iter().find(|b| !b" \t\r\n".contains(b)) {
        Some(b'{') => Ok(()),
        Some(_) => Err(ApiError::InvalidJson("the body must be a JSON object".into())),
        None => Err(ApiError::InvalidJson("the body is empty: send a JSON object".into())),
    }
}

/// Refuses a part of a body that must be a JSON object and is not (`ops[0].value`).
pub fn object_at(v: &serde_json::Value, path: &str) -> Result<(), ApiError> {
    if v.is_object() {
        Ok(())
    } else {
        Err(ApiError::invalid(format!("must be a JSON object, not {}", json_type(v)), path))
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A response with `body`, never cached.
pub fn bytes_response(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    r
}

/// A JSON response.
pub fn json(status: StatusCode, v: &impl serde::Serialize) -> Response<Full<Bytes>> {
    bytes_response(status, "application/json", serde_json::to_vec(v).unwrap_or_default())
}
