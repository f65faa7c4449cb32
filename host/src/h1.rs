//! An HTTP/1.1 client connection that the request's own task drives.
//!
//! hyper's client runs each connection in a task of its own and hands the
//! request, the response and every body frame across channels, so every
//! proxied request wakes a second task. Here the request's task writes the
//! request and reads the response itself: [`Connection::send`] writes the
//! head and the body until the response head arrives, and the response's
//! [`ResponseBody`] reads the rest, still sending what is left of the
//! request body. The connection goes back to its owner's pool from the
//! finished body ([`ResponseBody::take_connection`]).
//!
//! Responses are framed as RFC 9112, section 6.3 sets out. HEAD requests,
//! 1xx, 204 and 304 have no body. A body is chunked when
//! `Transfer-Encoding` is `chunked` alone, which wins over `Content-Length`
//! (and then the connection is not reused). Otherwise `Content-Length`
//! frames it when every value agrees, and without one the body runs until
//! the upstream closes the connection.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::proxy::{BoxError, OpenConnection};

/// The maximum number of header fields in a response head or a trailer
/// section.
const MAX_HEADERS: usize = 100;

/// The largest response head, and the largest trailer section, in bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Header fields the node may add to a response on its way to the client.
const RESPONSE_FIELDS_ADDED: usize = 10;

/// The maximum length of a chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;

/// The maximum number of chunk extension bytes in a response body, as
/// hyper limits them.
const MAX_EXTENSION_BYTES: usize = 16 * 1024;

/// The minimum free space a read offers the socket to fill.
const MIN_READ: usize = 8 * 1024;

/// The maximum free space a read offers, reached by doubling after reads
/// that fill theirs.
const MAX_READ: usize = 64 * 1024;

/// The failure of an exchange.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the request failed: {0}")]
    Write(#[source] io::Error),
    #[error("reading the response failed: {0}")]
    Read(#[source] io::Error),
    #[error("the upstream closed the connection before it sent a response")]
    ClosedBeforeResponse,
    #[error("the upstream closed the connection before the end of the response head")]
    ClosedInHead,
    #[error("the upstream closed the connection before the end of the response body")]
    IncompleteBody,
    #[error("invalid response head: {0}")]
    InvalidHead(&'static str),
    #[error("invalid response head: {0}")]
    Parse(#[from] httparse::Error),
    #[error("the response head is larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("invalid chunked encoding in the response body: {0}")]
    InvalidChunk(&'static str),
    /// The request's own body failed, such as a client that went away or
    /// crossed the route's size limit.
    #[error("request body failed: {0}")]
    RequestBody(#[source] BoxError),
    #[error("the request body does not match its Content-Length")]
    RequestBodyLength,
}

/// The request or request head that [`Connection::send`] writes.
pub enum ToSend<'r, B> {
    /// A request, which the connection takes. It is boxed because it moves
    /// through the caller's futures.
    Request(Box<Request<B>>),
    /// The head of a request without a body, lent by a caller that keeps it
    /// to send it again elsewhere should this attempt fail.
    Head(&'r http::request::Parts),
}

/// A failed exchange. When none of the request was written, `unsent`
/// contains it, so that it may go out on another connection.
pub struct SendFailure<'r, B> {
    pub error: Error,
    pub unsent: Option<ToSend<'r, B>>,
}

/// An open HTTP/1.1 connection to an upstream, idle between exchanges.
///
/// Boxed, because each request moves its connection from the pool into
/// the exchange and the response body and back again.
pub struct Connection(Box<ConnectionState>);

/// A connection's socket and buffers.
pub struct ConnectionState {
    io: TcpStream,
    /// Bytes read and not yet consumed. Body frames are split off it, so
    /// they share its allocation until the client has written them.
    read: BytesMut,
    /// Free space the next read offers.
    read_size: usize,
    /// Bytes to write, from `written` on; its allocation is reused.
    write: Vec<u8>,
    written: usize,
    _open: OpenConnection,
}

impl std::ops::Deref for Connection {
    type Target = ConnectionState;

    fn deref(&self) -> &ConnectionState {
        &self.0
    }
}

impl std::ops::DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut ConnectionState {
        &mut self.0
    }
}

impl Connection {
    /// Wraps a connected socket; `open` counts the connection until it
    /// drops.
    pub(crate) fn new(io: TcpStream, open: OpenConnection) -> Connection {
        Connection(Box::new(ConnectionState {
            io,
            read: BytesMut::new(),
            read_size: MIN_READ,
            write: Vec::new(),
            written: 0,
            _open: open,
        }))
    }

    /// Returns whether an idle connection can carry a request: the upstream
    /// has neither closed it nor sent anything since the last response.
    ///
    /// The check polls the socket once without registering interest, so it
    /// makes no system call when the runtime has seen no event on it.
    pub fn is_usable(&mut self) -> bool {
        self.poll_usable(&mut Context::from_waker(Waker::noop()))
    }

    /// Returns whether an idle connection can carry a request, as
    /// [`Connection::is_usable`] does, and has the socket wake `cx` when
    /// the upstream closes it or sends anything.
    pub fn poll_usable(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        matches!(self.poll_fill(cx), Poll::Pending)
    }

    /// Sends a request and returns its response once the head has arrived;
    /// the body reads the rest.
    ///
    /// The request goes out as given, with `Content-Length` or chunked
    /// framing added when the request has a body and neither header. What
    /// fails before any of it was written comes back in the same form.
    pub async fn send<'r, B>(
        self,
        request: ToSend<'r, B>,
    ) -> Result<Response<ResponseBody<B>>, SendFailure<'r, B>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = match request {
            ToSend::Request(request) => request.into_parts(),
            ToSend::Head(parts) => {
                let mut exchange = Exchange::begin(self, parts, false);
                if let Err(error) = std::future::poll_fn(|cx| exchange.poll_flush(cx)).await {
                    let unsent = (!exchange.sent_any).then_some(ToSend::Head(parts));
                    return Err(SendFailure { error, unsent });
                }
                let head_request = parts.method == Method::HEAD;
                let received = exchange.receive(head_request, HeaderMap::new()).await;
                return received.map_err(|error| SendFailure {
                    error,
                    unsent: None,
                });
            }
        };
        let (mut exchange, unsent_body) = Exchange::start(self, &mut parts, body);
        // A pooled connection that the upstream closed fails on its first
        // write. The head goes out first, before any of the body is read, so
        // that such a request can go out again elsewhere.
        if let Err(error) = std::future::poll_fn(|cx| exchange.poll_flush(cx)).await {
            let body = exchange.outgoing.take().map(|outgoing| outgoing.body);
            let unsent = match exchange.sent_any {
                true => None,
                false => body
                    .or(unsent_body)
                    .map(|body| ToSend::Request(Box::new(Request::from_parts(parts, body)))),
            };
            return Err(SendFailure { error, unsent });
        }
        drop(unsent_body);
        let head_request = parts.method == Method::HEAD;
        // The response's fields go into the request's map, whose memory is
        // no longer needed.
        let headers = std::mem::take(&mut parts.headers);
        drop(parts);
        let received = exchange.receive(head_request, headers).await;
        received.map_err(|error| SendFailure {
            error,
            unsent: None,
        })
    }

    /// Reads more bytes into `read`; `Ok(0)` is the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let state = &mut *self.0;
        if state.read.capacity() - state.read.len() < state.read_size / 2 {
            state.read.reserve(state.read_size);
        }
        let space = state.read.capacity() - state.read.len();
        let read = std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut state.io),
            cx,
            &mut state.read
        ))?;
        // Large bodies read in larger pieces, as hyper's adaptive buffer
        // does; a connection that has carried one keeps the larger size.
        if read == space {
            state.read_size = (state.read_size * 2).min(MAX_READ);
        }
        Poll::Ready(Ok(read))
    }
}

