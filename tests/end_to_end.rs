//! End-to-end: the real binary on 127.0.0.1, real HTTP clients, SIGINT, and the Avro output read
//! back by two independent readers.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Server, assert_partitions, count_items, read_output_checked};
use serde_json::{Value, json};

const DEVICES: usize = 60;
const BATCHES_PER_DEVICE: usize = 5;
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server acknowledged: `(session_id, item id) -> 1` for every accepted item.
type Acknowledged = BTreeMap<(String, String), usize>;

/// Sends one device's batches in order, the way a browser tab would, and records what the
/// server acknowledged.
async fn send_device_batches(client: reqwest::Client, base: String, device: usize) -> Acknowledged {
    let device_id = format!("device-{device}");
    let mut acknowledged = Acknowledged::new();
    for batch in 0..BATCHES_PER_DEVICE {
        // Every tenth device opens a new tab (a new session key) for its last two batches.
        let session_key = if device.is_multiple_of(10) && batch >= 3 {
            "tab-2"
        } else {
            "tab-1"
        };
        let impression_ids: Vec<String> = (0..2)
            .map(|n| format!("{device_id}-i{batch}-{n}"))
            .collect();
        let event_id = format!("{device_id}-e{batch}");
        let mut body = json!({
            "sessionKey": session_key,
            "sentAt": now_ms(),
            "context": {"entryUrl": format!("https://shop.example/p/{device}"), "clientType": "web"},
            "args": {"plan": "pro", "batch": batch},
            "impressions": impression_ids.iter().map(|id| json!({
                "impressionId": id, "feature": "RatingBox", "time": now_ms() - 500,
                "args": {"product": "shoe-42"}, "outputs": {"callToAction": "Rate it"},
                "variants": ["cta-test:B"],
            })).collect::<Vec<_>>(),
            "events": [{"eventId": event_id, "name": "Rating", "impressionId": impression_ids[0],
                        "fields": {"stars": 5}}],
        });

        // The device id travels in the body, the header or the query, as different clients send it.
        let mut request = match batch % 3 {
            0 => {
                body["deviceId"] = json!(device_id);
                client
                    .post(format!("{base}/v1/collect"))
                    .header("content-type", "application/json")
            }
            1 => client
                .post(format!("{base}/v1/collect"))
                .header("x-device-id", &device_id)
                .header("content-type", "application/json"),
            _ => client
                .post(format!("{base}/v1/collect?deviceId={device_id}"))
                .header("content-type", "text/plain;charset=UTF-8"),
        };
        request = request.body(body.to_string());
        let response: Value = request
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            response["accepted"],
            json!({"impressions": 2, "events": 1}),
            "{device_id} batch {batch}"
        );
        let session_id = response["sessionId"].as_str().unwrap().to_owned();
        for id in &impression_ids {
            acknowledged.insert((session_id.clone(), format!("impression:{id}")), 1);
        }
        acknowledged.insert((session_id.clone(), format!("event:{event_id}")), 1);

        // The second batch is retried, as after a lost response: everything is a duplicate.
        if batch == 1 {
            let retry = client
                .post(format!("{base}/v1/collect"))
                .header("x-device-id", &device_id)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let retry: Value = retry.json().await.unwrap();
            assert_eq!(retry["accepted"], json!({"impressions": 0, "events": 0}));
            assert_eq!(retry["duplicates"], 3);
            assert_eq!(retry["sessionId"], session_id);
        }
    }
    acknowledged
}

