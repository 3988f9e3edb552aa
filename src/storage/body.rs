//! An object's bytes on their way from the store to the client.
//!
//! [`ObjectBody`] wraps `object_store`'s byte stream with the idle timeout (the longest
//! wait for one chunk) and a count of the bytes announced in `Content-Length`, so a
//! store that stops, ends early or sends too much is an error, never a silent
//! truncation. [`stream_object`] pulls one chunk, writes it, and only then pulls the
//! next: the edge holds at most a chunk per response, however large the object and
//! however slow the client.

use super::{Redactor, StorageError};
use bytes::Bytes;
use futures_util::stream::{BoxStream, Fuse};
use futures_util::StreamExt;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The bytes of one GET (the whole object or its range), read chunk by chunk.
pub struct ObjectBody {
    /// Fused: once it has ended (or failed), it stays ended, however often it is asked.
    stream: Fuse<BoxStream<'static, object_store::Result<Bytes>>>,
    /// Bytes still to come (of those announced).
    left: u64,
    idle: Duration,
    redactor: Arc<Redactor>,
}

impl fmt::Debug for ObjectBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectBody").field("left", &self.left).field("idle", &self.idle).finish_non_exhaustive()
    }
}

impl ObjectBody {
    pub(super) fn new(
        stream: BoxStream<'static, object_store::Result<Bytes>>,
        len: u64,
        idle: Duration,
        redactor: Arc<Redactor>,
    ) -> ObjectBody {
        ObjectBody { stream: stream.fuse(), left: len, idle, redactor }
    }

    /// Bytes not yet returned by [`ObjectBody::next`].
    pub fn remaining(&self) -> u64 {
        self.left
    }

    /// The next non-empty chunk, `Ok(None)` at the end (and on every later call).
    /// Errors: `Timeout` when the store sends nothing for the idle timeout;
    /// `Unavailable` when it fails, ends before the announced length (also on every
    /// call after a failure) or sends more than it.
    pub async fn next(&mut self) -> Result<Option<Bytes>, StorageError> {
        let idle = self.idle;
        let polled = tokio::time::timeout(idle, self.next_chunk()).await.map_err(|_| StorageError::Timeout)?;
        match polled {
            None if self.left == 0 => Ok(None),
            None => Err(StorageError::Unavailable(format!("the store ended the object {} bytes early", self.left))),
            Some(Err(e)) => Err(StorageError::Unavailable(self.redactor.message(&e))),
            Some(Ok(chunk)) => match self.left.checked_sub(chunk.len() as u64) {
                Some(left) => {
                    self.left = left;
                    Ok(Some(chunk))
                }
                None => Err(StorageError::Unavailable("the store sent more bytes than the object's length".into())),
            },
        }
    }

    /// The stream's next item, skipping empty chunks.
    async fn next_chunk(&mut self) -> Option<object_store::Result<Bytes>> {
        loop {
            match self.stream.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                other => return other,
            }
        }
    }
}

/// Writes `body` to the client chunk by chunk, each written (awaited) before the next
/// is read, then ends the body. A client write error returns it and drops `body`
/// (cancelling the store's read). A store failure mid-body returns an upstream error
/// (`ReadTimedout` or `ReadError`) without ending the body: the caller must close
/// the connection, so the client sees a short body against `Content-Length`, never a
/// silent truncation on a kept-alive connection.
pub async fn stream_object(session: &mut pingora::proxy::Session, mut body: ObjectBody) -> pingora::Result<()> {
    loop {
        match body.next().await {
            Ok(Some(chunk)) => session.write_response_body(Some(chunk), false).await?,
            Ok(None) => return session.write_response_body(None, true).await,
            Err(e) => return Err(body_error(e)),
        }
    }
}

/// A store failure mid-body as a pingora upstream error.
fn body_error(e: StorageError) -> pingora::BError {
    use pingora::{Error, ErrorType};
    let kind = match e {
        StorageError::Timeout => ErrorType::ReadTimedout,
        _ => ErrorType::ReadError,
    };
    Error::because(kind, "reading a storage object", e).into_up()
}
