//! The access log: one JSON line per request, written by a background
//! thread so that the request path never waits for the disk or a pipe.
//!
//! A request hands its [`Record`] to the writer through a bounded channel
//! when its response body ends (or the client goes away). When the channel
//! is full the record is dropped and counted in
//! `edge_access_log_dropped_total`. The writer formats lines in batches and
//! writes each batch with one call, at most [`FLUSH_INTERVAL`] after its
//! first line, and on shutdown. Request headers are never logged, so
//! `Authorization` and cookies cannot appear; query parameters whose names
//! look like credentials have their values replaced by `REDACTED`.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use prometheus::IntCounter;

use crate::metrics::Reason;
use crate::proxy::{BoxError, ResponseBody};

mod line;

pub use line::redact_query;
use line::LineFormatter;

/// The value that replaces a credential in a logged query string.
pub const REDACTED: &str = "REDACTED";

/// How long the writer collects lines before it writes them in one batch.
/// A line reaches the sink at most this long (plus the time to format the
/// batch) after its request ends.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// The size at which the writer writes its buffer out before the interval
/// ends.
const BATCH_BYTES: usize = 256 << 10;

/// How long a shutdown waits for the writer to write what it holds.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Where access-log lines go.
#[derive(Debug, Clone)]
pub enum Sink {
    Stdout,
    /// A file, appended to (created when missing).
    File(PathBuf),
}

/// The sending half of the access log, shared by every serving thread.
pub struct AccessLog {
    sender: SyncSender<Message>,
    dropped: IntCounter,
}

/// A message from a serving thread or the shutdown to the writer.
enum Message {
    Record(Box<Record>),
    /// Write everything received so far, then reply.
    Flush(SyncSender<()>),
    /// Write everything received so far, then open the file again, so that
    /// lines go to a new file once logrotate has moved the old one.
    Reopen,
}

/// Names the writer thread needs to turn indices into text.
pub struct Names {
    pub node: String,
    pub routes: Vec<Arc<str>>,
    pub upstreams: Vec<Arc<str>>,
}

/// One request as the access log records it. The serving thread fills it
/// with values it already has (no formatting); the writer turns it into
/// text.
#[derive(Debug)]
pub struct Record {
    pub time: SystemTime,
    pub started: Instant,
    pub request_id: Option<HeaderValue>,
    pub trace_id: Option<[u8; 16]>,
    pub span_id: Option<[u8; 8]>,
    pub client: IpAddr,
    pub method: Method,
    /// The request target as received; the writer drops or redacts its
    /// query.
    pub uri: Uri,
    pub version: Version,
    pub route: Option<usize>,
    pub upstream: Option<usize>,
    pub target: Option<SocketAddr>,
    pub status: u16,
    pub reason: Reason,
    /// The request's `Content-Length`, when it had one.
    pub bytes_in: Option<u64>,
    pub bytes_out: u64,
    /// Time until the response head was ready.
    pub head: Duration,
    /// Time until the response body ended or the client went away.
    pub total: Duration,
    pub ratelimit: Duration,
    pub workers: Duration,
    pub upstream_time: Duration,
    /// Whether the response body was sent whole.
    pub completed: bool,
    /// The user id a worker set on the request context.
    pub user: Option<String>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Opens the sink and starts the writer thread with a channel of
    /// `capacity` lines.
    pub fn start(
        sink: Sink,
        capacity: usize,
        names: Names,
        dropped: IntCounter,
        written: IntCounter,
    ) -> anyhow::Result<AccessLog> {
        let output = open(&sink)?;
        let (sender, receiver) = mpsc::sync_channel(capacity.max(1));
        let writer = Writer {
            sink,
            output,
            names,
            written,
            dropped: dropped.clone(),
            formatter: LineFormatter::default(),
            buffer: Vec::with_capacity(BATCH_BYTES + 4096),
            lines: 0,
            failures: Failures::default(),
        };
        std::thread::Builder::new()
            .name("edge-access-log".to_owned())
            .spawn(move || writer.run(receiver))
            .context("cannot start the access-log thread")?;
        Ok(AccessLog { sender, dropped })
    }

