//! Malformed and hostile input against the real binary: each class gets its exact status and a
//! JSON error, and nothing of it is stored. Also write keys, slow clients and client addresses.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Server, read_output_checked};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
const WRITE_KEY: &str = "wk-test-1";

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// One malformed request: its body, extra headers, and the expected status and error code.
struct Case {
    name: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
    status: u16,
    error: &'static str,
    field: Option<&'static str>,
    query: &'static str,
}

fn case(name: &'static str, body: impl Into<Vec<u8>>, status: u16, error: &'static str) -> Case {
    Case {
        name,
        body: body.into(),
        headers: vec![("x-write-key", WRITE_KEY.to_owned())],
        status,
        error,
        field: None,
        query: "?deviceId=bad-device",
    }
}

impl Case {
    fn field(mut self, field: &'static str) -> Self {
        self.field = Some(field);
        self
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.retain(|(existing, _)| *existing != name);
        self.headers.push((name, value.to_owned()));
        self
    }

    fn without_device_id(mut self) -> Self {
        self.query = "";
        self
    }

    fn without_write_key(mut self) -> Self {
        self.headers.retain(|(name, _)| *name != "x-write-key");
        self
    }
}

fn malformed_cases() -> Vec<Case> {
    let long = "x".repeat(300);
    let items: Vec<Value> = (0..11)
        .map(|n| json!({"eventId": n.to_string(), "name": "n"}))
        .collect();
    let deep = format!(
        r#"{{"args": {{"a": {}{}}}}}"#,
        "[".repeat(30),
        "]".repeat(30)
    );
    let bomb = gzip(&vec![b' '; 512 * 1024]);
    let mut corrupt = gzip(br#"{"deviceId": "bad"}"#);
    corrupt.truncate(corrupt.len() - 5);

    vec![
        case("invalid JSON", "{\"impressions\": [", 400, "invalid_json").field("impressions"),
        case(
            "wrong type",
            r#"{"impressions": [{"impressionId": 7, "feature": "f"}]}"#,
            400,
            "invalid_field",
        )
        .field("impressions[0].impressionId"),
        case("missing deviceId", "{}", 400, "invalid_field")
            .field("deviceId")
            .without_device_id(),
        case(
            "too many items",
            json!({"events": items}).to_string(),
            400,
            "invalid_field",
        )
        .field("events"),
        case(
            "overlong string",
            json!({"sessionKey": long}).to_string(),
            400,
            "invalid_field",
        )
        .field("sessionKey"),
        case("too deep", deep, 400, "invalid_field").field("args.a[0][0][0][0][0][0]"),
        case(
            "lone surrogate",
            r#"{"args": {"a": "\ud800"}}"#,
            400,
            "invalid_json",
        ),
        case(
            "invalid UTF-8",
            b"{\"args\": {\"a\": \"\xff\"}}".to_vec(),
            400,
            "invalid_json",
        ),
        case("oversized body", vec![b' '; 5000], 413, "body_too_large"),
        case("gzip bomb", bomb, 413, "body_too_large").header("content-encoding", "gzip"),
        case("corrupt gzip", corrupt, 400, "invalid_gzip").header("content-encoding", "gzip"),
        case("unknown encoding", "{}", 415, "unsupported_encoding")
            .header("content-encoding", "br"),
        case("missing write key", "{}", 401, "missing_write_key").without_write_key(),
        case("wrong write key", "{}", 401, "invalid_write_key").header("x-write-key", "wrong"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_4xx_and_stores_nothing() {
    let output = tempfile::tempdir().unwrap();
    let args = [
        "--write-keys",
        WRITE_KEY,
        "--max-body-bytes",
        "4096",
        "--max-decompressed-bytes",
        "16384",
        "--max-batch-items",
        "10",
        "--max-string-bytes",
        "256",
        "--max-json-depth",
        "8",
    ];
    let server = Server::start(output.path(), &args);
    let client = reqwest::Client::new();

    for case in malformed_cases() {
        let url = server.url(&format!("/v1/collect{}", case.query));
        let mut request = client.post(url).body(case.body);
        for (name, value) in &case.headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let error: Value = response.json().await.unwrap();
        assert_eq!(status, case.status, "{}: {error}", case.name);
        assert_eq!(error["error"], case.error, "{}: {error}", case.name);
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            case.name
        );
        if let Some(field) = case.field {
            assert_eq!(error["field"], field, "{}: {error}", case.name);
        }
    }

    // An oversized body without Content-Length, streamed in chunks.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..10).map(|_| Ok(vec![b' '; 1000])).collect();
    let response = client
        .post(server.url("/v1/collect?deviceId=bad-device"))
        .header("x-write-key", WRITE_KEY)
        .body(reqwest::Body::wrap_stream(tokio_stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);

    // A good batch, gzip-compressed and with the key in the query as a beacon sends it.
    let batch = json!({"impressions": [{"impressionId": "good-i1", "feature": "f"}]});
    let response = client
        .post(server.url(&format!(
            "/v1/collect?deviceId=good-device&writeKey={WRITE_KEY}"
        )))
        .header("content-encoding", "gzip")
        .header("content-type", "text/plain;charset=UTF-8")
        .body(gzip(batch.to_string().as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let (status, log) = server.interrupt_and_wait(EXIT_TIMEOUT);
    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(!log.contains(WRITE_KEY), "the write key is in the log");
    let files = read_output_checked(output.path());
    let records: Vec<&Value> = files.iter().flat_map(|file| &file.records).collect();
    assert_eq!(records.len(), 1, "only the good batch is stored");
    assert_eq!(records[0]["device_id"], "good-device");
}

#[test]
fn slow_clients_are_cut_off() {
    let output = tempfile::tempdir().unwrap();
    let args = ["--header-read-timeout", "1s", "--body-read-timeout", "1s"];
    let server = Server::start(output.path(), &args);

    // A request head that never ends: the connection is closed without a response.
    let mut slow_head = TcpStream::connect(server.addr).unwrap();
    slow_head
        .write_all(b"POST /v1/collect HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow_head
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut received = Vec::new();
    let read = slow_head.read_to_end(&mut received);
    assert!(read.is_ok(), "the server closed the connection: {read:?}");
    assert!(!String::from_utf8_lossy(&received).contains("200 OK"));

    // A body that never ends: 408.
    let mut slow_body = TcpStream::connect(server.addr).unwrap();
    slow_body
        .write_all(
            b"POST /v1/collect?deviceId=d HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
        )
        .unwrap();
    slow_body
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut response = String::new();
    slow_body.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("body_read_timeout"), "{response}");

    let (status, log) = server.interrupt_and_wait(EXIT_TIMEOUT);
    assert!(status.success(), "exit status {status}; log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_address_follows_trusted_proxies() {
    let output = tempfile::tempdir().unwrap();
    let args = ["--trusted-proxies", "127.0.0.0/8", "--ip-mode", "truncate"];
    let server = Server::start(output.path(), &args);
    let client = reqwest::Client::new();
    let response = client
        .post(server.url("/v1/collect?deviceId=proxied"))
        .header("x-forwarded-for", "198.51.100.23, 203.0.113.77")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let (status, log) = server.interrupt_and_wait(EXIT_TIMEOUT);
    assert!(status.success(), "exit status {status}; log:\n{log}");
    let files = read_output_checked(output.path());
    assert_eq!(files[0].records[0]["ip_address"], "203.0.113.0");
}
