//! The write buffer patched into pingora-core (vendor/README.md, pingora-core 2): small
//! writes gathered, what is buffered sent together with a large write, and no byte lost,
//! repeated or reordered whatever the socket accepts per call.

use pingora::protocols::l4::coalesce::CoalescingWriter;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;

/// Records each write call, accepting at most `limit` bytes per call.
#[derive(Default)]
struct Recorder {
    calls: Vec<Vec<u8>>,
    limit: usize,
    vectored: bool,
}

impl AsyncWrite for Recorder {
    fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let n = data.len().min(self.limit);
        self.calls.push(data[..n].to_vec());
        Poll::Ready(Ok(n))
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let n = all.len().min(self.limit);
        self.calls.push(all[..n].to_vec());
        Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        self.vectored
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn recorder(limit: usize, vectored: bool) -> Recorder {
    Recorder { calls: Vec::new(), limit, vectored }
}

#[tokio::test]
async fn a_head_and_a_large_body_leave_in_one_write() {
    let mut w = CoalescingWriter::with_capacity(1460, recorder(usize::MAX, true));
    w.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
    assert!(w.get_ref().calls.is_empty(), "a small write is buffered");
    let body = vec![b'x'; 100_000];
    w.write_all(&body).await.unwrap();
    w.flush().await.unwrap();
    let calls = &w.get_ref().calls;
    assert_eq!(calls.len(), 1, "head and body in one call");
    assert_eq!(&calls[0][..19], b"HTTP/1.1 200 OK\r\n\r\n");
    assert_eq!(calls[0].len(), 19 + 100_000);
}

#[tokio::test]
async fn small_writes_are_gathered_until_a_flush() {
    let mut w = CoalescingWriter::with_capacity(1460, recorder(usize::MAX, true));
    w.write_all(b"head\r\n\r\n").await.unwrap();
    w.write_all(&[b'y'; 1000]).await.unwrap();
    assert!(w.get_ref().calls.is_empty());
    w.flush().await.unwrap();
    assert_eq!(w.get_ref().calls.len(), 1);
    assert_eq!(w.get_ref().calls[0].len(), 1008);
}

/// Short writes anywhere — inside the buffered bytes, at their end, inside the
/// large write — lose and repeat nothing, with and without vectored writes.
#[tokio::test]
async fn short_writes_keep_every_byte_in_order() {
    for vectored in [true, false] {
        for limit in [1, 7, 19, 20, 21, 500, 4096] {
            let mut w = CoalescingWriter::with_capacity(64, recorder(limit, vectored));
            let mut want = Vec::new();
            for (i, len) in [19usize, 3, 200, 5, 64, 1, 1000].into_iter().enumerate() {
                let chunk: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
                w.write_all(&chunk).await.unwrap();
                want.extend_from_slice(&chunk);
            }
            let slices = [IoSlice::new(b"ab"), IoSlice::new(&[b'z'; 100])];
            let n = w.write_vectored(&slices).await.unwrap();
            let all: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            want.extend_from_slice(&all[..n]);
            w.shutdown().await.unwrap();
            let got: Vec<u8> = w.get_ref().calls.concat();
            assert_eq!(got, want, "limit {limit}, vectored {vectored}");
        }
    }
}

#[tokio::test]
async fn a_zero_capacity_writes_straight_through() {
    let mut w = CoalescingWriter::with_capacity(0, recorder(usize::MAX, true));
    w.write_all(b"abc").await.unwrap();
    assert_eq!(w.get_ref().calls, vec![b"abc".to_vec()]);
}
