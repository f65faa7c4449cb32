//! A guest's stderr. Every write is accepted and only the last bytes are
//! kept, so a panic message after much output still reaches the node's log,
//! and a guest that prints a lot does not fail.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// The maximum bytes a guest may write in one call to the stream. It may
/// write again right away.
const WRITE_PERMIT: usize = 64 * 1024;

/// The end of what a guest wrote to stderr, shared by every stream the
/// guest opens on it.
#[derive(Clone)]
pub struct StderrTail {
    capacity: usize,
    tail: Arc<Mutex<Tail>>,
}

#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    /// Bytes written before `bytes` and dropped.
    dropped: u64,
}

impl StderrTail {
    /// Creates a tail that keeps the last `capacity` bytes.
    pub fn new(capacity: usize) -> StderrTail {
        StderrTail {
            capacity,
            tail: Arc::default(),
        }
    }

    fn push(&self, data: &[u8]) {
        let mut tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        if data.len() >= self.capacity {
            tail.dropped += (tail.bytes.len() + data.len() - self.capacity) as u64;
            tail.bytes.clear();
            tail.bytes
                .extend_from_slice(&data[data.len() - self.capacity..]);
            return;
        }
        tail.bytes.extend_from_slice(data);
        // Trimming only past twice the capacity keeps the cost of the
        // moves linear in the bytes written.
        if tail.bytes.len() > 2 * self.capacity {
            let excess = tail.bytes.len() - self.capacity;
            tail.bytes.drain(..excess);
            tail.dropped += excess as u64;
        }
    }

    /// Returns the last bytes written, after a note of how many came before
    /// them when some were dropped.
    pub fn text(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        let start = tail.bytes.len().saturating_sub(self.capacity);
        let dropped = tail.dropped + start as u64;
        let text = String::from_utf8_lossy(&tail.bytes[start..]);
        if dropped == 0 {
            text.into_owned()
        } else {
            format!("[{dropped} earlier bytes not kept] {text}")
        }
    }
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for StderrTail {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_PERMIT)
    }
}

impl Pollable for StderrTail {
    /// Returns at once, because a write never waits.
    fn ready<'a, 'f>(&'a mut self) -> Pin<Box<dyn Future<Output = ()> + Send + 'f>>
    where
        'a: 'f,
        Self: 'f,
    {
        Box::pin(std::future::ready(()))
    }
}

impl AsyncWrite for StderrTail {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_all_under_capacity() {
        let tail = StderrTail::new(8);
        tail.push(b"abc");
        tail.push(b"def");
        assert_eq!(tail.text(), "abcdef");
    }

    #[test]
    fn keeps_last_bytes_counts_rest() {
        let tail = StderrTail::new(8);
        for _ in 0..10 {
            tail.push(b"0123456789");
        }
        tail.push(b"panic!");
        assert_eq!(tail.text(), "[98 earlier bytes not kept] 89panic!");
    }

    #[test]
    fn long_write_keeps_its_end() {
        let tail = StderrTail::new(4);
        tail.push(b"ab");
        tail.push(b"0123456789");
        assert_eq!(tail.text(), "[8 earlier bytes not kept] 6789");
    }
}