/// Sends the batches of every device at once, each device's in order, and records what the
/// server acknowledged.
async fn send_all_devices(client: &reqwest::Client, base: &str) -> Acknowledged {
    let tasks: Vec<_> = (0..DEVICES)
        .map(|device| tokio::spawn(send_device_batches(client.clone(), base.to_owned(), device)))
        .collect();
    let mut acknowledged = Acknowledged::new();
    for task in tasks {
        acknowledged.extend(task.await.unwrap());
    }
    acknowledged
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Sends one malformed request for `device_id` and checks its status and error body.
async fn send_malformed(
    client: &reqwest::Client,
    base: &str,
    body: Vec<u8>,
    expected_status: u16,
    expected_field: Option<&str>,
) {
    let response = client
        .post(format!("{base}/v1/collect?deviceId=bad-device"))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let error: Value = response.json().await.unwrap();
    assert_eq!(status, expected_status, "{error}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{error}"
    );
    if let Some(field) = expected_field {
        assert_eq!(error["field"], field, "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_item_is_written_once() {
    let output = tempfile::tempdir().unwrap();
    let server = Server::start(output.path(), &["--max-body-bytes", "65536"]);
    let base = server.url("");
    let client = reqwest::Client::new();
    let acknowledged = send_all_devices(&client, &base).await;

    // Malformed input: each gets its 4xx, and nothing of it is stored.
    let deep = format!(
        r#"{{"args": {{"a": {}{}}}}}"#,
        "[".repeat(1000),
        "]".repeat(1000)
    );
    let cases: Vec<(Vec<u8>, u16, Option<&str>)> = vec![
        (b"{\"impressions\": [".to_vec(), 400, Some("impressions")),
        (b"not json".to_vec(), 400, Some("body")),
        (
            br#"{"impressions": [{"impressionId": 7, "feature": "f"}]}"#.to_vec(),
            400,
            Some("impressions[0].impressionId"),
        ),
        (
            br#"{"events": [{"eventId": "e", "name": "n", "time": "noon"}]}"#.to_vec(),
            400,
            Some("events[0].time"),
        ),
        (deep.into_bytes(), 400, None),
        (b"{\"args\": {\"a\": \"\xff\xfe\"}}".to_vec(), 400, None),
        (br#"{"args": {"a": "\udc00"}}"#.to_vec(), 400, None),
        (vec![b' '; 70_000], 413, None),
    ];
    for (body, status, field) in cases {
        send_malformed(&client, &base, body, status, field).await;
    }
    let missing = client
        .post(format!("{base}/v1/collect"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 400);
    let missing: Value = missing.json().await.unwrap();
    assert_eq!(missing["field"], "deviceId");

    let count: Value = client
        .get(server.url("/v1/sessions/count"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(count["activeSessions"], DEVICES);

    let (status, log) = server.interrupt_and_wait(EXIT_TIMEOUT);
    assert!(status.success(), "exit status {status}; log:\n{log}");

    let files = read_output_checked(output.path());
    assert_partitions(&files);
    assert!(files.iter().all(|file| file.codec == "snappy"));
    assert_eq!(
        count_items(&files),
        acknowledged,
        "every acknowledged item exactly once, in its session"
    );

    let records: Vec<&Value> = files.iter().flat_map(|file| &file.records).collect();
    let key_changes = DEVICES / 10;
    assert_eq!(records.len(), DEVICES + key_changes);
    assert!(
        records
            .iter()
            .all(|r| r["device_id"].as_str().unwrap().starts_with("device-"))
    );
    let reasons: Vec<&str> = records
        .iter()
        .map(|r| r["close_reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == "session_key_changed")
            .count(),
        key_changes
    );
    assert_eq!(
        reasons.iter().filter(|r| **r == "shutdown").count(),
        DEVICES
    );
    for record in &records {
        let device = record["device_id"].as_str().unwrap();
        for impression in record["impressions"].as_array().unwrap() {
            assert!(
                impression["impression_id"]
                    .as_str()
                    .unwrap()
                    .starts_with(device)
            );
            assert_eq!(impression["outputs"]["callToAction"], "Rate it");
        }
        for event in record["events"].as_array().unwrap() {
            assert_eq!(
                event["feature"], "RatingBox",
                "the event's impression is in its session"
            );
            assert_eq!(event["fields"]["stars"], "5");
        }
        assert_eq!(record["server_id"], "test-server");
        assert_eq!(record["ip_address"], "127.0.0.1");
        assert!(record["start_time"].as_i64() <= record["end_time"].as_i64());
        assert!(record["end_time"].as_i64() <= record["closed_at"].as_i64());
    }

    let staging: Vec<_> = std::fs::read_dir(output.path().join(".staging"))
        .unwrap()
        .collect();
    assert!(staging.is_empty(), "no file is left in staging");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_thread_count_writes_each_item_once() {
    for threads in [1, 3] {
        let output = tempfile::tempdir().unwrap();
        let count = threads.to_string();
        let server = Server::start(output.path(), &["--http-threads", &count]);

        let client = reqwest::Client::new();
        let acknowledged = send_all_devices(&client, &server.url("")).await;
        assert_eq!(http_threads(server.pid()), threads, "threads named http-N");

        let (status, log) = server.interrupt_and_wait(EXIT_TIMEOUT);
        assert!(
            status.success(),
            "{threads} threads: exit status {status}; log:\n{log}"
        );
        let files = read_output_checked(output.path());
        assert_eq!(
            count_items(&files),
            acknowledged,
            "{threads} threads: every acknowledged item exactly once"
        );
    }
}

/// Returns how many threads of process `pid` are named `http-` and a number.
fn http_threads(pid: u32) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
        .filter(|name| {
            name.trim_end()
                .strip_prefix("http-")
                .is_some_and(|index| index.parse::<usize>().is_ok())
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_reads_back() {
    for codec in ["null", "deflate", "snappy", "zstandard"] {
        let output = tempfile::tempdir().unwrap();
        let server = Server::start(output.path(), &["--codec", codec]);
        let client = reqwest::Client::new();
        for device in 0..3 {
            let body = json!({"deviceId": format!("d{device}"),
                              "impressions": [{"impressionId": "i", "feature": "f"}]});
            let response = client
                .post(server.url("/v1/collect"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
        let (status, log) = server.interrupt_and_wait(EXIT_TIMEOUT);
        assert!(
            status.success(),
            "{codec}: exit status {status}; log:\n{log}"
        );

        let files = read_output_checked(output.path());
        assert_eq!(files.len(), 1, "{codec}");
        assert_eq!(files[0].codec, codec);
        assert_eq!(files[0].records.len(), 3, "{codec}");
    }
}

#[test]
fn invalid_configuration_exits_64() {
    let binary = env!("CARGO_BIN_EXE_impression-server");
    for args in [
        vec!["--session-timeout", "30"],
        vec!["--codec", "lz4"],
        vec!["--server-id", "a/b"],
        vec!["--output", "s3://Invalid_Bucket/prefix"],
    ] {
        let result = std::process::Command::new(binary)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(result.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error:"), "{args:?}: {stderr}");
    }
}

#[test]
fn unwritable_output_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_impression-server"))
        .args(["--listen", "127.0.0.1:0", "--server-id", "t", "--output"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(result.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("not writable"), "{stderr}");
}

/// At debug level each request has a span with its method and path, and tower-http logs its
/// response. At the default level the trace layer is left out and neither appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_traced_only_at_debug_level() {
    for (filter, traced) in [("debug", true), ("info", false)] {
        let output = tempfile::tempdir().unwrap();
        let server = Server::start_with_env(output.path(), &[], &[("RUST_LOG", filter)]);
        let response = reqwest::get(server.url("/readyz?writeKey=hidden-key"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let (status, log) = server.interrupt_and_wait(EXIT_TIMEOUT);
        assert!(status.success(), "exit status {status}; log:\n{log}");
        let responded = log.lines().any(|line| {
            line.contains("path=/readyz") && line.contains("finished processing request")
        });
        assert_eq!(responded, traced, "RUST_LOG={filter}; log:\n{log}");
        // The span names the path without the query, which may carry a write key.
        assert!(
            !log.contains("hidden-key"),
            "RUST_LOG={filter}; log:\n{log}"
        );
    }
}
