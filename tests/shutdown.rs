//! Shutdown of the real binary: in-flight requests finish during the drain, SIGTERM works like
//! SIGINT, and a second signal exits at once.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Server, read_output_checked};
use nix::sys::signal::Signal;

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for the server to act on a signal before the test checks what it did.
const SIGNAL_SETTLE: Duration = Duration::from_millis(500);

/// Opens a connection and sends a `POST /v1/collect` whose body is cut after `sent_bytes`.
fn start_slow_request(server: &Server, body: &str, sent_bytes: usize) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    let head = format!(
        "POST /v1/collect HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        server.addr,
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body.as_bytes()[..sent_bytes]).unwrap();
    stream.flush().unwrap();
    stream
}

#[test]
fn in_flight_request_finishes_during_drain() {
    let output = tempfile::tempdir().unwrap();
    let mut server = Server::start(output.path(), &["--drain-timeout", "20s"]);
    let body = r#"{"deviceId": "slow-device", "impressions": [{"impressionId": "slow-i1", "feature": "f"}]}"#;
    let mut stream = start_slow_request(&server, body, 10);
    std::thread::sleep(SIGNAL_SETTLE);

    server.signal(Signal::SIGTERM);
    std::thread::sleep(SIGNAL_SETTLE);
    assert!(
        server.is_running(),
        "the server waits for the in-flight request"
    );

    stream.write_all(&body.as_bytes()[10..]).unwrap();
    stream.set_read_timeout(Some(EXIT_TIMEOUT)).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let (status, log) = server.wait(EXIT_TIMEOUT);
    assert!(status.success(), "exit status {status}; log:\n{log}");
    let files = read_output_checked(output.path());
    let records: Vec<_> = files.iter().flat_map(|file| &file.records).collect();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["device_id"], "slow-device");
    assert_eq!(records[0]["impressions"][0]["impression_id"], "slow-i1");
    assert_eq!(records[0]["close_reason"], "shutdown");
}

#[test]
fn second_signal_exits_at_once() {
    let output = tempfile::tempdir().unwrap();
    let mut server = Server::start(output.path(), &["--drain-timeout", "60s"]);
    let _stream = start_slow_request(&server, r#"{"deviceId": "stalled"}"#, 5);
    std::thread::sleep(SIGNAL_SETTLE);

    server.signal(Signal::SIGINT);
    std::thread::sleep(SIGNAL_SETTLE);
    assert!(server.is_running(), "the first signal waits for the drain");

    server.signal(Signal::SIGINT);
    let (status, log) = server.wait(Duration::from_secs(5));
    assert_eq!(status.code(), Some(130), "log:\n{log}");
    assert!(log.contains("second signal"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_closed_session() {
    let output = tempfile::tempdir().unwrap();
    let args = ["--session-timeout", "1s"];
    let mut server = Server::start(output.path(), &args);
    let client = reqwest::Client::new();
    let mut sent = Vec::new();
    for device in 0..20 {
        let id = format!("crash-i{device}");
        let body = serde_json::json!({"deviceId": format!("crash-{device}"),
                                      "impressions": [{"impressionId": id, "feature": "f"}]});
        let response = client
            .post(server.url("/v1/collect"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        sent.push(id);
    }

    // Wait until every session has closed into the open partition file, then crash.
    let count_url = server.url("/v1/sessions/count");
    let mut active = usize::MAX;
    for _ in 0..100 {
        let count: serde_json::Value = client
            .get(&count_url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        active = count["activeSessions"].as_u64().unwrap() as usize;
        if active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(active, 0, "the sessions closed");
    server.signal(Signal::SIGKILL);
    let (status, _) = server.wait(EXIT_TIMEOUT);
    assert_eq!(status.code(), None, "killed by a signal");

    // The next start salvages the unfinished file and publishes it.
    let restarted = Server::start(output.path(), &args);
    let (status, log) = restarted.interrupt_and_wait(EXIT_TIMEOUT);
    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(log.contains("salvaged"), "{log}");

    let files = read_output_checked(output.path());
    let mut stored: Vec<String> = files
        .iter()
        .flat_map(|file| &file.records)
        .flat_map(|record| record["impressions"].as_array().unwrap())
        .map(|impression| impression["impression_id"].as_str().unwrap().to_owned())
        .collect();
    stored.sort();
    sent.sort();
    assert_eq!(stored, sent, "every acknowledged impression, exactly once");
}
