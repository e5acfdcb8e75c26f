//! A real browser: headless Chromium loads a page from another origin that posts a batch with
//! `fetch` (a CORS preflight) and sends a beacon on `pagehide`. After SIGINT both are in the
//! Avro output, in one session.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::response::Html;
use axum::routing::get;
use common::{Server, read_output_checked};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::mpsc;

/// How long the page may take to post its batch and report back.
const PAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for the beacon, sent as the page navigates away, to reach the server.
const BEACON_GRACE: Duration = Duration::from_secs(2);

/// Headless Chromium in a process group of its own, ended with the group when dropped.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn open(url: &str) -> Browser {
        let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".to_owned());
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(&binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|err| {
                panic!("failed to start {binary} (install Debian's chromium): {err}")
            });
        Browser {
            child,
            _profile: profile,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Serves the test page on its own port, so the collector is another origin, and reports the
/// query of `/done`, where the page goes when it has posted its batch.
async fn serve_page(collector: String) -> (String, mpsc::Receiver<HashMap<String, String>>) {
    let page = include_str!("browser/page.html").replace("__SERVER__", &collector);
    let (done_tx, done_rx) = mpsc::channel(4);
    let app = Router::new()
        .route("/page.html", get(move || async move { Html(page) }))
        .route(
            "/done",
            get(
                move |Query(report): Query<HashMap<String, String>>| async move {
                    let _ = done_tx.send(report).await;
                    Html("done")
                },
            ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/page.html", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, done_rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_fetch_and_beacon_are_stored() {
    let output = tempfile::tempdir().unwrap();
    let server = Server::start(output.path(), &[]);
    let (page_url, mut done) = serve_page(server.url("")).await;

    let browser = Browser::open(&page_url);
    let report = tokio::time::timeout(PAGE_TIMEOUT, done.recv())
        .await
        .expect("the page reported back in time")
        .expect("the page server is running");
    assert_eq!(report.get("error"), None, "the page failed: {report:?}");
    assert_eq!(report["status"], "200");
    assert_eq!(report["impressions"], "2");
    assert_eq!(report["events"], "1");

    tokio::time::sleep(BEACON_GRACE).await;
    drop(browser);
    let (status, log) = server.interrupt_and_wait(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}; log:\n{log}");

    let files = read_output_checked(output.path());
    let records: Vec<_> = files.iter().flat_map(|file| &file.records).collect();
    assert_eq!(records.len(), 1, "one session: {records:?}");
    let session = records[0];
    assert_eq!(session["device_id"], "browser-device-1");
    assert_eq!(session["session_key"], "tab-1");
    assert_eq!(session["entry_url"], page_url);
    assert!(
        session["user_agent"].as_str().unwrap().contains("Chrome"),
        "{}",
        session["user_agent"]
    );

    let impressions: Vec<&str> = session["impressions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["impression_id"].as_str().unwrap())
        .collect();
    assert_eq!(impressions, ["browser-i1", "browser-i2"]);
    let events: Vec<&str> = session["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["browser-e1", "beacon-e1"],
        "the beacon is in the session"
    );
    assert_eq!(session["events"][1]["feature"], "RatingBox");
}