/// The framing of a request body on the wire.
enum OutFraming {
    /// `Content-Length`, with the bytes still to come.
    Length(u64),
    Chunked,
}

/// The rest of a request body, until all of it is written.
struct OutgoingBody<B> {
    body: B,
    framing: OutFraming,
}

/// One request and response on a connection.
struct Exchange<B> {
    connection: Connection,
    /// `None` once the whole request body is in the write buffer. Boxed,
    /// so that requests without a body move less.
    outgoing: Option<Box<OutgoingBody<B>>>,
    /// Whether any byte of the request reached the socket.
    sent_any: bool,
    /// A write that failed after the head went out. The upstream may still
    /// respond, as one that rejects a request body early does, but the
    /// connection is not reused.
    write_failed: bool,
}

impl<B> Exchange<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Encodes the request head into the connection's write buffer. A body
    /// that is not sent, being empty or on a method that sends none, comes
    /// back with the exchange.
    fn start(
        connection: Connection,
        parts: &mut http::request::Parts,
        body: B,
    ) -> (Exchange<B>, Option<B>) {
        let framing = match body.is_end_stream() {
            true => None,
            false => request_framing(parts, &body),
        };
        let mut exchange = Exchange::begin(connection, parts, framing.is_some());
        match framing {
            Some(framing) => {
                exchange.outgoing = Some(Box::new(OutgoingBody { body, framing }));
                (exchange, None)
            }
            None => (exchange, Some(body)),
        }
    }

    /// Encodes the request head into the connection's write buffer, with
    /// `Transfer-Encoding` only when a body follows.
    fn begin(mut connection: Connection, parts: &http::request::Parts, body_sent: bool) -> Self {
        connection.written = 0;
        connection.write.clear();
        encode_head(&mut connection.write, parts, body_sent);
        Exchange {
            connection,
            outgoing: None,
            sent_any: false,
            write_failed: false,
        }
    }

    /// Reads the response head into `headers`, sending the rest of the
    /// request body meanwhile, and returns the response, whose body reads
    /// the rest.
    async fn receive(
        mut self,
        head_request: bool,
        mut headers: HeaderMap,
    ) -> Result<Response<ResponseBody<B>>, Error> {
        let head =
            std::future::poll_fn(|cx| self.poll_head(cx, head_request, &mut headers)).await?;
        let mut body = ResponseBody {
            exchange: Some(self),
            framing: head.framing,
            keep_alive: head.keep_alive,
            hop_by_hop_removed: head.hop_by_hop_removed,
            done: false,
            extension_bytes: 0,
            chunk_error: None,
        };
        body.advance_framing();
        Ok(Response::from_parts(head.parts, body))
    }

    /// Writes the buffered bytes.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let connection = &mut *self.connection.0;
        while connection.written < connection.write.len() {
            let pending = &connection.write[connection.written..];
            match std::task::ready!(Pin::new(&mut connection.io).poll_write(cx, pending)) {
                Ok(0) => return Poll::Ready(Err(Error::Write(io::ErrorKind::WriteZero.into()))),
                Ok(written) => {
                    connection.written += written;
                    self.sent_any = true;
                }
                Err(error) => return Poll::Ready(Err(Error::Write(error))),
            }
        }
        connection.write.clear();
        connection.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes the buffered bytes, then the body's frames as they come,
    /// until the whole request is written or a write or the body waits.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            std::task::ready!(self.poll_flush(cx))?;
            let Some(outgoing) = &mut self.outgoing else {
                return Poll::Ready(Ok(()));
            };
            let write = &mut self.connection.write;
            let finished = match std::task::ready!(Pin::new(&mut outgoing.body).poll_frame(cx)) {
                None => true,
                Some(Err(error)) => return Poll::Ready(Err(Error::RequestBody(error.into()))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        outgoing.encode_data(&data, write)?;
                        outgoing.body.is_end_stream()
                    }
                    // Trailers end the body. hyper's client sends request
                    // trailers only when a `Trailer` field names them, and
                    // that field is hop-by-hop, so neither does this one.
                    Err(frame) => frame.is_trailers(),
                },
            };
            if finished {
                let outgoing = self.outgoing.take().expect("the body is still being sent");
                outgoing.encode_end(write)?;
            }
        }
    }

    /// Writes the request and reads until a final response head has
    /// arrived, skipping any 1xx response before it.
    /// The head's fields go into `headers`, which is cleared first.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
        headers: &mut HeaderMap,
    ) -> Poll<Result<Head, Error>> {
        loop {
            self.poll_request_body(cx)?;
            let read = &mut self.connection.read;
            if !read.is_empty() {
                if let Some(head) = parse_head(read, head_request, headers)? {
                    return Poll::Ready(Ok(head));
                }
            }
            match std::task::ready!(self.connection.poll_fill(cx)) {
                Ok(0) if self.connection.read.is_empty() => {
                    return Poll::Ready(Err(Error::ClosedBeforeResponse))
                }
                Ok(0) => return Poll::Ready(Err(Error::ClosedInHead)),
                Ok(_) => {}
                Err(error) => return Poll::Ready(Err(Error::Read(error))),
            }
        }
    }

    /// Sends what it can of the rest of the request body without waiting.
    /// A failed write stops the sending but not the exchange, because the
    /// upstream may have responded before reading the whole body. The
    /// request's own body failing ends the exchange.
    fn poll_request_body(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        if self.write_failed || (self.outgoing.is_none() && self.connection.write.is_empty()) {
            return Ok(());
        }
        match self.poll_write(cx) {
            Poll::Ready(Err(error @ Error::RequestBody(_))) => Err(error),
            Poll::Ready(Err(error @ Error::RequestBodyLength)) => Err(error),
            Poll::Ready(Err(error)) => {
                tracing::debug!(%error, "stopped sending a request body");
                self.write_failed = true;
                self.outgoing = None;
                Ok(())
            }
            Poll::Ready(Ok(())) | Poll::Pending => Ok(()),
        }
    }

    /// Returns whether the whole request went out.
    fn is_sent(&self) -> bool {
        !self.write_failed && self.outgoing.is_none() && self.connection.write.is_empty()
    }
}

