//! A tonic gRPC server with baton's lifecycle: the standard health service
//! (`grpc.health.v1.Health`, from `tonic-health`, so no protoc and no codegen), upgraded with
//! zero downtime on SIGUSR2 (or `systemctl reload` with the unit files in the crate docs).
//!
//! ```text
//! cargo run -p baton-lifecycle --example tonic -- 127.0.0.1:50051
//! grpcurl -plaintext -d '{"service":"generation-1"}' 127.0.0.1:50051 grpc.health.v1.Health/Check
//! kill -USR2 <pid>      # generation 2 takes over; now generation-2 is SERVING; no call fails
//! kill -TERM <pid>      # stop: calls in flight finish, then the process exits 0
//! ```
//!
//! Every generation reports `SERVING` for the overall server (`""`) and for a service named
//! after itself, `generation-<G>`, so that a client can tell the generations apart.
//!
//! # The drain
//!
//! tonic runs the accept loop itself: [`Server::serve_with_incoming_shutdown`] takes the
//! lifecycle's listener as a stream of accepted connections and [`Accept::stopping`] as its
//! shutdown signal. When the signal fires, tonic stops accepting, sends every connection an
//! HTTP/2 GOAWAY, lets the calls in flight finish, and its future completes only once every
//! connection has closed (each runs in a task of its own, which the future waits for). That future *is* the accept loop given to [`Lifecycle::serve`], and
//! the lifecycle's drain waits for the accept loop to finish: so the drain waits for tonic's
//! connections without counting them with [`Accept::connection`] (the status shows no open
//! connections, but the drain is complete). At the drain's deadline the lifecycle aborts the
//! accept loop, and the connections still open end with the process.
//!
//! One more step keeps a freshly accepted connection's first call from being refused: tonic's
//! graceful shutdown sends GOAWAY to every connection at once, also to one accepted an instant
//! before whose client has not sent its call yet, and that call would fail. So the listener
//! stops yielding connections as soon as the generation stops accepting (the new generation
//! accepts them), but the shutdown signal reaches tonic only [`FIRST_CALL_GRACE`] later.
//! Accepted connections also get `TCP_NODELAY`, as tonic's own listener sets it: without it
//! every call on a fresh connection waits some 40 ms for a delayed ACK.
//!
//! [`Server::serve_with_incoming_shutdown`]: tonic::transport::Server::serve_with_incoming_shutdown
//! [`Accept::stopping`]: baton_lifecycle::Accept::stopping
//! [`Accept::connection`]: baton_lifecycle::Accept::connection
//! [`Lifecycle::serve`]: baton_lifecycle::Lifecycle::serve

use std::process::ExitCode;
use std::time::Duration;

use baton_lifecycle::Options;
use futures_util::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;

/// How long connections accepted before the generation stopped accepting may take to send
/// their first call before tonic's graceful shutdown.
const FIRST_CALL_GRACE: Duration = Duration::from_millis(200);

fn main() -> ExitCode {
    let address = std::env::args().nth(1).unwrap_or("127.0.0.1:50051".into());
    let spec = match format!("grpc={address}").parse() {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("tonic-example: {e}");
            return ExitCode::from(2);
        }
    };
    let options = Options::new("tonic-example", env!("CARGO_PKG_VERSION"))
        .listen(spec)
        .probation(Duration::from_millis(500))
        .log("info", None);
    // SAFETY: first thing in main; no other thread exists.
    let lifecycle = match unsafe { baton_lifecycle::start(options) } {
        Ok(lifecycle) => lifecycle,
        Err(e) => {
            eprintln!("tonic-example: {e}");
            return ExitCode::FAILURE;
        }
    };
    let generation = format!("generation-{}", lifecycle.generation());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            lifecycle.abandon(&format!("cannot start the runtime: {e}"));
            eprintln!("tonic-example: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(lifecycle.serve(move |mut accept| {
        let generation = generation.clone();
        async move {
            let listener = match accept.tcp("grpc") {
                Ok(listener) => listener,
                Err(e) => return eprintln!("tonic-example: {e}"),
            };
            let (reporter, health) = tonic_health::server::health_reporter();
            reporter
                .set_service_status(&generation, ServingStatus::Serving)
                .await;
            // Accepted connections until the generation stops accepting; then none, but the
            // stream does not end: its end would shut tonic down at once.
            let incoming = TcpListenerStream::new(listener)
                .inspect(|accepted| {
                    if let Ok(stream) = accepted {
                        let _ = stream.set_nodelay(true);
                    }
                })
                .take_until(accept.stopping())
                .chain(futures_util::stream::pending());
            let shutdown = async {
                accept.stopping().await;
                tokio::time::sleep(FIRST_CALL_GRACE).await;
            };
            let served = Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await;
            if let Err(e) = served {
                eprintln!("tonic-example: {e}");
            }
        }
    }));
    match served {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tonic-example: {e}");
            ExitCode::FAILURE
        }
    }
}
