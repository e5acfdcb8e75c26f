//! The HTTP floor: the least a server can do for a `POST /v1/collect` request on this machine.
//!
//! It reads the whole body and responds `200` with a fixed body shaped like the real response,
//! on the same stack as the real server (axum, hyper, tokio), and does nothing else. It uses the
//! server's allocator. It runs on axum's default multi-threaded runtime, where the server serves
//! connections on threads of its own: a floor on two single-threaded runtimes served fewer
//! requests a second (`docs/benchmarks.md`). Load benchmarks compare the real server's
//! throughput against it in the same run.
//!
//! ```text
//! cargo run --release --example floor -- 127.0.0.1:3005
//! ```

use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

// The same allocator as the server, so that the comparison measures the work, not the allocator.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Same shape and length as a real response, so both servers send the same bytes back.
const RESPONSE_BODY: &str = r#"{"sessionId":"0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b","accepted":{"impressions":20,"events":0},"duplicates":0}"#;
const DEFAULT_LISTEN: &str = "127.0.0.1:3005";

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen: SocketAddr = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or(DEFAULT_LISTEN)
        .parse()
        .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("listening addr={}", listener.local_addr()?);

    // SIGINT or SIGTERM ends the process at once: the floor has nothing to finish. The handler
    // is installed explicitly because a process started in the background inherits SIGINT
    // ignored.
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            std::process::exit(0);
        }
    });

    let app = Router::new().route("/v1/collect", post(collect));
    axum::serve(listener, app).await
}

async fn collect(body: Bytes) -> impl IntoResponse {
    std::hint::black_box(body);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        RESPONSE_BODY,
    )
}