impl<B: Body<Data = Bytes>> OutgoingBody<B> {
    fn encode_data(&mut self, data: &Bytes, write: &mut Vec<u8>) -> Result<(), Error> {
        match &mut self.framing {
            OutFraming::Length(remaining) => {
                let length = data.len() as u64;
                if length > *remaining {
                    return Err(Error::RequestBodyLength);
                }
                *remaining -= length;
                write.extend_from_slice(data);
            }
            OutFraming::Chunked if data.is_empty() => {}
            OutFraming::Chunked => {
                write_hex(write, data.len());
                write.extend_from_slice(b"\r\n");
                write.extend_from_slice(data);
                write.extend_from_slice(b"\r\n");
            }
        }
        Ok(())
    }

    fn encode_end(self, write: &mut Vec<u8>) -> Result<(), Error> {
        match self.framing {
            OutFraming::Length(0) => Ok(()),
            OutFraming::Length(_) => Err(Error::RequestBodyLength),
            OutFraming::Chunked => {
                write.extend_from_slice(b"0\r\n\r\n");
                Ok(())
            }
        }
    }
}

/// Encodes a request head as HTTP/1.1 into `write`. Without a body to send,
/// the head has no `Transfer-Encoding`, because there is no coding to
/// announce.
fn encode_head(write: &mut Vec<u8>, parts: &http::request::Parts, body_sent: bool) {
    write.extend_from_slice(parts.method.as_str().as_bytes());
    write.push(b' ');
    // `path` is `/` when the target has only a query.
    match parts.uri.path_and_query() {
        Some(target) => {
            write.extend_from_slice(target.path().as_bytes());
            if let Some(query) = target.query() {
                write.push(b'?');
                write.extend_from_slice(query.as_bytes());
            }
        }
        None => write.push(b'/'),
    }
    write.extend_from_slice(b" HTTP/1.1\r\n");

    for (name, value) in &parts.headers {
        if !body_sent && name == header::TRANSFER_ENCODING {
            continue;
        }
        write.extend_from_slice(name.as_str().as_bytes());
        write.extend_from_slice(b": ");
        write.extend_from_slice(value.as_bytes());
        write.extend_from_slice(b"\r\n");
    }
    write.extend_from_slice(b"\r\n");
}

/// Chooses the framing of a request body that is not known to be empty,
/// and adds the header that announces it when the request has none, as
/// hyper's client does. `Transfer-Encoding` decides first, then a valid
/// `Content-Length`, then the body's exact size. A body of unknown size is
/// chunked, except on GET, HEAD and CONNECT, where it is not sent at all
/// (`None`).
fn request_framing<B: Body>(parts: &mut http::request::Parts, body: &B) -> Option<OutFraming> {
    let headers = &mut parts.headers;
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
        if !is_chunked(headers) {
            headers.append(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        return Some(OutFraming::Chunked);
    }
    if let Some(length) = content_length(headers) {
        return Some(OutFraming::Length(length));
    }
    if let Some(length) = body.size_hint().exact() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        return Some(OutFraming::Length(length));
    }
    if matches!(parts.method, Method::GET | Method::HEAD | Method::CONNECT) {
        return None;
    }
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    Some(OutFraming::Chunked)
}

/// The framing of a response body.
#[derive(Debug)]
pub enum InFraming {
    Empty,
    /// `Content-Length`, with the bytes still to come.
    Length(u64),
    Chunked(ChunkState),
    /// Until the upstream closes the connection.
    Close,
}

/// The position of a chunked body's decoder.
#[derive(Debug)]
pub enum ChunkState {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk, with the bytes still to come.
    Data(u64),
    /// Before the line break that ends a chunk's data.
    DataEnd,
    /// After the last chunk, before the trailer section.
    Trailers,
}

/// A final response head, as the connection read it.
struct Head {
    parts: http::response::Parts,
    framing: InFraming,
    /// Whether the connection may carry another request after this one.
    keep_alive: bool,
    /// Whether the hop-by-hop fields were left out of `parts`.
    hop_by_hop_removed: bool,
}

