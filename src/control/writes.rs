//! The routing-state endpoints: `GET/PUT /v1/state`, `POST /v1/state/ops`, one object
//! by kind and id, and `activate`. Reads answer from the store; writes parse the body
//! here (schema errors with their path), then hand the store one change, off the async
//! threads, and answer `{"generation": N}`.

use super::error::{bytes_response, invalid_at, json, object_at, object_body, parse, ApiError};
use super::ControlApi;
use crate::schema::{Id, Kind, Object, State, StateDoc, StateError};
use crate::state::{BatchOp, Op, Origin};
use crate::store::WriteError;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

type Answer = Result<Response<Full<Bytes>>, ApiError>;

impl ControlApi {
    /// `GET /v1/state`: the API-managed state and its generation (also the `ETag`),
    /// serialised from the published copy (writers are not held up).
    pub(super) fn get_state(&self) -> Response<Full<Bytes>> {
        #[derive(Serialize)]
        struct Out<'a> {
            generation: u64,
            #[serde(flatten)]
            state: &'a State,
        }
        let p = self.store.published();
        let state = p.objects.to_state(Origin::Api);
        let body = serde_json::to_vec(&Out { generation: p.generation, state: &state });
        let mut r = bytes_response(StatusCode::OK, "application/json", body.unwrap_or_default());
        if let Ok(v) = header::HeaderValue::from_str(&format!("\"{}\"", p.generation)) {
            r.headers_mut().insert(header::ETAG, v);
        }
        r
    }

    /// `PUT /v1/state`: replaces the API-managed state whole (applied as the difference).
    pub(super) async fn put_state(self: &Arc<Self>, req: Request<Incoming>) -> Answer {
        // The body is read and checked first: a bad body is 400 whatever its If-Match.
        let if_match = if_match(&req);
        let body = self.body(req).await?;
        self.blocking(move |api| {
            let doc: StateDoc = parse(&body)?;
            let if_match = if_match?;
            api.store.replace_api(if_match.or(doc.generation), doc.state).map_err(ApiError::from)
        })
        .await
    }

    /// `POST /v1/state/ops`: upserts and deletes, all or nothing.
    pub(super) async fn ops(self: &Arc<Self>, req: Request<Incoming>) -> Answer {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            ops: Vec<serde_json::Value>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "lowercase")]
        enum OpName {
            Upsert,
            Delete,
        }
        // One flat struct rather than an internally tagged enum, which serde buffers: an
        // error inside an op then names its field (`ops[0].kind`), CONTRACT §4.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct WireOp {
            op: OpName,
            kind: Kind,
            #[serde(default)]
            value: Option<serde_json::Value>,
            #[serde(default)]
            id: Option<String>,
        }
        let if_match = if_match(&req);
        let body = self.body(req).await?;
        self.blocking(move |api| {
            let b: Body = parse(&body)?;
            let mut ops = Vec::with_capacity(b.ops.len());
            for (i, v) in b.ops.into_iter().enumerate() {
                object_at(&v, &format!("ops[{i}]"))?;
                let op: WireOp = serde_path_to_error::deserialize(v).map_err(|e| invalid_at(&format!("ops[{i}]"), e))?;
                let (path, op) = match (op.op, op.value, op.id) {
                    (OpName::Upsert, Some(value), None) => {
                        let path = format!("ops[{i}].value");
                        object_at(&value, &path)?;
                        let o = Object::from_value(op.kind, value).map_err(|e| invalid_at(&path, e))?;
                        (path, Op::Upsert(o))
                    }
                    (OpName::Delete, None, Some(id)) => (format!("ops[{i}]"), Op::Delete(op.kind, id)),
                    (OpName::Upsert, _, Some(_)) => {
                        return Err(ApiError::invalid("an upsert takes `value`, not `id`", format!("ops[{i}].id")))
                    }
                    (OpName::Delete, Some(_), _) => {
                        return Err(ApiError::invalid("a delete takes `id`, not `value`", format!("ops[{i}].value")))
                    }
                    (OpName::Upsert, None, None) => return Err(ApiError::invalid("missing field `value`", format!("ops[{i}]"))),
                    (OpName::Delete, None, None) => return Err(ApiError::invalid("missing field `id`", format!("ops[{i}]"))),
                };
                ops.push(BatchOp { path, origin: Origin::Api, op });
            }
            let if_match = if_match?;
            api.store.apply(if_match, ops).map_err(ApiError::from)
        })
        .await
    }

    /// `GET /v1/{kind}/{id}`: the bare object (TOML objects too).
    pub(super) fn get_object(&self, kind: Kind, id: &str) -> Answer {
        match self.store.published().objects.get(kind, id) {
            Some((_, o)) => Ok(json(StatusCode::OK, &o.to_value())),
            None => Err(ApiError::not_found(format!("no {} `{id}`", kind.singular()))),
        }
    }

    /// `PUT /v1/{kind}/{id}`: creates or replaces one object.
    pub(super) async fn put_object(self: &Arc<Self>, kind: Kind, id: String, req: Request<Incoming>) -> Answer {
        let if_match = if_match(&req);
        let body = self.body(req).await?;
        self.blocking(move |api| {
            object_body(&body)?;
            let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
            let obj = Object::from_value(kind, value).map_err(|e| invalid_at("", e))?;
            if obj.id() != id {
                return Err(ApiError::invalid(format!("the body's id `{}` is not the path's `{id}`", obj.id()), "id"));
            }
            let if_match = if_match?;
            api.store
                .apply(if_match, vec![BatchOp { path: String::new(), origin: Origin::Api, op: Op::Upsert(obj) }])
                .map_err(ApiError::from)
        })
        .await
    }

    /// `DELETE /v1/{kind}/{id}`.
    pub(super) async fn delete_object(self: &Arc<Self>, kind: Kind, id: String) -> Answer {
        self.blocking(move |api| {
            let op = BatchOp { path: String::new(), origin: Origin::Api, op: Op::Delete(kind, id) };
            api.store.apply(None, vec![op]).map_err(ApiError::from)
        })
        .await
    }

    /// `POST /v1/deployments/{id}/activate`: moves the active version (promote or roll
    /// back; nothing is rebuilt). Read and written under the writers' lock.
    pub(super) async fn activate(self: &Arc<Self>, id: String, req: Request<Incoming>) -> Answer {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            version: Id,
        }
        let if_match = if_match(&req);
        let body = self.body(req).await?;
        self.blocking(move |api| {
            let b: Body = parse(&body)?;
            let if_match = if_match?;
            api.store
                .write(if_match, |objects| {
                    let mut d = match objects.get(Kind::Deployment, &id) {
                        Some((Origin::Api, Object::Deployment(d))) => d,
                        Some(_) => return Err(pinned(Kind::Deployment, &id)),
                        None => return Err(WriteError::NotFound(format!("no deployment `{id}`"))),
                    };
                    if !d.versions.iter().any(|v| v.id == b.version) {
                        return Err(WriteError::Invalid(vec![StateError {
                            path: "version".into(),
                            message: format!("deployment `{id}` has no version `{}`", b.version),
                        }]));
                    }
                    d.active_version = b.version.clone();
                    Ok(vec![BatchOp { path: String::new(), origin: Origin::Api, op: Op::Upsert(Object::Deployment(d)) }])
                })
                .map_err(ApiError::from)
        })
        .await
    }

    /// Reads a JSON request body: 415 unless `Content-Type` is JSON, 413 past the limit.
    pub(super) async fn body(&self, req: Request<Incoming>) -> Result<Bytes, ApiError> {
        let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::UnsupportedMediaType);
        }
        let max_body = self.max_body.load(std::sync::atomic::Ordering::Relaxed);
        let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_body) {
            return Err(ApiError::PayloadTooLarge(max_body));
        }
        let limited = Limited::new(req.into_body(), usize::try_from(max_body).unwrap_or(usize::MAX));
        match limited.collect().await {
            Ok(b) => Ok(b.to_bytes()),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(ApiError::PayloadTooLarge(max_body)),
            Err(e) => Err(ApiError::InvalidJson(format!("cannot read the body: {e}"))),
        }
    }

    /// Runs a write on the blocking pool (validating a big state takes a while) and
    /// answers its generation.
    async fn blocking(self: &Arc<Self>, f: impl FnOnce(&ControlApi) -> Result<u64, ApiError> + Send + 'static) -> Answer {
        let api = self.clone();
        let generation =
            tokio::task::spawn_blocking(move || f(&api)).await.map_err(|e| ApiError::Internal(format!("write task failed: {e}")))??;
        Ok(json(StatusCode::OK, &serde_json::json!({"generation": generation})))
    }
}

/// The refusal of a write to an object the TOML file defines.
fn pinned(kind: Kind, id: &str) -> WriteError {
    WriteError::Conflict(StateError { path: String::new(), message: format!("{} `{id}` is pinned by the TOML file", kind.singular()) })
}

fn if_match(req: &Request<Incoming>) -> Result<Option<u64>, ApiError> {
    if_match_header(req.headers())
}

/// `If-Match: "7"` (or `W/"7"`, or `*` for any) → the generation a write expects.
pub(super) fn if_match_header(headers: &http::HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let s = v.to_str().unwrap_or("").trim();
    if s == "*" {
        return Ok(None);
    }
    let s = s.strip_prefix("W/").unwrap_or(s).trim_matches('"');
    s.parse::<u64>()
        .map(Some)
        .map_err(|_| ApiError::PreconditionFailed("If-Match must be the generation, as in the ETag of GET /v1/state".into()))
}
