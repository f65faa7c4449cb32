//! WASI for workers, linked for synchronous calls.
//!
//! A worker call runs inline on its serving thread, as Envoy runs its Wasm
//! filters, because a synchronous call costs several microseconds less than
//! an async one. wasmtime-wasi's synchronous bindings, though, run every I/O
//! operation that may wait (a blocking stream write, a poll, even dropping a
//! stream) through `Handle::block_on`, which panics on a thread that already
//! runs a tokio runtime, as serving threads do. A worker's only streams are
//! in memory (empty stdin, discarded stdout, captured stderr) and never wait,
//! so this module links `wasi:io/streams` and `wasi:io/poll` with versions
//! that poll the operation once and trap if it would wait.
//!
//! The rest of WASI is linked from wasmtime-wasi and grants nothing: no
//! environment, no preopened directories (so the filesystem functions that
//! would wait are unreachable without a descriptor), and no sockets, which
//! are not linked at all, so a component that imports them fails to load.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::cli::{WasiCli, WasiCliView};
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::sync::io::streams::{InputStream, OutputStream};
use wasmtime_wasi::p2::bindings::sync::io::{poll, streams};
use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, sync};
use wasmtime_wasi::p2::{DynPollable, StreamError, StreamResult};
use wasmtime_wasi_io::bindings::wasi::io::poll as async_poll;
use wasmtime_wasi_io::bindings::wasi::io::streams::{
    HostInputStream as AsyncInputStream, HostOutputStream as AsyncOutputStream,
};

use super::host_api::StoreState;

/// Links the WASI interfaces a worker may import.
pub fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    type T = StoreState;
    let l = linker;
    clocks::wall_clock::add_to_linker::<T, WasiClocks>(l, T::clocks)?;
    clocks::monotonic_clock::add_to_linker::<T, WasiClocks>(l, T::clocks)?;
    cli::exit::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::environment::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_input::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_output::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    filesystem::preopens::add_to_linker::<T, WasiFilesystem>(l, T::filesystem)?;
    sync::filesystem::types::add_to_linker::<T, WasiFilesystem>(l, T::filesystem)?;
    wasmtime_wasi_io::bindings::wasi::io::error::add_to_linker::<T, HasIo>(l, |t| Io(t.table()))?;
    poll::add_to_linker::<T, HasIo>(l, |t| Io(t.table()))?;
    streams::add_to_linker::<T, HasIo>(l, |t| Io(t.table()))?;
    Ok(())
}

/// The store's resource table, seen by the stream and poll functions.
pub struct Io<'a>(&'a mut ResourceTable);

/// The [`HasData`] marker that hands the stream and poll functions an
/// [`Io`].
struct HasIo;

impl HasData for HasIo {
    type Data<'a> = Io<'a>;
}

/// Polls `operation` once and returns its output, or an error naming
/// `what` when it would have to wait.
fn without_waiting<F: Future>(operation: F, what: &str) -> wasmtime::Result<F::Output> {
    let mut operation = pin!(operation);
    match operation
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => Ok(output),
        Poll::Pending => Err(wasmtime::Error::msg(format!(
            "the worker called {what}, which would wait; a worker call cannot wait for I/O"
        ))),
    }
}

/// [`without_waiting`] for the stream functions, which report a trap as a
/// [`StreamError`].
fn stream_without_waiting<F, R>(operation: F, what: &str) -> StreamResult<R>
where
    F: Future<Output = StreamResult<R>>,
{
    without_waiting(operation, what).map_err(StreamError::Trap)?
}

impl wasmtime_wasi_io::bindings::wasi::io::error::Host for Io<'_> {}

impl wasmtime_wasi_io::bindings::wasi::io::error::HostError for Io<'_> {
    fn to_debug_string(
        &mut self,
        error: Resource<wasmtime_wasi_io::streams::Error>,
    ) -> wasmtime::Result<String> {
        wasmtime_wasi_io::bindings::wasi::io::error::HostError::to_debug_string(self.0, error)
    }

    fn drop(&mut self, error: Resource<wasmtime_wasi_io::streams::Error>) -> wasmtime::Result<()> {
        wasmtime_wasi_io::bindings::wasi::io::error::HostError::drop(self.0, error)
    }
}

