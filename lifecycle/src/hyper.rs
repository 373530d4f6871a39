//! Serving one connection with any hyper service, drained the way clients expect: HTTP/1
//! answers the request in hand with `Connection: close` and closes, HTTP/2 sends GOAWAY and
//! finishes the streams in flight (hyper's graceful shutdown); an idle connection first gets
//! [`IDLE_GRACE`] to begin a request, which may be on its way; at the drain's deadline the
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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

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
    let builder = Builder::new(TokioExecutor::new());
    serve_connection_with(&builder, io, service, connection).await
}

/// [`serve_connection`] with `builder`'s settings (HTTP/1 header timeouts and keep-alive,
/// HTTP/2 windows and streams, or one protocol only). A connection upgraded by its request
/// (a WebSocket) leaves hyper, and the drain, once the upgrade is answered: count it with a
/// [`Connection`] of its own if the drain should wait for it.
pub async fn serve_connection_with<I, S, B>(
    builder: &Builder<TokioExecutor>,
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
    let activity = Arc::new(Activity::default());
    let service = Tracked {
        inner: service,
        activity: activity.clone(),
    };
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(served);
    tokio::select! {
        result = served.as_mut() => return result,
        _ = connection.draining() => {}
    }
    // An idle connection may have a request on its way: a fresh connection's first, accepted
    // just before the drain, or the next one on a keep-alive connection. Shut down at once,
    // and hyper closes it unanswered (before it even read the request, the HTTP version is not
    // known yet); so it gets a grace to begin one, which is then answered before the
    // connection closes.
    let started = activity.started.notified();
    tokio::pin!(started);
    started.as_mut().enable();
    if activity.in_flight.load(Ordering::SeqCst) == 0 {
        tokio::select! {
            result = served.as_mut() => return result,
            _ = connection.closing() => return Ok(()),
            _ = started => {}
            _ = tokio::time::sleep(IDLE_GRACE) => {}
        }
    }
    served.as_mut().graceful_shutdown();
    tokio::select! {
        result = served => result,
        _ = connection.closing() => Ok(()),
    }
}

/// How long an idle connection may take to begin a request once the drain began.
pub const IDLE_GRACE: Duration = Duration::from_secs(1);

/// What a connection is doing: requests in the service, and a signal when one begins.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    started: Notify,
}

/// The service, counting the requests in flight.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, R> Service<R> for Tracked<S>
where
    S: Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn call(&self, request: R) -> Self::Future {
        self.activity.in_flight.fetch_add(1, Ordering::SeqCst);
        self.activity.started.notify_waiters();
        let done = InFlight(self.activity.clone());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(done);
            response
        })
    }
}

/// One request in the service; dropped when its response is ready (or it was cancelled).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
