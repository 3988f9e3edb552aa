//! The front door: what happens to a connection between pingora's `accept()` and the
//! first request read from it.
//!
//! ```text
//! accept (pingora, plain TCP on both listeners)
//!  → Front::process_new, once per connection
//!      per-IP cap            over [server] max_connections_per_ip → closed, nothing read
//!      [server] https port?  TLS handshake (SniResolver) within [tls] handshake_timeout_ms
//!                            counted: miosa_edge_tls_handshakes_total{version},
//!                            …_failures_total{reason}, …_duration_seconds
//!      h2 by ALPN?          PING and SETTINGS frames budgeted (crate::hostile::H2Flood):
//!                            a flood closes the connection, miosa_edge_h2_floods_total
//!  → pingora's HTTP app (h1, or h2 by ALPN) → EdgeProxy
//! ```
//!
//! The edge performs the handshake itself, with pingora's rustls `Acceptor`, instead of
//! letting pingora's listener do it, because pingora's listener reports a failed
//! handshake only as an ERROR log line (a port scan fills the log) and gives a client 60 s
//! to finish it: here failures are counted by reason, logged at debug, timed by the
//! operator's setting, and a connection still handshaking already holds its place under
//! the per-IP cap.
//!
//! A connection is admitted once: the stream handed on is wrapped ([`Admitted`] inside a
//! [`Held`], or a TLS stream over one), so the later calls of `process_new` for the
//! same keep-alive connection are recognised and passed straight through.

use crate::hostile::{Admitted, H2Flood, PerIp};
use crate::metrics::{HandshakeFailure, Metrics};
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::socket::SocketAddr as PSocketAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest, UniqueID, UniqueIDType,
};
use pingora::server::ShutdownWatch;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The TLS side of `[server] https`.
pub struct TlsListener {
    /// Port of `[server] https`: connections accepted on it are TLS.
    pub port: u16,
    pub acceptor: Acceptor,
    /// `[tls] handshake_timeout_ms`, replaced by config reloads.
    pub handshake_timeout_ms: Arc<std::sync::atomic::AtomicU64>,
}

/// A pingora application behind the per-IP cap and, on the HTTPS port, the TLS handshake.
pub struct Front<A> {
    inner: Arc<A>,
    per_ip: Arc<PerIp>,
    tls: Option<TlsListener>,
    metrics: Arc<Metrics>,
}

impl<A> Front<A> {
    /// `inner` under a cap of `max_per_ip` connections per IP (0 = unlimited), terminating
    /// TLS on `tls.port` when given.
    pub fn new(inner: A, max_per_ip: u32, tls: Option<TlsListener>, metrics: Arc<Metrics>) -> Self {
        Front { inner: Arc::new(inner), per_ip: PerIp::new(max_per_ip), tls, metrics }
    }