impl streams::Host for Io<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<streams::StreamError> {
        streams::Host::convert_stream_error(self.0, err)
    }
}

impl streams::HostOutputStream for Io<'_> {
    fn drop(&mut self, stream: Resource<OutputStream>) -> wasmtime::Result<()> {
        without_waiting(
            AsyncOutputStream::drop(self.0, stream),
            "output-stream.drop",
        )?
    }

    fn check_write(&mut self, stream: Resource<OutputStream>) -> StreamResult<u64> {
        streams::HostOutputStream::check_write(self.0, stream)
    }

    fn write(&mut self, stream: Resource<OutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        streams::HostOutputStream::write(self.0, stream, bytes)
    }

    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<OutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        stream_without_waiting(
            AsyncOutputStream::blocking_write_and_flush(self.0, stream, bytes),
            "output-stream.blocking-write-and-flush",
        )
    }

    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<OutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        stream_without_waiting(
            AsyncOutputStream::blocking_write_zeroes_and_flush(self.0, stream, len),
            "output-stream.blocking-write-zeroes-and-flush",
        )
    }

    fn subscribe(
        &mut self,
        stream: Resource<OutputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostOutputStream::subscribe(self.0, stream)
    }

    fn write_zeroes(&mut self, stream: Resource<OutputStream>, len: u64) -> StreamResult<()> {
        streams::HostOutputStream::write_zeroes(self.0, stream, len)
    }

    fn flush(&mut self, stream: Resource<OutputStream>) -> StreamResult<()> {
        streams::HostOutputStream::flush(self.0, stream)
    }

    fn blocking_flush(&mut self, stream: Resource<OutputStream>) -> StreamResult<()> {
        stream_without_waiting(
            AsyncOutputStream::blocking_flush(self.0, stream),
            "output-stream.blocking-flush",
        )
    }

    fn splice(
        &mut self,
        dst: Resource<OutputStream>,
        src: Resource<InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        streams::HostOutputStream::splice(self.0, dst, src, len)
    }

    fn blocking_splice(
        &mut self,
        dst: Resource<OutputStream>,
        src: Resource<InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        stream_without_waiting(
            AsyncOutputStream::blocking_splice(self.0, dst, src, len),
            "output-stream.blocking-splice",
        )
    }
}

impl streams::HostInputStream for Io<'_> {
    fn drop(&mut self, stream: Resource<InputStream>) -> wasmtime::Result<()> {
        without_waiting(AsyncInputStream::drop(self.0, stream), "input-stream.drop")?
    }

    fn read(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<Vec<u8>> {
        streams::HostInputStream::read(self.0, stream, len)
    }

    fn blocking_read(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<Vec<u8>> {
        stream_without_waiting(
            AsyncInputStream::blocking_read(self.0, stream, len),
            "input-stream.blocking-read",
        )
    }

    fn skip(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<u64> {
        streams::HostInputStream::skip(self.0, stream, len)
    }

    fn blocking_skip(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<u64> {
        stream_without_waiting(
            AsyncInputStream::blocking_skip(self.0, stream, len),
            "input-stream.blocking-skip",
        )
    }

    fn subscribe(
        &mut self,
        stream: Resource<InputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostInputStream::subscribe(self.0, stream)
    }
}

impl poll::Host for Io<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        without_waiting(async_poll::Host::poll(self.0, pollables), "poll")?
    }
}

impl poll::HostPollable for Io<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        without_waiting(
            async_poll::HostPollable::ready(self.0, pollable),
            "pollable.ready",
        )?
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        without_waiting(
            async_poll::HostPollable::block(self.0, pollable),
            "pollable.block",
        )?
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.0, pollable)
    }
}
