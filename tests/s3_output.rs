//! The S3 output end to end: the real binary, real HTTP traffic, and an S3 server on
//! 127.0.0.1 (`s3s-fs`) that can be stopped, restarted and made to return `503 SlowDown`.

#[path = "common/s3.rs"]
mod s3;

use std::sync::atomic::Ordering;
use std::time::Duration;

use s3::{Items, S3Server, ServerProcess};

/// Maximum wait for the spool to empty once the store is back. The retry delay is capped at
/// 30 s, so this leaves room for one full delay and the uploads.
const DRAIN_LIMIT: Duration = Duration::from_secs(90);

fn assert_exactly_once(accepted: &Items, store: &S3Server, work: &std::path::Path) {
    let downloaded = work.join("downloaded");
    let keys = store.download_all(&downloaded);
    assert!(!keys.is_empty(), "no object in the bucket");
    for key in &keys {
        assert!(key.starts_with("edge/incoming-logs/ds="), "{key}");
        assert!(key.contains("/edge-1-"), "{key}");
    }

    let expected = accepted.clone().sorted();
    let from_rust = s3::read_items_rust(&downloaded).sorted();
    assert_eq!(from_rust.impressions.len(), expected.impressions.len());
    assert_eq!(from_rust.events.len(), expected.events.len());
    assert_eq!(
        from_rust, expected,
        "apache-avro read other items than accepted"
    );
    let from_python = s3::read_items_python(&downloaded).sorted();
    assert_eq!(
        from_python, expected,
        "fastavro read other items than accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_uploads_everything_once() {
    let work = tempfile::tempdir().unwrap();
    let store = S3Server::start(&work.path().join("s3"));
    let spool = work.path().join("spool");
    let server = ServerProcess::start(&s3::s3_args(&store.endpoint(), &spool, &[]));

    let accepted = s3::post_traffic(&server.url(""), "sigint", 50, 10, 100).await;
    assert_eq!(accepted.impressions.len(), 50 * 10 * 3);
    let (status, log) = server.interrupt();

    assert!(status.success(), "exit {status}:\n{}", log.join("\n"));
    assert!(s3::spooled_files(&spool).is_empty());
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
    let args = s3::s3_args(
        &store.endpoint(),
        &spool,
        &[
            "--codec",
            "null",
            "--s3-multipart-threshold-bytes",
            "5242880",
        ],
    );
    let server = ServerProcess::start(&args);

    // About 7 MiB of impressions in one partition file.
    let accepted = s3::post_traffic(&server.url(""), "large", 20, 20, 6000).await;
    let (status, log) = server.interrupt();

    assert!(status.success(), "exit {status}:\n{}", log.join("\n"));
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
    let args = s3::s3_args(&store.endpoint(), &spool, &["--max-file-bytes", "4096"]);
    let server = ServerProcess::start(&args);
    // The start check is done; the next uploads meet throttling.
    store.faults.slow_down_puts.store(8, Ordering::SeqCst);

    let accepted = s3::post_traffic(&server.url(""), "slow", 20, 5, 100).await;
    let (status, log) = server.interrupt();

    assert!(status.success(), "exit {status}:\n{}", log.join("\n"));
    assert_eq!(store.faults.slowed_down.load(Ordering::SeqCst), 8);
    assert!(log.iter().any(|line| line.contains("SlowDown")));
    assert_exactly_once(&accepted, &store, work.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_keeps_files_on_disk() {
    let work = tempfile::tempdir().unwrap();
    let s3_root = work.path().join("s3");
    let store = S3Server::start(&s3_root);
    let faults = store.faults.clone();
    let spool = work.path().join("spool");
    let args = s3::s3_args(
        &store.endpoint(),
        &spool,
        &[
            "--session-timeout",
            "1s",
            "--upload-interval",
            "1s",
            "--max-file-bytes",
            "8192",
        ],
    );
    let server = ServerProcess::start(&args);

    let mut accepted = s3::post_traffic(&server.url(""), "before", 20, 5, 200).await;
    let rss_before_kib = server.rss_kib();

    let port = store.stop();
    for round in 0..5 {
        let tag = format!("outage{round}");
        accepted.extend(s3::post_traffic(&server.url(""), &tag, 20, 5, 200).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    s3::wait_until(Duration::from_secs(20), "files in the spool", || {
        s3::spooled_files(&spool).len() >= 5
    });
    let rss_during_kib = server.rss_kib();
    assert!(
        rss_during_kib < rss_before_kib * 3 + 32 * 1024,
        "resident memory grew from {rss_before_kib} KiB to {rss_during_kib} KiB"
    );

    let store = S3Server::start_on(&s3_root, port, faults);
    s3::wait_until(DRAIN_LIMIT, "the spool to empty", || {
        s3::spooled_files(&spool).is_empty()
    });
    accepted.extend(s3::post_traffic(&server.url(""), "after", 20, 2, 200).await);
    let (status, log) = server.interrupt();

    assert!(status.success(), "exit {status}:\n{}", log.join("\n"));
    assert!(s3::spooled_files(&spool).is_empty());
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
    let args = s3::s3_args(
        &store.endpoint(),
        &spool,
        &["--session-timeout", "1s", "--upload-interval", "1s"],
    );
    let server = ServerProcess::start(&args);

    let port = store.stop();
    s3::post_traffic(&server.url(""), "crash", 10, 3, 100).await;
    s3::wait_until(Duration::from_secs(20), "files in the spool", || {
        !s3::spooled_files(&spool).is_empty()
    });
    // Sessions still open at the kill are lost without a write-ahead log, so the check is on
    // what reached the spool.
    server.kill();
    let spooled = s3::read_items_rust(&spool);
    assert!(!spooled.impressions.is_empty());

    let store = S3Server::start_on(&s3_root, port, faults);
    let server = ServerProcess::start(&args);
    s3::wait_until(DRAIN_LIMIT, "the spool to empty", || {
        s3::spooled_files(&spool).is_empty()
    });
    let (status, log) = server.interrupt();

    assert!(status.success(), "exit {status}:\n{}", log.join("\n"));
    assert!(log.iter().any(|line| line.contains("earlier run")));
    assert_exactly_once(&spooled, &store, work.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_store_down_fails() {
    let work = tempfile::tempdir().unwrap();
    let store = S3Server::start(&work.path().join("s3"));
    let spool = work.path().join("spool");
    let args = s3::s3_args(&store.endpoint(), &spool, &["--shutdown-timeout", "2s"]);
    let server = ServerProcess::start(&args);

    store.stop();
    s3::post_traffic(&server.url(""), "down", 5, 2, 100).await;
    let (status, log) = server.interrupt();

    assert_eq!(status.code(), Some(1), "{}", log.join("\n"));
    let left: Vec<_> = log
        .iter()
        .filter(|line| line.contains("not published") && line.contains("files=1"))
        .collect();
    assert_eq!(left.len(), 1, "{}", log.join("\n"));
    assert_eq!(s3::spooled_files(&spool).len(), 1);
}

fn assert_one_line_failure(args: &[String], endpoint: &str, secret: &str, causes: &[&str]) {
    let (status, log) = s3::run_to_exit(args, secret);
    assert_eq!(status.code(), Some(1), "{}", log.join("\n"));
    let errors: Vec<&String> = log.iter().filter(|line| line.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{}", log.join("\n"));
    let line = errors[0];
    eprintln!("{line}");
    assert!(line.contains(endpoint), "{line}");
    assert!(line.contains("s3://"), "{line}");
    assert!(
        causes.iter().any(|cause| line.contains(cause)),
        "expected one of {causes:?}: {line}"
    );
    assert!(
        !log.iter().any(|line| line.contains(" ready ")),
        "{}",
        log.join("\n")
    );
}

#[test]
fn missing_bucket_fails_start() {
    let work = tempfile::tempdir().unwrap();
    let store = S3Server::start(&work.path().join("s3"));
    let mut args = s3::s3_args(&store.endpoint(), &work.path().join("spool"), &[]);
    let output = args
        .iter()
        .position(|arg| arg == "--output")
        .expect("--output in the arguments");
    args[output + 1] = "s3://no-such-bucket/edge".to_owned();

    assert_one_line_failure(&args, &store.endpoint(), s3::SECRET_KEY, &["NoSuchBucket"]);
    let (_, log) = s3::run_to_exit(&args, s3::SECRET_KEY);
    assert!(log.iter().any(|line| line.contains("no-such-bucket")));
}

#[test]
fn wrong_secret_fails_start() {
    let work = tempfile::tempdir().unwrap();
    let store = S3Server::start(&work.path().join("s3"));
    let args = s3::s3_args(&store.endpoint(), &work.path().join("spool"), &[]);

    assert_one_line_failure(
        &args,
        &store.endpoint(),
        "wrong-secret",
        &["SignatureDoesNotMatch", "AccessDenied"],
    );
}

#[test]
fn unreachable_endpoint_fails_start() {
    let work = tempfile::tempdir().unwrap();
    // A port that was free a moment ago, so nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let args = s3::s3_args(&endpoint, &work.path().join("spool"), &[]);

    assert_one_line_failure(
        &args,
        &endpoint,
        s3::SECRET_KEY,
        &["onnection refused", "timed out"],
    );
}
