//! The HTTP API against its contract, `proto/openapi.yaml`: the spec's examples are accepted,
//! and schemathesis finds no server error and no response that breaks the spec.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Server, read_output_checked};
use serde_json::Value;

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time budget of the schemathesis run, in seconds.
const FUZZ_SECONDS: &str = "60";

fn spec() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/openapi.yaml");
    serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_examples_are_accepted() {
    let spec = spec();
    let examples = spec["paths"]["/v1/collect"]["post"]["requestBody"]["content"]["application/json"]["examples"]
        .as_object()
        .unwrap()
        .clone();
    assert!(examples.len() >= 3, "the spec has request examples");

    let output = tempfile::tempdir().unwrap();
    let server = Server::start(output.path(), &[]);
    let client = reqwest::Client::new();
    for (name, example) in &examples {
        let response = client
            .post(server.url("/v1/collect"))
            .json(&example["value"])
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "example {name}: {body}");
    }

    let (status, log) = server.interrupt_and_wait(EXIT_TIMEOUT);
    assert!(status.success(), "exit status {status}; log:\n{log}");
    let files = read_output_checked(output.path());
    assert_eq!(
        files.iter().map(|file| file.records.len()).sum::<usize>(),
        1,
        "one device, one session"
    );
}

#[test]
fn schemathesis_finds_no_failures() {
    let output = tempfile::tempdir().unwrap();
    let server = Server::start(output.path(), &[]);
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/openapi.yaml");
    let reports = tempfile::tempdir().unwrap();

    let result = Command::new("schemathesis")
        .arg("run")
        .arg(&spec)
        .args(["--url", &server.url("")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,negative_data_rejection,\
             unsupported_method",
        ])
        .args([
            "--max-time",
            FUZZ_SECONDS,
            "--max-examples",
            "100",
            "--workers",
            "2",
        ])
        .args([
            "--request-timeout",
            "10",
            "--seed",
            "20261204",
            "--no-color",
        ])
        .arg("--report-dir")
        .arg(reports.path())
        // schemathesis and hypothesis keep caches in the working directory; keep them out of
        // the checkout.
        .current_dir(reports.path())
        .output()
        .expect("run schemathesis (pip install -r tests/support/requirements.txt)");
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&result.stderr)
    );

    // Nothing the fuzzer sent crashed the server or kept it from shutting down cleanly.
    let (status, log) = server.interrupt_and_wait(EXIT_TIMEOUT);
    assert!(status.success(), "exit status {status}; log:\n{log}");
    read_output_checked(output.path());
}