/// Parses a final response head at the start of `read` and removes it, or
/// returns `None` when more bytes are needed. 1xx responses other than 101
/// are removed and skipped.
///
/// The hop-by-hop fields describe this connection, so they stay out of the
/// head's fields, unless `Connection` names other fields: the caller then
/// removes them all ([`crate::pipeline::remove_hop_by_hop`]). The fields go
/// into `headers`, cleared first, whose memory may then serve again.
fn parse_head(
    read: &mut BytesMut,
    head_request: bool,
    headers: &mut HeaderMap,
) -> Result<Option<Head>, Error> {
    loop {
        let mut fields = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        // Where each field's name and value start and end in `read`. The
        // head is at most `MAX_HEAD_BYTES` long, so the offsets fit in `u32`,
        // and the array stays small enough to clear cheaply.
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let mut framing = FramingFields::default();
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            read,
            &mut fields,
        )?;
        let length = match parsed {
            httparse::Status::Partial if read.len() > MAX_HEAD_BYTES => {
                return Err(Error::HeadTooLarge)
            }
            httparse::Status::Partial => return Ok(None),
            httparse::Status::Complete(length) if length > MAX_HEAD_BYTES => {
                return Err(Error::HeadTooLarge)
            }
            httparse::Status::Complete(length) => length,
        };
        let start = read.as_ptr() as usize;
        for (span, field) in spans.iter_mut().zip(response.headers.iter()) {
            let name = (field.name.as_ptr() as usize - start) as u32;
            let value = (field.value.as_ptr() as usize - start) as u32;
            let name_end = name + field.name.len() as u32;
            *span = (name, name_end, value, value + field.value.len() as u32);
            framing.note(field.name.as_bytes(), field.value);
        }
        let code = response.code.ok_or(Error::InvalidHead("missing status"))?;
        let version = match response.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let count = response.headers.len();
        // A 101 is final: the caller judges a switch of protocols that the
        // request did not ask for.
        if (100..200).contains(&code) && code != 101 {
            read.advance(length);
            continue;
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| Error::InvalidHead("invalid status code"))?;
        let head = read.split_to(length).freeze();
        let mut headers = std::mem::take(headers);
        headers.clear();
        // Room for the fields the node adds to every response (`Via`, the
        // request id, duration and node name, rate-limit headers), so that
        // adding them does not grow and rehash the map.
        headers.reserve(count + RESPONSE_FIELDS_ADDED);
        let remove_hop_by_hop = !framing.connection_options;
        for &(name_start, name_end, value_start, value_end) in &spans[..count] {
            let name = HeaderName::from_bytes(&head[name_start as usize..name_end as usize])
                .map_err(|_| Error::InvalidHead("invalid header name"))?;
            if remove_hop_by_hop && crate::pipeline::is_hop_by_hop(&name) {
                continue;
            }
            let value = head.slice(value_start as usize..value_end as usize);
            let value = HeaderValue::from_maybe_shared(value)
                .map_err(|_| Error::InvalidHead("invalid header value"))?;
            headers.append(name, value);
        }
        let (framing, keep_alive) = framing.decide(&mut headers, version, status, head_request)?;
        let mut parts = Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        return Ok(Some(Head {
            parts,
            framing,
            keep_alive,
            hop_by_hop_removed: remove_hop_by_hop,
        }));
    }
}

/// The values of a response head's framing fields, read as the head is
/// parsed so that no field is looked up again.
#[derive(Default)]
struct FramingFields {
    /// The agreed `Content-Length`; `Err` when the values are invalid or
    /// disagree.
    content_length: Option<Result<u64, ()>>,
    transfer_encoding: bool,
    /// The transfer codings listed, and whether any is not `chunked`.
    codings: usize,
    other_coding: bool,
    close: bool,
    keep_alive: bool,
    /// Whether `Connection` lists an option other than `close` and
    /// `keep-alive`, which names a field to remove.
    connection_options: bool,
}

impl FramingFields {
    fn note(&mut self, name: &[u8], value: &[u8]) {
        if name.eq_ignore_ascii_case(b"content-length") {
            let agreed = match self.content_length {
                Some(Err(())) => Err(()),
                Some(Ok(length)) => add_lengths(value, Some(length)).ok_or(()),
                None => add_lengths(value, None).ok_or(()),
            };
            self.content_length = Some(agreed);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encoding = true;
            for coding in value.split(|&byte| byte == b',') {
                let coding = coding.trim_ascii();
                if !coding.is_empty() {
                    self.codings += 1;
                    self.other_coding |= !coding.eq_ignore_ascii_case(b"chunked");
                }
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for option in value.split(|&byte| byte == b',') {
                let option = option.trim_ascii();
                if option.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if option.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else if !option.is_empty() {
                    self.connection_options = true;
                }
            }
        }
    }

    /// Chooses the framing of the response body, and whether the
    /// connection may carry another request after it.
    fn decide(
        &self,
        headers: &mut HeaderMap,
        version: Version,
        status: StatusCode,
        head_request: bool,
    ) -> Result<(InFraming, bool), Error> {
        let mut keep_alive = match version {
            Version::HTTP_10 => self.keep_alive && !self.close,
            _ => !self.close,
        };
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Ok((InFraming::Empty, false));
        }
        // RFC 9112, section 6.1: such framing is faulty, as hyper's client
        // treats it too.
        if self.transfer_encoding && version == Version::HTTP_10 {
            return Err(Error::InvalidHead(
                "Transfer-Encoding in an HTTP/1.0 response",
            ));
        }
        let no_body =
            head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        let framing = if no_body {
            InFraming::Empty
        } else if self.transfer_encoding {
            // Other codings would reach the client undecoded, and without
            // the field that names them, which is hop-by-hop.
            if self.other_coding {
                return Err(Error::InvalidHead("a transfer coding other than chunked"));
            }
            match self.codings {
                1 => {}
                0 => return Err(Error::InvalidHead("an empty Transfer-Encoding")),
                // Invalid framing (RFC 9112, section 6.1).
                _ => return Err(Error::InvalidHead("chunked applied more than once")),
            }
            // A message with both is a smuggling attempt or a broken
            // upstream: the length is dropped and the connection closed
            // after it.
            if self.content_length.is_some() {
                headers.remove(header::CONTENT_LENGTH);
                keep_alive = false;
            }
            InFraming::Chunked(ChunkState::Size)
        } else {
            match self.content_length {
                Some(Ok(0)) => InFraming::Empty,
                Some(Ok(length)) => InFraming::Length(length),
                Some(Err(())) => return Err(Error::InvalidHead("invalid Content-Length")),
                None => {
                    keep_alive = false;
                    InFraming::Close
                }
            }
        };
        Ok((framing, keep_alive))
    }
}

