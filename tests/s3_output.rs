//! The S3 output end to end: the real binary, real HTTP traffic, and an S3 server on
//! 127.0.0.1 (`s3s-fs`) that can be stopped, restarted and made to return `503 SlowDown`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::Server;
use common::s3::{self, ItemIds, S3Server};
use nix::sys::signal::Signal;

/// Maximum wait for the spool to empty once the store is back. The retry delay is capped at
/// 30 s, so this leaves room for one full delay and the uploads.
const DRAIN_LIMIT: Duration = Duration::from_secs(90);
/// Maximum wait for the server to exit after a signal, or after a failed start.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Downloads the bucket and checks that it contains exactly the `accepted` items, each once, in
/// the right partition, as both Avro readers see it.
fn assert_exactly_once(accepted: &ItemIds, store: &S3Server, work: &Path) {
    let downloaded = work.join("downloaded");
    let keys = store.download_all(&downloaded);
    assert!(!keys.is_empty(), "no object in the bucket");
    for key in &keys {
        assert!(key.starts_with("edge/incoming-logs/ds="), "{key}");
        assert!(key.contains("/test-server-"), "{key}");
    }

    let files = common::read_output_checked(&downloaded.join(s3::PREFIX));
    assert_eq!(files.len(), keys.len());
    common::assert_partitions(&files);
    let stored = s3::item_ids(&files);
    let mut expected = accepted.clone();
    expected.sort();
    assert_eq!(stored.len(), expected.len());
    assert_eq!(
        stored, expected,
        "the bucket holds other items than accepted"
    );
}

