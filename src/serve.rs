//! The HTTP listener: accepts connections and serves the router on each over HTTP/1.1.
//!
//! It exists beside `axum::serve` for two reasons. A header read timeout, so a client that sends
//! its request head slowly cannot hold a connection open. And connection threads: each accepted
//! connection is handed to the thread with the fewest open connections, which serves it to the
//! end on a single-threaded runtime of its own. A request then never moves between threads, and
//! no thread wakes another to share its work, which costs less CPU per request than one
//! work-stealing runtime for every connection (measured in `docs/benchmarks.md`). The price: a
//! request that takes long, such as a large gzip body, delays the other connections of its
//! thread, where a work-stealing runtime would move them to an idle thread. Shutdown stops
//! accepting and then lets every connection finish its current request.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

/// Wait after a failed accept, such as when the process is out of file descriptors.
const ACCEPT_ERROR_DELAY: Duration = Duration::from_millis(100);

/// Threads that serve connections, each with a single-threaded runtime. Dropping them stops
/// their runtimes, and with them any connection still open.
#[derive(Debug)]
pub struct ConnectionThreads {
    threads: Vec<ConnectionThread>,
    stop: CancellationToken,
}

#[derive(Debug)]
struct ConnectionThread {
    runtime: Handle,
    /// Connections handed to this thread and not yet closed.
    open: Arc<AtomicUsize>,
    thread: JoinHandle<()>,
}

/// Counts a connection as open on its thread until dropped, with the task that serves it.
struct OpenConnection(Arc<AtomicUsize>);

/// Serves `router` on `listener` with `threads` until `stop` is cancelled, then waits until every
/// open connection has finished its current request, and ends the threads.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    threads: ConnectionThreads,
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
        // The stream leaves this runtime's reactor and joins the connection thread's.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(err) => {
                warn!(%peer, error = %err, "failed to hand a connection to its thread");
                continue;
            }
        };
        let builder = builder.clone();
        let watcher = graceful.watcher();
        threads.spawn(async move {
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(err) => {
                    warn!(%peer, error = %err, "failed to register a connection");
                    return;
                }
            };
            let connection =
                builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            if let Err(err) = watcher.watch(connection).await {
                debug!(%peer, error = %err, "connection closed with an error");
            }
        });
    }

    drop(listener);
    graceful.shutdown().await;
    threads.join().await;
}

// === impl ConnectionThreads ===

impl ConnectionThreads {
    /// Starts `count` threads, named `http-0` and on.
    pub fn start(count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut threads = Self {
            threads: Vec::with_capacity(count),
            stop: stop.clone(),
        };
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let stop = stop.clone();
            // The runtime is dropped on its own thread, where blocking is allowed.
            let thread = std::thread::Builder::new()
                .name(format!("http-{index}"))
                .spawn(move || runtime.block_on(stop.cancelled()))?;
            threads.threads.push(ConnectionThread {
                runtime: handle,
                open: Arc::new(AtomicUsize::new(0)),
                thread,
            });
        }
        Ok(threads)
    }

    /// Spawns `task` on the thread with the fewest open connections, the first of them on a tie.
    /// The task counts as open there until it ends or is dropped.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let Some(thread) = self
            .threads
            .iter()
            .min_by_key(|thread| thread.open.load(Ordering::Relaxed))
        else {
            return;
        };
        thread.open.fetch_add(1, Ordering::Relaxed);
        let open = OpenConnection(thread.open.clone());
        thread.runtime.spawn(async move {
            let _open = open;
            task.await;
        });
    }

    /// Stops every thread and waits until each has ended.
    async fn join(mut self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || {
            for ConnectionThread { thread, .. } in threads {
                if thread.join().is_err() {
                    warn!("a connection thread panicked");
                }
            }
        });
        if let Err(err) = joined.await {
            warn!(error = %err, "failed to wait for the connection threads");
        }
    }
}

impl Drop for ConnectionThreads {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::sync::{mpsc, oneshot};

    /// Spawns a task that reports its thread's name, then waits until the returned sender is
    /// used or dropped.
    fn spawn_held(
        threads: &ConnectionThreads,
        names: &mpsc::UnboundedSender<String>,
    ) -> oneshot::Sender<()> {
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let names = names.clone();
        threads.spawn(async move {
            let name = std::thread::current().name().unwrap_or_default().to_owned();
            names.send(name).unwrap();
            let _ = release_rx.await;
        });
        release_tx
    }

    fn open_counts(threads: &ConnectionThreads) -> Vec<usize> {
        let open = threads
            .threads
            .iter()
            .map(|thread| thread.open.load(Ordering::Relaxed));
        open.collect()
    }

    #[tokio::test]
    async fn connections_go_to_least_busy_thread() {
        let threads = ConnectionThreads::start(3).unwrap();
        let (names_tx, mut names_rx) = mpsc::unbounded_channel();

        let mut releases: Vec<_> = (0..3).map(|_| spawn_held(&threads, &names_tx)).collect();
        assert_eq!(open_counts(&threads), [1, 1, 1]);
        let mut names = Vec::new();
        for _ in 0..3 {
            names.push(names_rx.recv().await.unwrap());
        }
        names.sort();
        assert_eq!(names, ["http-0", "http-1", "http-2"]);

        // The connection on the second thread closes, so the next one goes there.
        drop(releases.remove(1));
        for _ in 0..500 {
            if open_counts(&threads)[1] == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(open_counts(&threads), [1, 0, 1]);
        releases.push(spawn_held(&threads, &names_tx));
        assert_eq!(names_rx.recv().await.unwrap(), "http-1");
        assert_eq!(open_counts(&threads), [1, 1, 1]);

        // Stopping the threads drops the connections still open on them.
        let open: Vec<_> = threads
            .threads
            .iter()
            .map(|thread| thread.open.clone())
            .collect();
        threads.join().await;
        let left: Vec<usize> = open
            .iter()
            .map(|open| open.load(Ordering::Relaxed))
            .collect();
        assert_eq!(left, [0, 0, 0]);
        drop(releases);
    }
}