/// Returns the length that a `Content-Length` value gives when it and
/// `known` agree: a list of equal decimal numbers, as some upstreams repeat
/// it. `None` for an invalid value or a disagreement.
fn add_lengths(value: &[u8], mut known: Option<u64>) -> Option<u64> {
    for item in value.split(|&byte| byte == b',') {
        let item = item.trim_ascii();
        if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let parsed = item
            .iter()
            .fold(0u64, |length, digit| length * 10 + u64::from(digit - b'0'));
        if known.is_some_and(|known| known != parsed) {
            return None;
        }
        known = Some(parsed);
    }
    known
}

/// Returns the value of every `Content-Length` field when they all agree
/// and parse.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        length = Some(add_lengths(value.as_bytes(), length)?);
    }
    length
}

/// Returns whether a `Transfer-Encoding` value's last coding is `chunked`.
fn ends_in_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&byte| byte == b',')
        .next()
        .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Returns whether the last `Transfer-Encoding` field ends in `chunked`.
fn is_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .is_some_and(|last| ends_in_chunked(last.as_bytes()))
}

fn write_hex(write: &mut Vec<u8>, mut value: usize) {
    let mut digits = [0u8; 16];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b"0123456789abcdef"[value & 15];
        value >>= 4;
        if value == 0 {
            break;
        }
    }
    write.extend_from_slice(&digits[start..]);
}

/// A response body read from the connection, which also sends whatever is
/// left of the request body while it is polled.
pub struct ResponseBody<B> {
    /// `None` once the connection has been taken back.
    exchange: Option<Exchange<B>>,
    framing: InFraming,
    keep_alive: bool,
    hop_by_hop_removed: bool,
    done: bool,
    /// Chunk extension bytes so far, which are capped per body as hyper
    /// caps them.
    extension_bytes: usize,
    /// The reason the chunked framing cannot go on.
    chunk_error: Option<&'static str>,
}

impl<B> ResponseBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Returns the connection once the body has ended and the connection
    /// can carry another request: the whole request went out, the upstream
    /// keeps it alive and sent nothing past the response.
    pub fn take_connection(&mut self) -> Option<Connection> {
        if !self.done || !self.keep_alive {
            return None;
        }
        let exchange = self.exchange.take()?;
        if !exchange.is_sent() || !exchange.connection.read.is_empty() {
            return None;
        }
        Some(exchange.connection)
    }

    /// Returns whether the head's fields are free of hop-by-hop fields
    /// (see [`parse_head`]).
    pub fn hop_by_hop_removed(&self) -> bool {
        self.hop_by_hop_removed
    }

    /// Returns whether the whole request body went out, or `true` when the
    /// connection was already taken back.
    pub fn is_request_sent(&self) -> bool {
        self.exchange.as_ref().is_none_or(Exchange::is_sent)
    }

    /// Decodes the next frame from the bytes already read, or returns
    /// `None` when more are needed or the body has ended.
    fn decode(&mut self) -> Result<Option<Frame<Bytes>>, Error> {
        let Some(exchange) = &mut self.exchange else {
            return Ok(None);
        };
        let read = &mut exchange.connection.read;
        let frame = match &mut self.framing {
            InFraming::Empty => None,
            InFraming::Length(remaining) => {
                if read.is_empty() {
                    return Ok(None);
                }
                let length = (*remaining).min(read.len() as u64) as usize;
                *remaining -= length as u64;
                Some(Frame::data(read.split_to(length).freeze()))
            }
            InFraming::Close => {
                if read.is_empty() {
                    return Ok(None);
                }
                Some(Frame::data(read.split().freeze()))
            }
            InFraming::Chunked(state) => match state {
                ChunkState::Data(remaining) if !read.is_empty() => {
                    let length = (*remaining).min(read.len() as u64) as usize;
                    *remaining -= length as u64;
                    if *remaining == 0 {
                        *state = ChunkState::DataEnd;
                    }
                    Some(Frame::data(read.split_to(length).freeze()))
                }
                ChunkState::Trailers => match parse_trailers(read)? {
                    Some(trailers) => {
                        self.done = true;
                        return Ok(Some(Frame::trailers(trailers)));
                    }
                    None => return Ok(None),
                },
                _ => return Ok(None),
            },
        };
        self.advance_framing();
        Ok(frame)
    }

    /// Moves the decoder past what needs no frame: line breaks,
    /// chunk-size lines and an empty trailer section, so that the body
    /// reports its end as soon as its last data has been read. Bytes it
    /// cannot move past set `chunk_error`.
    fn advance_framing(&mut self) {
        let Some(exchange) = &mut self.exchange else {
            return;
        };
        let read = &mut exchange.connection.read;
        match &mut self.framing {
            InFraming::Empty | InFraming::Length(0) => self.done = true,
            InFraming::Chunked(state) => loop {
                match state {
                    ChunkState::Size => match parse_chunk_size(read) {
                        Ok(Some(line)) => {
                            self.extension_bytes += line.extension;
                            if self.extension_bytes > MAX_EXTENSION_BYTES {
                                self.chunk_error = Some("chunk extensions over 16 KiB");
                                return;
                            }
                            read.advance(line.length);
                            *state = match line.size {
                                0 => ChunkState::Trailers,
                                size => ChunkState::Data(size),
                            };
                        }
                        Ok(None) => return,
                        Err(message) => {
                            self.chunk_error = Some(message);
                            return;
                        }
                    },
                    ChunkState::DataEnd => match line_break(read) {
                        Ok(true) => *state = ChunkState::Size,
                        Ok(false) => return,
                        Err(()) => {
                            self.chunk_error = Some("no CRLF after a chunk's data");
                            return;
                        }
                    },
                    // A trailer section that starts with a field is
                    // `decode`'s: it becomes a frame.
                    ChunkState::Trailers => {
                        if line_break(read) == Ok(true) {
                            self.done = true;
                        }
                        return;
                    }
                    ChunkState::Data(_) => return,
                }
            },
            InFraming::Length(_) | InFraming::Close => {}
        }
    }
}

