//! Helpers for the S3 output tests: an S3 server on a local directory (`s3s-fs`) on
//! 127.0.0.1 that can inject `503 SlowDown` responses, the server binary run against it, traffic
//! from many devices, and readers of what the bucket stores.
#![allow(
    clippy::unwrap_used,
    reason = "a helper that fails panics, which fails the test with the cause"
)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

pub const ACCESS_KEY: &str = "test-access-key";
pub const SECRET_KEY: &str = "test-secret-key";
pub const REGION: &str = "us-east-1";
pub const BUCKET: &str = "impressions";
pub const PREFIX: &str = "edge";

/// Time a child server gets to start or to exit before the test fails.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);

/// What the S3 server was asked to do, and the faults it injects.
#[derive(Debug, Default)]
pub struct Faults {
    /// Number of coming `PUT` requests that get `503 SlowDown`.
    pub slow_down_puts: AtomicU32,
    /// Number of `PUT` requests that got `503 SlowDown` so far.
    pub slowed_down: AtomicU32,
    /// The checksum and encoding headers of every `PUT` request.
    pub put_headers: Mutex<Vec<PutHeaders>>,
}

/// The headers of a `PUT` that show how its body was sent.
#[derive(Debug, Clone)]
pub struct PutHeaders {
    pub query: String,
    pub checksum_crc32c: Option<String>,
    pub content_encoding: Option<String>,
}

/// An `s3s-fs` server on 127.0.0.1, on a runtime of its own so that stopping it closes every
/// connection, as a crashed store would.
pub struct S3Server {
    /// Taken when the server stops; a runtime cannot be dropped inside the test's runtime,
    /// so it is shut down on a thread of its own.
    runtime: Option<tokio::runtime::Runtime>,
    pub addr: SocketAddr,
    pub faults: Arc<Faults>,
}

impl S3Server {
    /// Starts a server on a free port with the bucket [`BUCKET`] in `root`.
    pub fn start(root: &Path) -> Self {
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        Self::start_on(root, 0, Arc::new(Faults::default()))
    }

    /// Starts a server on `port`, such as the port of a server that was stopped.
    pub fn start_on(root: &Path, port: u16, faults: Arc<Faults>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let root = Arc::new(root.to_owned());

        let mut builder =
            s3s::service::S3ServiceBuilder::new(s3s_fs::FileSystem::new(root.as_ref()).unwrap());
        builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let s3 = builder.build();
        let service_faults = faults.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s3 = s3.clone();
                let faults = service_faults.clone();
                let root = root.clone();
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let s3 = s3.clone();
                    let faults = faults.clone();
                    let root = root.clone();
                    async move { answer(&s3, &faults, &root, request).await }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });

        Self {
            runtime: Some(runtime),
            addr,
            faults,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server and closes its connections; returns its port.
    pub fn stop(mut self) -> u16 {
        self.shut_down();
        self.addr.port()
    }

    fn shut_down(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            std::thread::spawn(move || runtime.shutdown_timeout(Duration::from_secs(1)))
                .join()
                .unwrap();
        }
    }

    /// Downloads every object below [`PREFIX`] into `dest`, under its key; returns the keys.
    pub fn download_all(&self, dest: &Path) -> Vec<String> {
        let endpoint = self.endpoint();
        let dest = dest.to_owned();
        let handle = self.runtime.as_ref().unwrap().handle().clone();
        let download = async move {
            let client = client(&endpoint);
            let listed = client
                .list_objects_v2()
                .bucket(BUCKET)
                .prefix(format!("{PREFIX}/"))
                .max_keys(1000)
                .send()
                .await
                .unwrap();
            assert!(
                !listed.is_truncated().unwrap_or(false),
                "more than 1000 objects"
            );
            let mut keys = Vec::new();
            for object in listed.contents() {
                let key = object.key().unwrap().to_owned();
                let got = client
                    .get_object()
                    .bucket(BUCKET)
                    .key(&key)
                    .send()
                    .await
                    .unwrap();
                let bytes = got.body.collect().await.unwrap().into_bytes();
                let path = dest.join(&key);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &bytes).unwrap();
                keys.push(key);
            }
            keys
        };
        std::thread::spawn(move || handle.block_on(download))
            .join()
            .unwrap()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Answers `503 SlowDown` while faults are due, and passes the request to S3 otherwise.
/// `s3s-fs` creates a missing bucket's folder on upload, so requests to a bucket without a
/// folder in `root` are answered `404 NoSuchBucket` here, as S3 does.
async fn answer(
    s3: &s3s::service::S3Service,
    faults: &Faults,
    root: &Path,
    request: Request<Incoming>,
) -> Result<Response<s3s::Body>, s3s::HttpError> {
    let bucket = request
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("");
    if !bucket.is_empty() && !root.join(bucket).is_dir() {
        return Ok(error_response(
            404,
            "NoSuchBucket",
            "The specified bucket does not exist",
        ));
    }
    if request.method() == Method::PUT {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        faults.put_headers.lock().unwrap().push(PutHeaders {
            query: request.uri().query().unwrap_or("").to_owned(),
            checksum_crc32c: header("x-amz-checksum-crc32c"),
            content_encoding: header("content-encoding"),
        });
        let due = faults
            .slow_down_puts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if due {
            faults.slowed_down.fetch_add(1, Ordering::SeqCst);
            return Ok(error_response(
                503,
                "SlowDown",
                "Please reduce your request rate.",
            ));
        }
    }
    hyper::service::Service::call(s3, request).await
}

