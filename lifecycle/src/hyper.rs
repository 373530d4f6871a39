//! Serving one connection with any hyper service, drained the way clients expect: HTTP/1
//! answers the request in hand with `Connection: close` and closes, HTTP/2 sends GOAWAY and
//! finishes the streams in flight (hyper's graceful shutdown); at the drain's deadline the
//! connection is cut. Needs the `hyper` feature.
//!
//! ```no_run
//! # async fn demo(mut accept: baton_lifecycle::Accept) -> std::io::Result<()> {
//! use hyper::{Request, Response, body::Incoming};
//!
//! let listener = accept.tcp("http")?;
//! let service = hyper::service::service_fn(|_: Request<Incoming>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new("hello\n".to_owned()))
//! });
//! loop {
//!     let (stream, _) = tokio::select! {
//!         _ = accept.stopping() => return Ok(()),
//!         accepted = listener.accept() => accepted?,
//!     };
//!     let connection = accept.connection();
//!     tokio::spawn(baton_lifecycle::hyper::serve_connection(stream, service, connection));
//! }
//! # }
//! ```

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::Connection;

/// The errors hyper and services report.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves HTTP/1 or HTTP/2 (told apart by the preface) on `io` with `service` until the client
/// closes, or gracefully once the drain begins, or not at all past its deadline.
pub async fn serve_connection<I, S, B>(
    io: I,
    service: S,
    connection: Connection,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(served);
    tokio::select! {
        result = served.as_mut() => return result,
        _ = connection.draining() => served.as_mut().graceful_shutdown(),
    }
    tokio::select! {
        result = served => result,
        _ = connection.closing() => Ok(()),
    }
}
