//! An axum router served with baton's lifecycle: zero-downtime upgrades on SIGUSR2 (or
//! `systemctl reload` with the unit files in the crate docs), HTTP/1 and HTTP/2, drained
//! gracefully (`Connection: close`, GOAWAY).
//!
//! ```text
//! cargo run -p baton-lifecycle --features hyper --example axum -- 127.0.0.1:3000
//! curl http://127.0.0.1:3000/      # hello from generation 1, pid ...
//! kill -USR2 <pid>                 # generation 2 takes over; no request fails
//! ```

use std::process::ExitCode;

use axum::routing::get;
use axum::Router;
use baton_lifecycle::Options;
use hyper_util::service::TowerToHyperService;

fn main() -> ExitCode {
    let address = std::env::args().nth(1).unwrap_or("127.0.0.1:3000".into());
    let spec = match format!("http={address}").parse() {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("axum-example: {e}");
            return ExitCode::from(2);
        }
    };
    let options = Options::new("axum-example", env!("CARGO_PKG_VERSION"))
        .listen(spec)
        .probation(std::time::Duration::from_millis(500))
        .log("info", None);
    // SAFETY: first thing in main; no other thread exists.
    let lifecycle = match unsafe { baton_lifecycle::start(options) } {
        Ok(lifecycle) => lifecycle,
        Err(e) => {
            eprintln!("axum-example: {e}");
            return ExitCode::FAILURE;
        }
    };
    let greeting = format!(
        "hello from generation {}, pid {}\n",
        lifecycle.generation(),
        std::process::id()
    );
    let router = Router::new().route("/", get(move || async move { greeting }));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            lifecycle.abandon(&format!("cannot start the runtime: {e}"));
            eprintln!("axum-example: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(lifecycle.serve(move |mut accept| {
        let service = TowerToHyperService::new(router.clone());
        async move {
            let listener = match accept.tcp("http") {
                Ok(listener) => listener,
                Err(e) => return eprintln!("axum-example: {e}"),
            };
            loop {
                let stream = tokio::select! {
                    _ = accept.stopping() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => {
                            // Out of fds, most likely: wait instead of spinning on the client
                            // still pending.
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                let connection = accept.connection();
                let service = service.clone();
                tokio::spawn(baton_lifecycle::hyper::serve_connection(
                    stream, service, connection,
                ));
            }
        }
    }));
    match served {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("axum-example: {e}");
            ExitCode::FAILURE
        }
    }
}
