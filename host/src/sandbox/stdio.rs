//! The guest's stdout and stderr: bounded in-memory captures that the host
//! drains after every call.
//!
//! wasmtime-wasi's `MemoryOutputPipe` cannot be emptied and traps once full,
//! which suits an instance that lives for one event. An instance that
//! serves many events needs its output taken per call, and a chatty guest
//! should lose its excess output, not its event.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Output kept per call beyond which writes are dropped.
const CAPACITY: usize = 64 << 10;

#[derive(Default)]
struct Captured {
    bytes: BytesMut,
    dropped: usize,
}

/// One captured stream. Clones share the buffer.
#[derive(Clone, Default)]
pub(crate) struct Capture(Arc<Mutex<Captured>>);

impl Capture {
    fn lock(&self) -> MutexGuard<'_, Captured> {
        // A write cannot panic halfway through updating the buffer.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, bytes: &[u8]) {
        let mut captured = self.lock();
        let room = CAPACITY.saturating_sub(captured.bytes.len());
        let kept = bytes.len().min(room);
        captured.bytes.extend_from_slice(&bytes[..kept]);
        captured.dropped += bytes.len() - kept;
    }

    /// Everything written since the last take, and how many bytes were
    /// dropped over capacity.
    pub(crate) fn take(&self) -> (Bytes, usize) {
        let mut captured = self.lock();
        let dropped = std::mem::take(&mut captured.dropped);
        (captured.bytes.split().freeze(), dropped)
    }

    /// What was written since the last take, leaving it in place.
    pub(crate) fn peek(&self) -> Bytes {
        Bytes::copy_from_slice(&self.lock().bytes)
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always writable: what does not fit is dropped, never blocked on.
        Ok(CAPACITY)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_drains_and_excess_is_dropped() {
        let capture = Capture::default();
        capture.push(b"hello ");
        capture.push(b"world");
        assert_eq!(capture.take(), (Bytes::from_static(b"hello world"), 0));
        assert_eq!(capture.take(), (Bytes::new(), 0));
        capture.push(&vec![b'x'; CAPACITY + 10]);
        let (kept, dropped) = capture.take();
        assert_eq!((kept.len(), dropped), (CAPACITY, 10));
    }
}
