//! Header values the node makes for each request (request ids, trace
//! context, durations, rate-limit numbers), cut from a per-thread buffer.
//!
//! `HeaderValue::from_bytes` copies each value into an allocation of its
//! own, and the first clone of such a value allocates again to share it. A
//! value cut from a shared buffer costs neither: cutting it and cloning it
//! each add one to the buffer's reference count, and the buffer is freed
//! when the last value cut from it is dropped. These values live until
//! their head is written, so a buffer is soon freed. A value kept longer,
//! such as the access log's request id, is copied out, so that it does not
//! keep a whole buffer alive.

use std::cell::RefCell;

use bytes::BytesMut;
use http::HeaderValue;

/// The size of a buffer: about a hundred request ids.
const BUFFER_SIZE: usize = 4096;

thread_local! {
    /// The unused end of the current thread's buffer.
    static BUFFER: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// Returns `text` as a header value cut from this thread's buffer, or
/// `None` when `text` is not a valid header value.
pub fn shared(text: &[u8]) -> Option<HeaderValue> {
    let bytes = BUFFER.with_borrow_mut(|buffer| {
        if buffer.capacity() < text.len() {
            *buffer = BytesMut::with_capacity(BUFFER_SIZE.max(text.len()));
        }
        buffer.extend_from_slice(text);
        buffer.split().freeze()
    });
    HeaderValue::from_maybe_shared(bytes).ok()
}

/// Returns a copy of `value` in an allocation of its own, for a value kept
/// after its request's head is written.
pub fn owned(value: &HeaderValue) -> HeaderValue {
    let mut copy =
        HeaderValue::from_bytes(value.as_bytes()).expect("a header value's bytes are valid");
    copy.set_sensitive(value.is_sensitive());
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_share_one_buffer() {
        let first = shared(b"0123456789abcdef").expect("hex digits");
        let second = shared(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .expect("a traceparent");
        assert_eq!(first, "0123456789abcdef");
        assert_eq!(
            second,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        // Consecutive values sit side by side in one buffer.
        assert_eq!(
            first.as_bytes().as_ptr_range().end,
            second.as_bytes().as_ptr()
        );
        // A value longer than what is left starts a new buffer.
        let long = vec![b'a'; BUFFER_SIZE * 2];
        assert_eq!(shared(&long).expect("letters").len(), long.len());
        assert_eq!(shared(b"after").expect("letters"), "after");
    }

    #[test]
    fn invalid_values_rejected() {
        assert!(shared(b"line\r\nbreak").is_none());
        assert_eq!(shared(b"still works").expect("letters"), "still works");
    }

    #[test]
    fn owned_copy_keeps_value() {
        let mut value = shared(b"secret").expect("letters");
        value.set_sensitive(true);
        let copy = owned(&value);
        assert_eq!(copy, "secret");
        assert!(copy.is_sensitive());
        assert_ne!(copy.as_bytes().as_ptr(), value.as_bytes().as_ptr());
    }
}