    /// Hands a record to the writer, or drops and counts it when the writer
    /// has fallen behind. Never blocks.
    pub fn send(&self, record: Box<Record>) {
        match self.sender.try_send(Message::Record(record)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped.inc(),
            // The writer thread is gone, which happens only if it panicked.
            Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Asks the writer to open its file again after the lines it has, as
    /// the node does on SIGHUP. Never blocks. When the channel is full, the
    /// request is dropped with a warning and waits for the next SIGHUP.
    pub fn reopen(&self) {
        if let Err(TrySendError::Full(_)) = self.sender.try_send(Message::Reopen) {
            tracing::warn!("the access log is too busy to reopen its file; send SIGHUP again");
        }
    }

    /// Waits (up to two seconds) until the writer has written every record
    /// sent before this call. The node calls it on shutdown, once its
    /// connections are closed.
    pub fn flush(&self) {
        let (reply, replied) = mpsc::sync_channel(1);
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let mut message = Message::Flush(reply);
        // The channel may be full of records; the writer empties it at
        // least once per interval.
        loop {
            match self.sender.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(back)) => {
                    if Instant::now() >= deadline {
                        tracing::warn!("timed out flushing the access log");
                        return;
                    }
                    message = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if replied.recv_timeout(left).is_err() {
            tracing::warn!("timed out flushing the access log");
        }
    }
}

/// Checks that the access log's output could be opened, without creating
/// or changing any file: a file must exist and be writable, or its folder
/// must exist and allow creating it.
pub fn check_sink(sink: &Sink) -> anyhow::Result<()> {
    let Sink::File(path) = sink else {
        return Ok(());
    };
    check_file(path).with_context(|| format!("cannot open access_log.path {}", path.display()))
}

fn check_file(path: &Path) -> anyhow::Result<()> {
    use rustix::fs::{accessat, Access, AtFlags, CWD};

    // With AT_EACCESS, accessat checks the permissions that `open` would
    // check, without opening the file. Opening a FIFO for writing would
    // block until a reader came.
    let writable = |path: &Path, access: Access| {
        accessat(CWD, path, access, AtFlags::EACCESS).map_err(std::io::Error::from)
    };
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_dir() => anyhow::bail!("it is a folder"),
        Ok(_) => Ok(writable(path, Access::WRITE_OK)?),
        // NotADirectory: a part of the folder's path is a file.
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            let folder = match path.parent() {
                Some(folder) if !folder.as_os_str().is_empty() => folder,
                _ => Path::new("."),
            };
            match std::fs::metadata(folder) {
                Ok(metadata) if metadata.is_dir() => {}
                Ok(_) => anyhow::bail!("{} is not a folder", folder.display()),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    anyhow::bail!("the folder {} does not exist", folder.display())
                }
                Err(error) => return Err(error.into()),
            }
            writable(folder, Access::WRITE_OK | Access::EXEC_OK)
                .with_context(|| format!("cannot create a file in the folder {}", folder.display()))
        }
        Err(error) => Err(error.into()),
    }
}

/// Opens the access log's output: stdout, or the file, appended to.
fn open(sink: &Sink) -> anyhow::Result<Box<dyn Write + Send>> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};

    let path = match sink {
        Sink::Stdout => return Ok(Box::new(std::io::stdout())),
        Sink::File(path) => path,
    };
    // Opening a named pipe for writing waits for a reader, which would hang
    // the start silently; without blocking it fails at once instead.
    let pipe = std::fs::metadata(path).is_ok_and(|metadata| metadata.file_type().is_fifo());
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    if pipe {
        options.custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
    }
    let file = options.open(path).map_err(|error| {
        let hint = if pipe && error.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) {
            "; it is a named pipe that no process reads: start its reader first"
        } else {
            ""
        };
        anyhow::anyhow!(
            "cannot open access_log.path {}: {error}{hint}",
            path.display()
        )
    })?;
    if pipe {
        // Lines then wait for a slow reader, as with a file on a slow disk.
        let flags = rustix::fs::fcntl_getfl(&file)?;
        rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK)?;
    }
    Ok(Box::new(file))
}

/// The writer thread's state: the sink, and the batch being filled.
struct Writer {
    sink: Sink,
    output: Box<dyn Write + Send>,
    names: Names,
    written: IntCounter,
    /// Counts the lines of batches that could not be written.
    dropped: IntCounter,
    formatter: LineFormatter,
    buffer: Vec<u8>,
    /// Lines in `buffer`.
    lines: u64,
    failures: Failures,
}

