//! TLS on a connection (rustls through tokio-rustls): the handshake within the header timeout,
//! and the stream the rest of the server reads and writes, which ALPN says to serve as HTTP/2
//! (`h2`) or HTTP/1.1.
//!
//! The certificates and the [`rustls::ServerConfig`] of each listener come from
//! [`crate::tls`]; a new generation builds them afresh, which is how `systemctl reload` renews
//! a certificate without a dropped connection. The zero-copy path is not taken over TLS
//! (kTLS would be the way to it): files go through hyper's buffered path.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::fast::Stream;
use super::Versions;
use crate::access_log::Client;

/// A connection after its TLS handshake.
pub(super) struct Tls<I>(tokio_rustls::server::TlsStream<I>);

/// The handshake on `io`, at most `timeout` long (a client that opens connections and sends
/// nothing is bounded as one that sends no request head); the stream and the HTTP versions
/// ALPN agreed on. `None` if the client broke it off, failed it or took too long.
pub(super) async fn handshake<I>(
    acceptor: &tokio_rustls::TlsAcceptor,
    io: I,
    timeout: Duration,
) -> Option<(Tls<I>, Versions)>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let stream = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed: {e}");
            return None;
        }
        Err(_) => {
            tracing::debug!("TLS handshake not finished within {timeout:?}");
            return None;
        }
    };
    let versions = match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => Versions::Http2,
        _ => Versions::Http1,
    };
    Some((Tls(stream), versions))
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for Tls<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Tls<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The socket under the TLS session: its fd is what the watcher asks the kernel about (bytes
/// queued in and out); nothing is ever written to it directly.
impl<I: AsRawFd> AsRawFd for Tls<I> {
    fn as_raw_fd(&self) -> RawFd {
        self.0.get_ref().0.as_raw_fd()
    }
}

impl<I: AsFd> AsFd for Tls<I> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.get_ref().0.as_fd()
    }
}

impl<I: Stream + Sync> Stream for Tls<I> {
    // Bytes written to the socket itself would bypass the session.
    const FAST_PATH: bool = false;

    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Err(io::ErrorKind::Unsupported.into()))
    }

    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Err(io::ErrorKind::Unsupported.into()))
    }

    fn try_write_with(&self, _: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn client(&self) -> Client {
        self.0.get_ref().0.client()
    }
}