    /// Where a config reload sets a new `[server] max_connections_per_ip`.
    pub(crate) fn per_ip(&self) -> Arc<PerIp> {
        self.per_ip.clone()
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Front<A> {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        // Only a connection pingora has just accepted is a bare L4 stream; one coming back
        // for its next request was wrapped below (or needs nothing: plain, no cap).
        if !stream.as_any().is::<L4Stream>() {
            return self.inner.process_new(stream, shutdown).await;
        }
        let digest = stream.get_socket_digest();
        let client = digest.as_deref().and_then(peer_ip);
        let admitted = match (self.per_ip.max.load(std::sync::atomic::Ordering::Relaxed), client) {
            (0, _) | (_, None) => None,
            (_, Some(ip)) => match self.per_ip.admit(ip) {
                Some(a) => Some(a),
                None => {
                    self.metrics.connections_over_ip_cap.inc();
                    tracing::debug!(client = %ip, "connection over max_connections_per_ip closed");
                    return None;
                }
            },
        };
        let tls = self.tls.as_ref().filter(|t| digest.as_deref().and_then(local_port) == Some(t.port));
        let stream = match (tls, admitted) {
            (None, None) => stream,
            (None, Some(a)) => Box::new(Held { inner: into_l4(stream)?, _admitted: Some(a) }),
            (Some(t), admitted) => {
                let held = Held { inner: into_l4(stream)?, _admitted: admitted };
                let started = Instant::now();
                let limit = Duration::from_millis(t.handshake_timeout_ms.load(std::sync::atomic::Ordering::Relaxed));
                // The handshake (which owns the connection) outlives the timeout, so a
                // stalled one is counted before its connection is closed: a client that
                // sees the close finds it in the metrics.
                let handshake = t.acceptor.tls_handshake(held);
                tokio::pin!(handshake);
                match tokio::time::timeout(limit, &mut handshake).await {
                    Ok(Ok(s)) => {
                        let version = s.get_ssl_digest().map(|d| d.version.to_string()).unwrap_or_default();
                        self.metrics.tls_handshake(&version, started.elapsed().as_secs_f64());
                        if s.selected_alpn_proto() == Some(pingora::protocols::ALPN::H2) {
                            // HTTP/2: the control frames it must answer are budgeted.
                            let guarded: Stream = Box::new(H2Guard {
                                inner: s,
                                flood: H2Flood::new(crate::clock::monotonic_ms()),
                                metrics: self.metrics.clone(),
                            });
                            guarded
                        } else {
                            Box::new(s)
                        }
                    }
                    Ok(Err(e)) => {
                        let reason = handshake_failure(&e);
                        self.metrics.tls_handshake_failure(reason);
                        tracing::debug!(?reason, error = %e, ?client, "TLS handshake failed");
                        return None;
                    }
                    Err(_) => {
                        self.metrics.tls_handshake_failure(HandshakeFailure::Timeout);
                        tracing::debug!(?client, "TLS handshake timed out");
                        return None;
                    }
                }
            }
        };
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

fn peer_ip(d: &SocketDigest) -> Option<std::net::IpAddr> {
    d.peer_addr().and_then(PSocketAddr::as_inet).map(|a| a.ip())
}

fn local_port(d: &SocketDigest) -> Option<u16> {
    d.local_addr().and_then(PSocketAddr::as_inet).map(|a| a.port())
}

/// The concrete accepted stream (checked by the caller, so `None` cannot happen).
fn into_l4(stream: Stream) -> Option<L4Stream> {
    match stream.into_any().downcast::<L4Stream>() {
        Ok(s) => Some(*s),
        Err(_) => {
            tracing::error!("accepted stream of an unexpected type: closed");
            None
        }
    }
}

/// Why a handshake failed. pingora's acceptor keeps only the text of the error rustls
/// or the socket gave (`explain_err`), so the reason is read from it; the unit test
/// below pins these texts to the rustls version in use.
pub(crate) fn handshake_failure(e: &pingora::Error) -> HandshakeFailure {
    const CLOSED: [&str; 4] = ["handshake eof", "connection reset", "broken pipe", "connection aborted"];
    const MALFORMED: [&str; 3] = ["corrupt message", "unexpected message", "unexpected handshake message"];
    const INCOMPATIBLE: [&str; 2] = ["peer is incompatible", "doesn't support any known protocol"];
    let t = e.to_string().to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| t.contains(n));
    if has(&CLOSED) {
        HandshakeFailure::Closed
    } else if has(&MALFORMED) {
        HandshakeFailure::Malformed
    } else if has(&INCOMPATIBLE) {
        HandshakeFailure::Incompatible
    } else if t.contains("received fatal alert") {
        HandshakeFailure::Alert
    } else {
        HandshakeFailure::Other
    }
}

/// The traits a stream wrapper of this module passes straight to its `inner` stream
/// (writes, shutdown, ids, digests, peeking); each wrapper writes its own reads and
/// `Ssl`.
macro_rules! forward_io {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write(cx, buf)
            }
            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.inner).poll_flush(cx)
            }
            fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.inner).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> Poll<std::io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
        }

        #[async_trait]
        impl Shutdown for $t {
            async fn shutdown(&mut self) {
                Shutdown::shutdown(&mut self.inner).await
            }
        }

        impl UniqueID for $t {
            fn id(&self) -> UniqueIDType {
                self.inner.id()
            }
        }

        impl GetTimingDigest for $t {
            fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
                self.inner.get_timing_digest()
            }
            fn get_read_pending_time(&self) -> Duration {
                self.inner.get_read_pending_time()
            }
            fn get_write_pending_time(&self) -> Duration {
                self.inner.get_write_pending_time()
            }
        }

        impl GetProxyDigest for $t {
            fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
                self.inner.get_proxy_digest()
            }
            fn set_proxy_digest(&mut self, digest: ProxyDigest) {
                self.inner.set_proxy_digest(digest)
            }
        }

        impl GetSocketDigest for $t {
            fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
                self.inner.get_socket_digest()
            }
            fn set_socket_digest(&mut self, digest: SocketDigest) {
                self.inner.set_socket_digest(digest)
            }
        }

        #[async_trait]
        impl Peek for $t {
            async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
                self.inner.try_peek(buf).await
            }
        }
    };
}

