//! The upstream keep-alive pool patched into pingora-core (vendor/README.md, pingora-core 5):
//! idle connections kept without a task each, reused newest first, and closed when they pass
//! their idle timeout, when their peer closes them, when they hold data nobody asked for, or
//! when the pool is full — through pingora's own `TransportConnector`, on real sockets.

use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::protocols::Stream;
use pingora::upstreams::peer::{BasicPeer, Peer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A loopback listener and a peer for it.
async fn origin() -> (TcpListener, BasicPeer) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = BasicPeer::new(&listener.local_addr().unwrap().to_string());
    (listener, peer)
}

/// A new connection from `connector` to `peer`, and the origin's end of it.
async fn connect(connector: &TransportConnector, listener: &TcpListener, peer: &BasicPeer) -> (Stream, TcpStream) {
    let stream = connector.new_stream(peer).await.unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (stream, server)
}

/// Whether the origin's end sees the edge close the connection within `limit`.
async fn closed_within(server: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1];
    matches!(tokio::time::timeout(limit, server.read(&mut buf)).await, Ok(Ok(0)))
}

#[tokio::test]
async fn idle_connections_are_reused_newest_first_without_a_task_each() {
    let (listener, peer) = origin().await;
    let connector = TransportConnector::new(None);
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks = metrics.num_alive_tasks();
    let mut servers = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..8 {
        let (stream, server) = connect(&connector, &listener, &peer).await;
        ids.push(stream.id());
        connector.release_stream(stream, peer.reuse_hash(), Some(Duration::from_secs(60)));
        servers.push(server);
    }
    // pingora 0.9.1 spawned a task to watch each idle connection (8 here); one sweeper now
    assert_eq!(metrics.num_alive_tasks(), tasks + 1, "tasks alive for 8 idle connections");
    let (newest, reused) = connector.get_stream(&peer).await.unwrap();
    assert!(reused);
    assert_eq!(newest.id(), ids[7]);
    let (next, reused) = connector.get_stream(&peer).await.unwrap();
    assert!(reused);
    assert_eq!(next.id(), ids[6]);
    // a reused connection still carries bytes both ways
    let mut next = next;
    next.write_all(b"ping").await.unwrap();
    next.flush().await.unwrap();
    let mut got = [0u8; 4];
    servers[6].read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    // another origin finds nothing of these
    let (_other_listener, other) = origin().await;
    assert!(connector.reused_stream(&other).await.is_none());
}

#[tokio::test]
async fn the_oldest_idle_connection_beyond_the_pool_size_is_closed() {
    let connector = TransportConnector::new(Some(ConnectorOptions::new(2)));
    let mut servers = Vec::new();
    let mut peers = Vec::new();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        let (listener, peer) = origin().await;
        let (stream, server) = connect(&connector, &listener, &peer).await;
        connector.release_stream(stream, peer.reuse_hash(), None);
        servers.push(server);
        peers.push(peer);
        listeners.push(listener);
    }
    assert!(closed_within(&mut servers[0], Duration::from_secs(2)).await, "the oldest was not closed");
    assert!(connector.reused_stream(&peers[0]).await.is_none());
    assert!(!closed_within(&mut servers[1], Duration::from_millis(50)).await);
    assert!(connector.reused_stream(&peers[1]).await.is_some());
    assert!(connector.reused_stream(&peers[2]).await.is_some());
}

#[tokio::test]
async fn connections_closed_by_their_peer_or_holding_stray_data_are_not_reused() {
    let (listener, peer) = origin().await;
    let connector = TransportConnector::new(None);
    let (good, _good_server) = connect(&connector, &listener, &peer).await;
    let good_id = good.id();
    connector.release_stream(good, peer.reuse_hash(), None);
    let (closed, closed_server) = connect(&connector, &listener, &peer).await;
    connector.release_stream(closed, peer.reuse_hash(), None);
    drop(closed_server);
    let (chatty, mut chatty_server) = connect(&connector, &listener, &peer).await;
    connector.release_stream(chatty, peer.reuse_hash(), None);
    chatty_server.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
    // the runtime's I/O driver records the close and the data while nothing waits on them
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (stream, reused) = connector.get_stream(&peer).await.unwrap();
    assert!(reused);
    assert_eq!(stream.id(), good_id, "the newest usable connection is the first one released");
    assert_eq!(connector.unexpected_data_connection_count(), 1);
    assert!(connector.reused_stream(&peer).await.is_none());
}

#[tokio::test]
async fn idle_connections_are_closed_after_their_idle_timeout_without_being_asked_for() {
    let (listener, peer) = origin().await;
    let gone = Arc::new(AtomicU64::new(0));
    let counted = gone.clone();
    let mut options = ConnectorOptions::new(16);
    options.keepalive_pool_callback = Some(Arc::new(move |_| {
        counted.fetch_add(1, Ordering::Relaxed);
    }));
    let connector = TransportConnector::new(Some(options));
    let (short, mut short_server) = connect(&connector, &listener, &peer).await;
    connector.release_stream(short, peer.reuse_hash(), Some(Duration::from_millis(100)));
    let (_other_listener, other) = origin().await;
    let (long, mut long_server) = connect(&connector, &_other_listener, &other).await;
    connector.release_stream(long, other.reuse_hash(), Some(Duration::from_secs(60)));
    assert!(closed_within(&mut short_server, Duration::from_secs(3)).await, "not closed after its idle timeout");
    assert!(!closed_within(&mut long_server, Duration::from_millis(100)).await);
    assert_eq!(gone.load(Ordering::Relaxed), 1, "the pool callback hears of each connection it closes");
    assert!(connector.reused_stream(&peer).await.is_none());
    assert!(connector.reused_stream(&other).await.is_some());
    // the sweeper stops when the pool is empty and the next release starts another
    let metrics = tokio::runtime::Handle::current().metrics();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(metrics.num_alive_tasks(), 0, "the sweeper of an empty pool still runs");
    let (again, mut again_server) = connect(&connector, &listener, &peer).await;
    connector.release_stream(again, peer.reuse_hash(), Some(Duration::from_millis(100)));
    assert!(closed_within(&mut again_server, Duration::from_secs(3)).await, "no sweeper after the pool emptied");
}

/// vendor/README.md, pingora-core 6: asking the connector for an upstream session is part
/// of every proxied request's future, which pingora moves into a new box on every request;
/// the connect path (rustls' handshake inline, ~8 KiB) is boxed where a connection is
/// made, so it no longer makes that future 8 KiB larger.
#[test]
fn the_upstream_session_future_does_not_carry_the_connect_path() {
    use pingora::connectors::http::Connector;
    use pingora::upstreams::peer::HttpPeer;
    let connector = Connector::new(None);
    let peer = HttpPeer::new("127.0.0.1:9", false, String::new());
    let fut = connector.get_http_session(&peer);
    let size = std::mem::size_of_val(&fut);
    drop(fut);
    assert!(size < 2048, "get_http_session's future is {size} bytes");
    let transport = TransportConnector::new(None);
    let fut = transport.get_stream(&peer);
    let size = std::mem::size_of_val(&fut);
    drop(fut);
    assert!(size < 1024, "get_stream's future is {size} bytes");
}
