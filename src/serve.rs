//! The HTTP listener: accepts connections and serves the router on each over HTTP/1.1.
//!
//! It exists beside `axum::serve` for one reason: a header read timeout, so a client that sends
//! its request head slowly cannot hold a connection open. Shutdown stops accepting and then
//! lets every connection finish its current request.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

/// Wait after a failed accept, such as when the process is out of file descriptors.
const ACCEPT_ERROR_DELAY: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `stop` is cancelled, then waits until every open
/// connection has finished its current request.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    stop: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();

    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "failed to accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_DELAY).await;
                    continue;
                }
            },
        };

        let service = router
            .clone()
            .map_request(move |mut request: hyper::Request<Incoming>| {
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                request.map(Body::new)
            });
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(%peer, error = %err, "connection closed with an error");
            }
        });
    }

    drop(listener);
    graceful.shutdown().await;
}