fn error_response(status: u16, code: &str, message: &str) -> Response<s3s::Body> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
         <Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(s3s::Body::from(body))
        .unwrap()
}

/// Builds an S3 client for the test server.
fn client(endpoint: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new(REGION))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            ACCESS_KEY, SECRET_KEY, None, None, "test",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// Returns the arguments that point the server at `endpoint` with a spool in `spool`,
/// followed by `extra`.
pub fn s3_args(endpoint: &str, spool: &Path, extra: &[&str]) -> Vec<String> {
    [
        "--listen",
        "127.0.0.1:0",
        "--server-id",
        "edge-1",
        "--output",
        &format!("s3://{BUCKET}/{PREFIX}"),
        "--s3-endpoint",
        endpoint,
        "--s3-force-path-style",
        "--spool-dir",
        spool.to_str().unwrap(),
        "--s3-check-timeout",
        "5s",
    ]
    .iter()
    .chain(extra)
    .map(|arg| (*arg).to_owned())
    .collect()
}

/// A running `impression-server` child process and the log lines it printed.
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// Starts the binary with `args` and the test credentials, and waits until it is ready.
    pub fn start(args: &[String]) -> Self {
        Self::start_with_secret(args, SECRET_KEY)
    }

    pub fn start_with_secret(args: &[String], secret: &str) -> Self {
        let (child, log) = spawn(args, secret);
        let mut server = Self {
            child,
            addr: "127.0.0.1:0".parse().unwrap(),
            log,
        };
        let started = Instant::now();
        loop {
            let lines = server.log();
            let addr = lines
                .iter()
                .find_map(|line| line.split("listening addr=").nth(1))
                .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap());
            if let Some(addr) = addr
                && lines.iter().any(|line| line.contains(" ready "))
            {
                server.addr = addr;
                return server;
            }
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!(
                    "server exited with {status} before it was ready:\n{}",
                    lines.join("\n")
                );
            }
            assert!(
                started.elapsed() < PROCESS_TIMEOUT,
                "server not ready:\n{}",
                lines.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Returns the resident memory of the process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Sends SIGINT and waits for the exit; returns the status and every log line.
    pub fn interrupt(mut self) -> (ExitStatus, Vec<String>) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let status = wait_bounded(&mut self.child, &self.log);
        (status, self.log())
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// Runs the binary with `args` until it exits by itself; returns the status and the log.
pub fn run_to_exit(args: &[String], secret: &str) -> (ExitStatus, Vec<String>) {
    let (mut child, log) = spawn(args, secret);
    let status = wait_bounded(&mut child, &log);
    let lines = log.lock().unwrap().clone();
    (status, lines)
}

fn spawn(args: &[String], secret: &str) -> (Child, Arc<Mutex<Vec<String>>>) {
    // A clean environment, so no AWS profile or IMPRESSION_SERVER_* variable of the machine
    // applies, and the credential chain never contacts a metadata address.
    let mut child = Command::new(env!("CARGO_BIN_EXE_impression-server"))
        .args(args)
        .env_clear()
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_REGION", REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("HOME", "/nonexistent")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    (child, log)
}

fn wait_bounded(child: &mut Child, log: &Arc<Mutex<Vec<String>>>) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            // Let the reader thread take the last lines.
            std::thread::sleep(Duration::from_millis(100));
            return status;
        }
        if started.elapsed() > PROCESS_TIMEOUT {
            child.kill().unwrap();
            panic!("server did not exit:\n{}", log.lock().unwrap().join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The ids of the impressions and events that the server answered `200` for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Items {
    pub impressions: Vec<String>,
    pub events: Vec<String>,
}

impl Items {
    pub fn sorted(mut self) -> Self {
        self.impressions.sort();
        self.events.sort();
        self
    }

    pub fn extend(&mut self, other: Items) {
        self.impressions.extend(other.impressions);
        self.events.extend(other.events);
    }
}

/// Posts `batches` batches from each of `devices` devices, each with three impressions of
/// about `padding_bytes` of arguments and two events; returns what was accepted.
pub async fn post_traffic(
    server: &str,
    tag: &str,
    devices: usize,
    batches: usize,
    padding_bytes: usize,
) -> Items {
    let client = reqwest::Client::new();
    let url = format!("{server}/v1/collect");
    let mut tasks = tokio::task::JoinSet::new();
    for device in 0..devices {
        let client = client.clone();
        let url = url.clone();
        let tag = tag.to_owned();
        tasks.spawn(async move {
            let mut accepted = Items::default();
            for batch in 0..batches {
                let body = batch_body(&tag, device, batch, padding_bytes);
                let Ok(response) = client.post(&url).json(&body.0).send().await else {
                    continue;
                };
                if response.status() == 200 {
                    accepted.extend(body.1);
                }
            }
            accepted
        });
    }
    let mut accepted = Items::default();
    while let Some(items) = tasks.join_next().await {
        accepted.extend(items.unwrap());
    }
    accepted
}

fn batch_body(
    tag: &str,
    device: usize,
    batch: usize,
    padding_bytes: usize,
) -> (serde_json::Value, Items) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Varied text, so that compression does not shrink the padding away.
    let padding: String = (0..padding_bytes)
        .map(|i| char::from(b'a' + ((i * 7 + device * 13 + batch * 31) % 26) as u8))
        .collect();
    let mut items = Items::default();
    let impressions: Vec<_> = (0..3)
        .map(|n| {
            let id = format!("{tag}-d{device}-b{batch}-i{n}");
            items.impressions.push(id.clone());
            serde_json::json!({
                "impressionId": id, "feature": "RatingBox", "time": now_ms,
                "args": { "padding": padding }, "variants": ["cta-test:B"]
            })
        })
        .collect();
    let events: Vec<_> = (0..2)
        .map(|n| {
            let id = format!("{tag}-d{device}-b{batch}-e{n}");
            items.events.push(id.clone());
            serde_json::json!({ "eventId": id, "name": "Rating", "time": now_ms, "fields": { "stars": n } })
        })
        .collect();
    let body = serde_json::json!({
        "deviceId": format!("{tag}-device-{device}"),
        "sentAt": now_ms,
        "impressions": impressions,
        "events": events,
    });
    (body, items)
}

/// Reads every `.avro` file below `dir` with `apache-avro`; checks that each record's
/// `closed_at` lies in the hour that the file's `ds=`/`hh=` folders name.
pub fn read_items_rust(dir: &Path) -> Items {
    let mut items = Items::default();
    for path in avro_files(dir) {
        let partition = partition_of(&path);
        let reader = apache_avro::Reader::new(std::fs::File::open(&path).unwrap()).unwrap();
        for record in reader {
            let Value::Record(fields) = record.unwrap() else {
                panic!("not a record in {}", path.display());
            };
            let fields: BTreeMap<String, Value> = fields.into_iter().collect();
            let Value::TimestampMillis(closed_at) = fields["closed_at"] else {
                panic!("closed_at is not timestamp-millis");
            };
            let hour = chrono::DateTime::from_timestamp_millis(closed_at).unwrap();
            assert_eq!(
                hour.format("ds=%Y-%m-%d/hh=%H").to_string(),
                partition,
                "record in the wrong partition: {}",
                path.display()
            );
            items
                .impressions
                .extend(ids(&fields["impressions"], "impression_id"));
            items.events.extend(ids(&fields["events"], "event_id"));
        }
    }
    items
}

/// Reads every `.avro` file below `dir` with Python `fastavro`, with the same partition check.
pub fn read_items_python(dir: &Path) -> Items {
    const SCRIPT: &str = r#"
import json, pathlib, sys, fastavro
impressions, events = [], []
for path in sorted(pathlib.Path(sys.argv[1]).rglob("*.avro")):
    partition = "/".join(path.parts[-3:-1])
    with open(path, "rb") as f:
        for record in fastavro.reader(f):
            expected = record["closed_at"].strftime("ds=%Y-%m-%d/hh=%H")
            if expected != partition:
                sys.exit(f"record in the wrong partition: {path}")
            impressions += [i["impression_id"] for i in record["impressions"]]
            events += [e["event_id"] for e in record["events"]]
print(json.dumps({"impressions": impressions, "events": events}))
"#;
    let output = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "fastavro failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let strings = |name: &str| -> Vec<String> {
        parsed[name]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_str().unwrap().to_owned())
            .collect()
    };
    Items {
        impressions: strings("impressions"),
        events: strings("events"),
    }
}

/// Returns the complete files waiting in a spool directory.
pub fn spooled_files(spool: &Path) -> Vec<PathBuf> {
    avro_files(&spool.join("incoming-logs"))
}

fn avro_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "avro") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn partition_of(path: &Path) -> String {
    let parts: Vec<_> = path
        .iter()
        .rev()
        .skip(1)
        .take(2)
        .map(|part| part.to_str().unwrap())
        .collect();
    format!("{}/{}", parts[1], parts[0])
}

fn ids(items: &Value, field: &str) -> Vec<String> {
    let Value::Array(items) = items else {
        panic!("{field}: not an array");
    };
    items
        .iter()
        .map(|item| {
            let Value::Record(fields) = item else {
                panic!("{field}: not a record");
            };
            match fields.iter().find(|(name, _)| name == field) {
                Some((_, Value::String(id))) => id.clone(),
                other => panic!("{field}: unexpected {other:?}"),
            }
        })
        .collect()
}

/// Waits until `done` returns true, checking every 100 ms for at most `limit`.
pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