/// Removes a CRLF at the start of `read` and returns `true`. Returns
/// `false` when too few bytes have arrived to tell, and `Err` when other
/// bytes are there.
fn line_break(read: &mut BytesMut) -> Result<bool, ()> {
    match read.as_ref() {
        [b'\r', b'\n', ..] => {
            read.advance(2);
            Ok(true)
        }
        [] | [b'\r'] => Ok(false),
        _ => Err(()),
    }
}

/// A chunk-size line.
#[derive(Debug, PartialEq)]
struct ChunkLine {
    size: u64,
    /// The line's length with its CRLF.
    length: usize,
    /// The length of its chunk extensions.
    extension: usize,
}

/// Parses a chunk-size line at the start of `read`, or returns `None` when
/// the line is not complete yet. Chunk extensions are skipped. As RFC 9112
/// (section 7.1) and hyper's decoder have it, only spaces and tabs may
/// follow the size, and the line ends in CRLF.
fn parse_chunk_size(read: &[u8]) -> Result<Option<ChunkLine>, &'static str> {
    let Some(end) = read
        .iter()
        .take(MAX_CHUNK_LINE)
        .position(|&byte| byte == b'\n')
    else {
        if read.len() >= MAX_CHUNK_LINE {
            return Err("chunk-size line too long");
        }
        return Ok(None);
    };
    let Some(line) = read[..end].strip_suffix(b"\r") else {
        return Err("chunk-size line not ended by CRLF");
    };

    let digits = line
        .iter()
        .take_while(|byte| byte.is_ascii_hexdigit())
        .count();
    if digits == 0 {
        return Err("missing chunk size");
    }
    // Leading zeros are allowed; the value has to fit in 64 bits.
    let significant = line[..digits]
        .iter()
        .skip_while(|&&digit| digit == b'0')
        .count();
    if significant > 16 {
        return Err("chunk size too large");
    }

    let rest = &line[digits..];
    let spaces = rest
        .iter()
        .take_while(|&&byte| byte == b' ' || byte == b'\t')
        .count();
    let extension = &rest[spaces..];
    if !extension.is_empty() && extension[0] != b';' {
        return Err("invalid character after a chunk size");
    }
    if extension.contains(&b'\r') {
        return Err("CR inside a chunk extension");
    }

    let size = line[..digits].iter().fold(0u64, |size, &digit| {
        (size << 4) | u64::from(hex_value(digit))
    });
    Ok(Some(ChunkLine {
        size,
        length: end + 1,
        extension: extension.len(),
    }))
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}