fn interrupt(server: Server) -> (std::process::ExitStatus, String) {
    server.interrupt_and_wait(EXIT_TIMEOUT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_uploads_everything_once() {
    let work = tempfile::tempdir().unwrap();
    let store = S3Server::start(&work.path().join("s3"));
    let spool = work.path().join("spool");
    let server = s3::start_server(&store, &spool, &[]);

    let accepted = s3::post_traffic(&server.url(""), "sigint", 50, 10, 100).await;
    assert_eq!(accepted.len(), 50 * 10 * 5);
    let (status, log) = interrupt(server);

    assert!(status.success(), "exit {status}:\n{log}");
    assert_eq!(s3::spooled_files(&spool), 0);
    assert_exactly_once(&accepted, &store, work.path());
    // Every upload carried the checksum header and a plain body.
    let puts = store.faults.put_headers.lock().unwrap().clone();
    assert!(!puts.is_empty());
    for put in &puts {
        assert!(put.checksum_crc32c.is_some(), "{put:?}");
        assert_eq!(put.content_encoding, None, "{put:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_file_uses_multipart() {
    let work = tempfile::tempdir().unwrap();
    let store = S3Server::start(&work.path().join("s3"));
    let spool = work.path().join("spool");
    let extra = [
        "--codec",
        "null",
        "--s3-multipart-threshold-bytes",
        "5242880",
    ];
    let server = s3::start_server(&store, &spool, &extra);

    // About 7 MiB of impressions in one partition file.
    let accepted = s3::post_traffic(&server.url(""), "large", 20, 20, 6000).await;
    let (status, log) = interrupt(server);

    assert!(status.success(), "exit {status}:\n{log}");
    let puts = store.faults.put_headers.lock().unwrap().clone();
    let parts: Vec<_> = puts
        .iter()
        .filter(|put| put.query.contains("partNumber="))
        .collect();
    assert_eq!(parts.len(), 2, "{puts:?}");
    for part in parts {
        assert!(part.checksum_crc32c.is_some(), "{part:?}");
    }
    assert_exactly_once(&accepted, &store, work.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_down_answers_are_retried() {
    let work = tempfile::tempdir().unwrap();
    let store = S3Server::start(&work.path().join("s3"));
    let spool = work.path().join("spool");
    let server = s3::start_server(&store, &spool, &["--max-file-bytes", "4096"]);
    // The start check is done, so the next 8 uploads meet throttling.
    store.faults.slow_down_puts.store(8, Ordering::SeqCst);

    let accepted = s3::post_traffic(&server.url(""), "slow", 20, 5, 100).await;
    let (status, log) = interrupt(server);

    assert!(status.success(), "exit {status}:\n{log}");
    assert_eq!(store.faults.slowed_down.load(Ordering::SeqCst), 8);
    assert!(log.contains("SlowDown"), "{log}");
    assert_exactly_once(&accepted, &store, work.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_keeps_files_on_disk() {
    let work = tempfile::tempdir().unwrap();
    let s3_root = work.path().join("s3");
    let store = S3Server::start(&s3_root);
    let faults = store.faults.clone();
    let spool = work.path().join("spool");
    let extra = [
        "--session-timeout",
        "1s",
        "--upload-interval",
        "1s",
        "--max-file-bytes",
        "8192",
    ];
    let server = s3::start_server(&store, &spool, &extra);

    let mut accepted = s3::post_traffic(&server.url(""), "before", 20, 5, 200).await;
    let rss_before_kib = s3::rss_kib(server.pid());

    let port = store.stop();
    for round in 0..5 {
        let tag = format!("outage{round}");
        accepted.extend(s3::post_traffic(&server.url(""), &tag, 20, 5, 200).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    s3::wait_until(Duration::from_secs(20), "files in the spool", || {
        s3::spooled_files(&spool) >= 5
    });
    let rss_during_kib = s3::rss_kib(server.pid());
    assert!(
        rss_during_kib < rss_before_kib * 3 + 32 * 1024,
        "resident memory grew from {rss_before_kib} KiB to {rss_during_kib} KiB"
    );

    // The spool gauge shows every waiting file, not only those the publisher has taken.
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let spool_gauge: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("impression_server_spool_files "))
        .and_then(|value| value.parse().ok())
        .unwrap();
    assert!(
        spool_gauge >= 5.0,
        "spool_files is {spool_gauge} during the outage"
    );

    let store = S3Server::start_on(&s3_root, port, faults);
    s3::wait_until(DRAIN_LIMIT, "the spool to empty", || {
        s3::spooled_files(&spool) == 0
    });
    accepted.extend(s3::post_traffic(&server.url(""), "after", 20, 2, 200).await);
    let (status, log) = interrupt(server);

    assert!(status.success(), "exit {status}:\n{log}");
    assert_eq!(s3::spooled_files(&spool), 0);
    assert_exactly_once(&accepted, &store, work.path());
    eprintln!(
        "resident memory before the outage {rss_before_kib} KiB, during {rss_during_kib} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_uploads_spooled_files() {
    let work = tempfile::tempdir().unwrap();
    let s3_root = work.path().join("s3");
    let store = S3Server::start(&s3_root);
    let faults = store.faults.clone();
    let spool = work.path().join("spool");
    let extra = ["--session-timeout", "1s", "--upload-interval", "1s"];
    let mut server = s3::start_server(&store, &spool, &extra);

    let port = store.stop();
    s3::post_traffic(&server.url(""), "crash", 10, 3, 100).await;
    s3::wait_until(Duration::from_secs(20), "files in the spool", || {
        s3::spooled_files(&spool) > 0
    });
    // Sessions still open at the kill are lost without a write-ahead log, so the check is on
    // what reached the spool.
    server.signal(Signal::SIGKILL);
    server.wait(EXIT_TIMEOUT);
    let spooled = s3::item_ids(&common::read_output_rust(&spool));
    assert!(!spooled.is_empty());

    let store = S3Server::start_on(&s3_root, port, faults);
    let server = s3::start_server(&store, &spool, &extra);
    s3::wait_until(DRAIN_LIMIT, "the spool to empty", || {
        s3::spooled_files(&spool) == 0
    });
    let (status, log) = interrupt(server);

    assert!(status.success(), "exit {status}:\n{log}");
    assert!(log.contains("earlier run"), "{log}");
    assert_exactly_once(&spooled, &store, work.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_store_down_fails() {
    let work = tempfile::tempdir().unwrap();
    let store = S3Server::start(&work.path().join("s3"));
    let spool = work.path().join("spool");
    let server = s3::start_server(&store, &spool, &["--shutdown-timeout", "2s"]);

    store.stop();
    s3::post_traffic(&server.url(""), "down", 5, 2, 100).await;
    let (status, log) = interrupt(server);

    assert_eq!(status.code(), Some(1), "{log}");
    let left: Vec<_> = log
        .lines()
        .filter(|line| line.contains("not published") && line.contains("files=1"))
        .collect();
    assert_eq!(left.len(), 1, "{log}");
    assert_eq!(s3::spooled_files(&spool), 1);
}

/// Starts the server against `endpoint` and checks that it exits 1 with one error line that
/// names the bucket, the endpoint and one of `causes`.
fn assert_one_line_failure(endpoint: &str, bucket: &str, secret: &str, causes: &[&str]) {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let mut server = s3::start_server_at(endpoint, bucket, &spool, &[], secret);
    let (status, log) = server.wait(EXIT_TIMEOUT);

    assert_eq!(status.code(), Some(1), "{log}");
    let errors: Vec<&str> = log.lines().filter(|line| line.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    let line = errors[0];
    eprintln!("{line}");
    assert!(line.contains(endpoint), "{line}");
    assert!(line.contains(&format!("s3://{bucket}/")), "{line}");
    assert!(
        causes.iter().any(|cause| line.contains(cause)),
        "expected one of {causes:?}: {line}"
    );
    assert!(!log.contains(" ready "), "{log}");
}

#[test]
fn missing_bucket_fails_start() {
    let work = tempfile::tempdir().unwrap();
    let store = S3Server::start(&work.path().join("s3"));
    assert_one_line_failure(
        &store.endpoint(),
        "no-such-bucket",
        s3::SECRET_KEY,
        &["NoSuchBucket"],
    );
}

#[test]
fn wrong_secret_fails_start() {
    let work = tempfile::tempdir().unwrap();
    let store = S3Server::start(&work.path().join("s3"));

    assert_one_line_failure(
        &store.endpoint(),
        s3::BUCKET,
        "wrong-secret",
        &["SignatureDoesNotMatch", "AccessDenied"],
    );
}

#[test]
fn unreachable_endpoint_fails_start() {
    // A port that was free a moment ago, so nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");

    assert_one_line_failure(
        &endpoint,
        s3::BUCKET,
        s3::SECRET_KEY,
        &["Connection refused", "timed out"],
    );
}
