// miosa-edge patch (vendor/README.md, pingora-core 2): a write buffer that sends what
// it holds together with a large write, in one `writev`. Public so that miosa-edge's
// tests (tests/edge/coalesce.rs) can hold it to its contract.

//! tokio's `BufWriter`, which pingora puts in front of every connection, flushes what it
//! holds with one syscall and then writes a large buffer with a second: an HTTP/1
//! response head (buffered) followed by a body larger than the buffer left room for
//! went out as two sends and two TCP segments. [`CoalescingWriter`] buffers small writes
//! the same way, but sends its buffer and the large write together.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A write buffer of a fixed capacity in front of `W`; reads pass through.
#[derive(Debug)]
pub struct CoalescingWriter<W> {
    inner: W,
    buf: Vec<u8>,
    /// Bytes of `buf` already written (a partial write of the buffer alone).
    written: usize,
    capacity: usize,
}

impl<W: AsyncWrite + Unpin> CoalescingWriter<W> {
    pub fn with_capacity(capacity: usize, inner: W) -> Self {
        CoalescingWriter {
            inner,
            buf: Vec::with_capacity(capacity),
            written: 0,
            capacity,
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The inner writer; anything still buffered is lost.
    pub fn into_inner(self) -> W {
        self.inner
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.written..]
    }

    /// Account for `n` bytes written of the buffer.
    fn consume(&mut self, n: usize) {
        self.written += n;
        if self.written == self.buf.len() {
            self.buf.clear();
            self.written = 0;
        }
    }

    fn poll_flush_buf(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending().is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.consume(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for CoalescingWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.buf.len() + data.len() <= this.capacity {
            this.buf.extend_from_slice(data);
            return Poll::Ready(Ok(data.len()));
        }
        // Too large for the room left: whatever is buffered goes out with `data`.
        loop {
            let held = this.pending().len();
            if held == 0 {
                return Pin::new(&mut this.inner).poll_write(cx, data);
            }
            let n = if this.inner.is_write_vectored() {
                let slices = [IoSlice::new(&this.buf[this.written..]), IoSlice::new(data)];
                ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &slices))?
            } else {
                ready!(Pin::new(&mut this.inner).poll_write(cx, &this.buf[this.written..]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n >= held {
                this.consume(held);
                // What was taken of `data` was written; if nothing was, the next
                // round writes `data` alone.
                if n > held {
                    return Poll::Ready(Ok(n - held));
                }
            } else {
                this.consume(n);
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let this = &mut *self;
        if this.buf.len() + total <= this.capacity {
            for b in bufs {
                this.buf.extend_from_slice(b);
            }
            return Poll::Ready(Ok(total));
        }
        ready!(this.poll_flush_buf(cx))?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_flush_buf(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_flush_buf(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<W: AsyncRead + Unpin> AsyncRead for CoalescingWriter<W> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}