/// An accepted stream holding its place under the per-IP cap until it is dropped.
/// Everything else is the inner stream's.
#[derive(Debug)]
pub struct Held {
    inner: L4Stream,
    _admitted: Option<Admitted>,
}

impl AsyncRead for Held {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

forward_io!(Held);

impl Ssl for Held {}

/// An HTTP/2 connection whose client is held to a budget of PING and SETTINGS frames
/// ([`H2Flood`]): past it, reading fails and pingora closes the connection. Everything
/// else is the TLS stream's.
#[derive(Debug)]
struct H2Guard {
    inner: pingora::protocols::tls::TlsStream<Held>,
    flood: H2Flood,
    metrics: Arc<Metrics>,
}

impl AsyncRead for H2Guard {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let me = &mut *self;
            if !me.flood.feed(&buf.filled()[before..], crate::clock::monotonic_ms()) {
                me.metrics.h2_floods.inc();
                tracing::debug!("HTTP/2 PING/SETTINGS flood: connection closed");
                return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "HTTP/2 control frame flood")));
            }
        }
        r
    }
}

forward_io!(H2Guard);

impl Ssl for H2Guard {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::{ErrorType, OrErr};
    use rustls::{AlertDescription, Error as TlsError, InvalidMessage, PeerIncompatible};

    /// The error as pingora's acceptor hands it over: rustls's error inside the I/O error
    /// tokio-rustls makes of it, flattened to text by `explain_err`.
    fn as_pingora(e: std::io::Error) -> pingora::Error {
        let r: Result<(), _> = Err(e);
        *r.explain_err(ErrorType::TLSHandshakeFailure, |e| format!("tls connect error: {e}")).unwrap_err()
    }

    fn tls(e: TlsError) -> pingora::Error {
        as_pingora(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    #[test]
    fn reasons_from_the_texts_rustls_and_the_socket_give() {
        use std::io::{Error, ErrorKind};
        let cases = [
            (as_pingora(Error::new(ErrorKind::UnexpectedEof, "tls handshake eof")), HandshakeFailure::Closed),
            (as_pingora(Error::from(ErrorKind::ConnectionReset)), HandshakeFailure::Closed),
            (as_pingora(Error::from_raw_os_error(104)), HandshakeFailure::Closed),
            (tls(TlsError::InvalidMessage(InvalidMessage::InvalidContentType)), HandshakeFailure::Malformed),
            (
                tls(TlsError::InappropriateMessage { expect_types: vec![], got_type: rustls::ContentType::ApplicationData }),
                HandshakeFailure::Malformed,
            ),
            (
                tls(TlsError::InappropriateHandshakeMessage { expect_types: vec![], got_type: rustls::HandshakeType::Finished }),
                HandshakeFailure::Malformed,
            ),
            (tls(TlsError::PeerIncompatible(PeerIncompatible::Tls12NotOfferedOrEnabled)), HandshakeFailure::Incompatible),
            (tls(TlsError::NoApplicationProtocol), HandshakeFailure::Incompatible),
            (tls(TlsError::AlertReceived(AlertDescription::UnknownCA)), HandshakeFailure::Alert),
            (tls(TlsError::DecryptError), HandshakeFailure::Other),
        ];
        for (e, want) in cases {
            assert_eq!(handshake_failure(&e), want, "{e}");
        }
    }
}
