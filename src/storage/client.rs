//! The transport under every bucket's `AmazonS3`: hyper's pooled HTTP/1.1 client, handed
//! to `object_store` as its `HttpService` (behind [`super::sign::Signing`]).
//!
//! `object_store` would send through reqwest, whose layers around the same hyper client
//! — the URI turned into a string and parsed again as a URL (with IDNA), a redirect
//! policy, its own request type — were a quarter of the edge's instructions per public
//! object (callgrind, benches/load/RESULTS.md "Storage"). Requests here are
//! `object_store`'s, already signed, with absolute URIs; hyper sends them in origin form
//! with the `Host` the signer set. TLS (an `https` endpoint) is rustls on ring with the
//! system's roots, as reqwest had it; connections are made within the connect timeout and
//! pooled (idle ones closed after 90 s).

use async_trait::async_trait;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use object_store::client::{HttpError, HttpErrorKind, HttpRequest, HttpRequestBody, HttpResponse, HttpResponseBody, HttpService};
use std::sync::Arc;
use std::time::Duration;

/// Idle pooled connections to the store are closed after this.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// hyper's client over plain TCP or rustls.
#[derive(Debug, Clone)]
pub(super) struct HyperService(Client<hyper_rustls::HttpsConnector<HttpConnector>, HttpRequestBody>);

impl HyperService {
    /// A client whose connections must be made within `connect_timeout`; `tls` when the
    /// endpoint is `https` (then the system's roots must load: a store whose certificate
    /// cannot be checked is never used; a plain endpoint needs none).
    pub(super) fn new(connect_timeout: Duration, tls: bool) -> Result<HyperService, String> {
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(connect_timeout));
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = if tls {
            builder
                .with_provider_and_native_roots(provider)
                .map_err(|e| format!("cannot load the system's root certificates for the store: {e}"))?
        } else {
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("cannot set up TLS for the store: {e}"))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            builder.with_tls_config(config)
        };
        let tls = builder.https_or_http().enable_http1().wrap_connector(tcp);
        Ok(HyperService(Client::builder(TokioExecutor::new()).pool_idle_timeout(POOL_IDLE).build(tls)))
    }
}

#[async_trait]
impl HttpService for HyperService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let resp = self.0.request(req).await.map_err(|e| {
            // A connection that could not be made is retried by object_store; a request
            // that failed after leaving, only when it is idempotent (GET and HEAD are).
            let kind = if e.is_connect() { HttpErrorKind::Connect } else { HttpErrorKind::Request };
            HttpError::new(kind, e)
        })?;
        let (parts, body) = resp.into_parts();
        let body = body.map_err(|e| HttpError::new(HttpErrorKind::Interrupted, e));
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}