/// Parses a non-empty trailer section at the start of `read` and removes
/// it; `None` when it is not complete yet.
fn parse_trailers(read: &mut BytesMut) -> Result<Option<HeaderMap>, Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(read, &mut fields) {
        Ok(httparse::Status::Complete((length, fields))) => {
            let mut trailers = HeaderMap::with_capacity(fields.len());
            for field in fields {
                let name = HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| Error::InvalidChunk("invalid trailer name"))?;
                let value = HeaderValue::from_bytes(field.value)
                    .map_err(|_| Error::InvalidChunk("invalid trailer value"))?;
                trailers.append(name, value);
            }
            read.advance(length);
            Ok(Some(trailers))
        }
        Ok(httparse::Status::Partial) if read.len() > MAX_HEAD_BYTES => {
            Err(Error::InvalidChunk("trailer section too large"))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(Error::InvalidChunk("invalid trailer section")),
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let Some(exchange) = &mut this.exchange else {
                return Poll::Ready(None);
            };
            if let Err(error) = exchange.poll_request_body(cx) {
                this.exchange = None;
                return Poll::Ready(Some(Err(error)));
            }
            match this.decode() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) if this.done => return Poll::Ready(None),
                Ok(None) => {}
                Err(error) => {
                    this.exchange = None;
                    return Poll::Ready(Some(Err(error)));
                }
            }
            if let Some(message) = this.chunk_error {
                this.exchange = None;
                return Poll::Ready(Some(Err(Error::InvalidChunk(message))));
            }
            let exchange = this.exchange.as_mut().expect("checked above");
            match std::task::ready!(exchange.connection.poll_fill(cx)) {
                Ok(0) if matches!(this.framing, InFraming::Close) => {
                    this.done = true;
                    this.keep_alive = false;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.exchange = None;
                    return Poll::Ready(Some(Err(Error::IncompleteBody)));
                }
                Ok(_) => this.advance_framing(),
                Err(error) => {
                    this.exchange = None;
                    return Poll::Ready(Some(Err(Error::Read(error))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            InFraming::Empty => SizeHint::with_exact(0),
            InFraming::Length(remaining) => SizeHint::with_exact(remaining),
            _ if self.done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    type Boxed = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

    /// Starts an upstream that reads one request, writes `response` and
    /// returns the request's bytes as it read them once the client has
    /// closed its side or `response` is written and the request is whole.
    async fn upstream(response: &'static [u8]) -> (TcpStream, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                let read = stream.read(&mut buffer).await.unwrap();
                if read == 0 {
                    return request;
                }
                request.extend_from_slice(&buffer[..read]);
            }
            stream.write_all(response).await.unwrap();
            // Reads what follows the head, such as a body, until the client
            // stops sending for a moment.
            while let Ok(Ok(read @ 1..)) = tokio::time::timeout(
                std::time::Duration::from_millis(100),
                stream.read(&mut buffer),
            )
            .await
            {
                request.extend_from_slice(&buffer[..read]);
            }
            request
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        (stream, served)
    }

    fn connection(stream: TcpStream) -> Connection {
        Connection::new(stream, OpenConnection::new(&Arc::new(AtomicUsize::new(0))))
    }

    fn get(path: &str) -> Request<Boxed> {
        let mut request = Request::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
        *request.uri_mut() = path.parse().unwrap();
        request
            .headers_mut()
            .insert(header::HOST, HeaderValue::from_static("example.com"));
        request
    }

    /// Sends a GET to an upstream that responds with `response`, and returns
    /// the response, whose body has not been read.
    async fn response_to(response: &'static [u8]) -> Response<ResponseBody<Boxed>> {
        let (stream, _served) = upstream(response).await;
        let sent = connection(stream).send(ToSend::Request(Box::new(get("/"))));
        sent.await.ok().expect("the exchange succeeds")
    }

    /// Sends `request` to an upstream that responds with `response`, and returns
    /// the response, its collected body (or the body's error), whether the
    /// connection could be reused, and the bytes the upstream read.
    async fn exchange(
        request: Request<Boxed>,
        response: &'static [u8],
    ) -> (
        http::response::Parts,
        Result<http_body_util::Collected<Bytes>, Error>,
        bool,
        Vec<u8>,
    ) {
        let (stream, served) = upstream(response).await;
        let response = match connection(stream)
            .send(ToSend::Request(Box::new(request)))
            .await
        {
            Ok(response) => response,
            Err(failure) => panic!("the exchange failed: {}", failure.error),
        };
        let (parts, mut body) = response.into_parts();
        let collected = (&mut body).collect().await;
        let reusable = body.take_connection().is_some();
        let read = served.await.unwrap();
        (parts, collected, reusable, read)
    }

    #[tokio::test]
    async fn content_length_response() {
        let (parts, body, reusable, read) = exchange(
            get("/a?b=c"),
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-One: 1\r\n\r\nhello",
        )
        .await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(parts.headers["x-one"], "1");
        assert_eq!(body.unwrap().to_bytes(), "hello");
        assert!(reusable);
        assert_eq!(read, b"GET /a?b=c HTTP/1.1\r\nhost: example.com\r\n\r\n");
    }

    #[tokio::test]
    async fn chunked_response_with_extensions_and_trailers() {
        let response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;name=value\r\nhello\r\n1\r\n!\r\n0\r\nX-Checksum: abc\r\n\r\n";
        let (_, body, reusable, _) = exchange(get("/"), response).await;
        let collected = body.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc");
        assert_eq!(collected.to_bytes(), "hello!");
        assert!(reusable);
    }

    #[tokio::test]
    async fn chunked_wins_over_content_length_and_closes() {
        let response =
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
            5\r\nhello\r\n0\r\n\r\n";
        let (parts, body, reusable, _) = exchange(get("/"), response).await;
        assert!(!parts.headers.contains_key(header::CONTENT_LENGTH));
        assert_eq!(body.unwrap().to_bytes(), "hello");
        assert!(!reusable);
    }

    #[tokio::test]
    async fn hop_by_hop_fields_left_out() {
        let response = response_to(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
              Transfer-Encoding: chunked\r\nX-One: 1\r\n\r\n0\r\n\r\n",
        )
        .await;
        assert!(response.body().hop_by_hop_removed());
        let names: Vec<_> = response.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-one"]);

        // A field that `Connection` names stays for the caller to remove,
        // as do the others.
        let response = response_to(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\n\
              Content-Length: 0\r\n\r\n",
        )
        .await;
        assert!(!response.body().hop_by_hop_removed());
        assert!(response.headers().contains_key(header::CONNECTION));
        assert!(response.headers().contains_key("x-hop"));
    }

    #[tokio::test]
    async fn informational_responses_are_skipped() {
        let response =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
            HTTP/1.1 204 No Content\r\n\r\n";
        let (parts, body, reusable, _) = exchange(get("/"), response).await;
        assert_eq!(parts.status, StatusCode::NO_CONTENT);
        assert!(!parts.headers.contains_key(header::LINK));
        assert!(body.unwrap().to_bytes().is_empty());
        assert!(reusable);
    }

    #[tokio::test]
    async fn close_delimited_response() {
        let (_, body, reusable, _) =
            exchange(get("/"), b"HTTP/1.1 200 OK\r\n\r\nuntil the end").await;
        // The test upstream keeps the connection open after writing, so the
        // body ends when its task drops the stream.
        assert_eq!(body.unwrap().to_bytes(), "until the end");
        assert!(!reusable);
    }

    #[tokio::test]
    async fn closing_responses_are_not_reused() {
        let cases: [&'static [u8]; 3] = [
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok-and-more",
        ];
        for response in cases {
            let (_, body, reusable, _) = exchange(get("/"), response).await;
            assert_eq!(body.unwrap().to_bytes(), "ok");
            assert!(!reusable, "{}", String::from_utf8_lossy(response));
        }
        let (_, _, reusable, _) = exchange(
            get("/"),
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
        )
        .await;
        assert!(reusable);
    }

    #[tokio::test]
    async fn head_response_has_no_body() {
        let mut request = get("/");
        *request.method_mut() = Method::HEAD;
        let (parts, body, reusable, _) =
            exchange(request, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n").await;
        assert_eq!(parts.headers[header::CONTENT_LENGTH], "100");
        assert!(body.unwrap().to_bytes().is_empty());
        assert!(reusable);
    }

    #[tokio::test]
    async fn invalid_chunks_fail_the_body() {
        // Each starts after a valid head and `Transfer-Encoding: chunked`.
        let bodies: [&'static [u8]; 4] = [
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloXY0\r\n\r\n",
        ];
        for chunks in bodies {
            let head: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
            let response = [head, chunks].concat().leak();
            let (_, body, reusable, _) = exchange(get("/"), response).await;
            let printable = chunks.escape_ascii();
            assert!(
                matches!(body, Err(Error::InvalidChunk(_))),
                "{printable}: {body:?}"
            );
            assert!(!reusable, "{printable}");
        }
    }

    #[tokio::test]
    async fn chunk_extensions_are_capped_per_body() {
        // Twenty one-byte chunks, each with 1,000 bytes of extensions.
        let mut response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..20 {
            response.extend_from_slice(b"1;");
            response.extend_from_slice(&[b'e'; 1000]);
            response.extend_from_slice(b"\r\nx\r\n");
        }
        response.extend_from_slice(b"0\r\n\r\n");
        let (_, body, _, _) = exchange(get("/"), response.leak()).await;
        assert!(matches!(body, Err(Error::InvalidChunk(_))), "{body:?}");
    }

    #[tokio::test]
    async fn invalid_heads_fail_the_exchange() {
        let cases: [(&'static [u8], &str); 9] = [
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                "a transfer coding other than chunked",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                "a transfer coding other than chunked",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                "chunked applied more than once",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: ,\r\n\r\n",
                "an empty Transfer-Encoding",
            ),
            (
                b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                "Transfer-Encoding in an HTTP/1.0 response",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
                "invalid Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "invalid Content-Length",
            ),
            (b"HTTP/9 200 OK\r\n\r\n", "invalid response head"),
            (
                b"HTTP/1.1 200 OK\r\nX-Bar: ",
                "before the end of the response head",
            ),
        ];
        for (response, message) in cases {
            let (stream, _served) = upstream(response).await;
            let sent = connection(stream)
                .send(ToSend::Request(Box::new(get("/"))))
                .await;
            let Err(failure) = sent else {
                panic!("{} passed", String::from_utf8_lossy(response));
            };
            let error = failure.error.to_string();
            assert!(error.contains(message), "{error}");
        }
    }

    #[tokio::test]
    async fn oversized_head_fails_the_exchange() {
        let field = "a".repeat(MAX_HEAD_BYTES);
        let response = format!("HTTP/1.1 200 OK\r\nX-Large: {field}\r\nContent-Length: 0\r\n\r\n");
        let (stream, _served) = upstream(response.into_bytes().leak()).await;
        let sent = connection(stream)
            .send(ToSend::Request(Box::new(get("/"))))
            .await;
        assert!(matches!(
            sent,
            Err(SendFailure {
                error: Error::HeadTooLarge,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn lent_head_sends_same_bytes() {
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (_, _, _, owned) = exchange(get("/a?b=c"), response).await;
        let (parts, _) = get("/a?b=c").into_parts();
        let (stream, served) = upstream(response).await;
        let lent = ToSend::<Boxed>::Head(&parts);
        let response = connection(stream).send(lent).await.ok().unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
        assert_eq!(served.await.unwrap(), owned);
    }

    #[tokio::test]
    async fn body_cut_short_fails() {
        let (stream, served) = upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel").await;
        let response = connection(stream)
            .send(ToSend::Request(Box::new(get("/"))))
            .await
            .ok()
            .unwrap();
        served.await.unwrap();
        let collected = response.into_body().collect().await;
        assert!(
            matches!(collected, Err(Error::IncompleteBody)),
            "{collected:?}"
        );
    }

    #[tokio::test]
    async fn request_bodies_are_framed() {
        // A body of known size gets a Content-Length.
        let mut request = get("/upload");
        *request.method_mut() = Method::POST;
        let request = request.map(|_| {
            Full::new(Bytes::from_static(b"abc"))
                .map_err(|never| match never {})
                .boxed_unsync()
        });
        let (_, _, reusable, read) =
            exchange(request, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let read = String::from_utf8(read).unwrap();
        assert!(read.contains("content-length: 3\r\n"), "{read}");
        assert!(read.ends_with("\r\n\r\nabc"), "{read}");
        assert!(reusable);

        // A body of unknown size is chunked.
        let frames = futures_util::stream::iter([
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::data(Bytes::from_static(b"world!"))),
        ]);
        let mut request = get("/upload");
        *request.method_mut() = Method::POST;
        let request = request.map(|_| StreamBody::new(frames).boxed_unsync());
        let (_, _, _, read) =
            exchange(request, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let read = String::from_utf8(read).unwrap();
        assert!(read.contains("transfer-encoding: chunked\r\n"), "{read}");
        assert!(
            read.ends_with("\r\n\r\n5\r\nhello\r\n6\r\nworld!\r\n0\r\n\r\n"),
            "{read}"
        );
    }

    #[tokio::test]
    async fn idle_connection_closed_by_the_peer_is_unusable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut connection = connection(stream);
        assert!(connection.is_usable());
        drop(accepted);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!connection.is_usable());
    }

    #[test]
    fn chunk_size_lines() {
        let line = |size, length, extension| {
            Some(ChunkLine {
                size,
                length,
                extension,
            })
        };
        assert_eq!(parse_chunk_size(b"1a\r\n").unwrap(), line(26, 4, 0));
        assert_eq!(parse_chunk_size(b"FF;ext=1\r\n").unwrap(), line(255, 10, 6));
        assert_eq!(parse_chunk_size(b"5 \t;a\r\n").unwrap(), line(5, 7, 2));
        assert_eq!(parse_chunk_size(b"10").unwrap(), None);
        let zeros = b"00000000000000000000a\r\n";
        assert_eq!(parse_chunk_size(zeros).unwrap(), line(10, zeros.len(), 0));
        let invalid: [&[u8]; 8] = [
            b"\r\n",
            b"0\n",
            b"5\r\r\n",
            b"5\x0c\r\n",
            b"1 x\r\n",
            b"5;a\rb\r\n",
            b"11111111111111111\r\n",
            &[b'1'; MAX_CHUNK_LINE],
        ];
        for line in invalid {
            assert!(parse_chunk_size(line).is_err(), "{}", line.escape_ascii());
        }
    }

    #[test]
    fn content_length_values() {
        let mut headers = HeaderMap::new();
        assert_eq!(content_length(&headers), None);
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        assert_eq!(content_length(&headers), Some(12));
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("12, 12"));
        assert_eq!(content_length(&headers), Some(12));
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("13"));
        assert_eq!(content_length(&headers), None);
        let mut headers = HeaderMap::new();
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("+1"));
        assert_eq!(content_length(&headers), None);
    }

    #[test]
    fn chunked_is_the_last_coding() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("gzip, Chunked"),
        );
        assert!(is_chunked(&headers));
        headers.append(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        assert!(!is_chunked(&headers));
    }
}