/// Failed writes since the last one logged: one line per
/// [`FAILURE_LOG_INTERVAL`], so that a full disk does not flood the log.
#[derive(Default)]
struct Failures {
    logged_at: Option<Instant>,
    unlogged: u64,
}

/// The shortest time between two log lines about failed writes.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Writer {
    /// Writes lines in batches until every sender is gone.
    ///
    /// The thread blocks until a message arrives, sleeps for
    /// [`FLUSH_INTERVAL`] while more arrive, then formats them all and writes
    /// them with one `write` call (more when the batch is over
    /// [`BATCH_BYTES`]).
    /// So a busy node wakes it once per interval, not once per line, and
    /// the serving threads never wait on it.
    fn run(mut self, receiver: Receiver<Message>) {
        while let Ok(first) = receiver.recv() {
            let mut replies = Vec::new();
            self.take(first, &mut replies);
            // Sleep rather than block on the channel, so that senders do not
            // wake this thread for every line. A flush request skips it.
            if replies.is_empty() {
                std::thread::sleep(FLUSH_INTERVAL);
            }
            while let Ok(message) = receiver.try_recv() {
                self.take(message, &mut replies);
            }
            self.write_out();
            for reply in replies {
                let _ = reply.try_send(());
            }
        }
        // Every sender is gone: the node is shutting down.
        self.write_out();
    }

    /// Adds a record to the batch, notes a flush request, or opens the file
    /// again.
    fn take(&mut self, message: Message, replies: &mut Vec<SyncSender<()>>) {
        match message {
            Message::Record(record) => self.format(&record),
            Message::Flush(reply) => replies.push(reply),
            Message::Reopen => {
                self.write_out();
                if let Sink::File(path) = &self.sink {
                    match open(&self.sink) {
                        Ok(output) => {
                            self.output = output;
                            tracing::info!(path = %path.display(), "reopened the access log");
                        }
                        Err(error) => tracing::error!(
                            "{error:#}; the access log goes on in the file it had open"
                        ),
                    }
                }
            }
        }
    }

    /// Formats one record into the batch, writing the batch out when it is
    /// full.
    fn format(&mut self, record: &Record) {
        self.formatter.write(record, &self.names, &mut self.buffer);
        self.lines += 1;
        if self.buffer.len() >= BATCH_BYTES {
            self.write_out();
        }
    }

    /// Writes the batch to the sink. A batch that fails (a full disk, a
    /// file system gone read-only) is counted as dropped, and the next
    /// batch tries again.
    fn write_out(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let result = self
            .output
            .write_all(&self.buffer)
            .and_then(|()| self.output.flush());
        match result {
            Ok(()) => self.written.inc_by(self.lines),
            Err(error) => {
                self.dropped.inc_by(self.lines);
                self.failures.unlogged += 1;
                let due = self
                    .failures
                    .logged_at
                    .is_none_or(|at| at.elapsed() >= FAILURE_LOG_INTERVAL);
                if due {
                    tracing::error!(
                        %error,
                        failed_writes = self.failures.unlogged,
                        "cannot write the access log; its lines are dropped and counted until \
                         a write succeeds"
                    );
                    self.failures = Failures {
                        logged_at: Some(Instant::now()),
                        unlogged: 0,
                    };
                }
            }
        }
        self.buffer.clear();
        self.lines = 0;
    }
}

/// A response body that counts the bytes sent and hands the access-log
/// record to the writer when it ends or is dropped.
pub struct LoggedBody {
    inner: ResponseBody,
    record: Option<Box<Record>>,
    log: Arc<AccessLog>,
}

impl LoggedBody {
    pub fn new(inner: ResponseBody, record: Box<Record>, log: Arc<AccessLog>) -> LoggedBody {
        let mut body = LoggedBody {
            inner,
            record: Some(record),
            log,
        };
        if body.inner.is_end_stream() {
            body.finish(true);
        }
        body
    }

    fn finish(&mut self, completed: bool) {
        if let Some(mut record) = self.record.take() {
            record.total = record.started.elapsed();
            record.completed = completed;
            self.log.send(record);
        }
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(record)) = (frame.data_ref(), this.record.as_mut()) {
                    record.bytes_out += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
