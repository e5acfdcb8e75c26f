//! Helpers for the S3 output tests: an S3 server on a local directory (`s3s-fs`) on
//! 127.0.0.1 that can inject `503 SlowDown` responses, the server binary started against it
//! with the harness of `mod.rs`, and traffic from many devices.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{AvroFile, Server, count_items};

pub const ACCESS_KEY: &str = "test-access-key";
pub const SECRET_KEY: &str = "test-secret-key";
pub const REGION: &str = "us-east-1";
pub const BUCKET: &str = "impressions";
pub const PREFIX: &str = "edge";

/// Maximum wait for the start check of the server.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Requests the S3 server received, and the faults it injects.
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

/// Returns `503 SlowDown` while faults are due, and passes the request to S3 otherwise.
/// `s3s-fs` creates a missing bucket's folder on upload, so requests to a bucket without a
/// folder in `root` get `404 NoSuchBucket` here, as from S3.
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

/// Starts the server with an S3 output at `store`, a spool in `spool` and `extra` flags, with
/// the test credentials, and waits until its start check passed.
pub fn start_server(store: &S3Server, spool: &Path, extra: &[&str]) -> Server {
    let server = start_server_at(&store.endpoint(), BUCKET, spool, extra, SECRET_KEY);
    wait_until(READY_TIMEOUT, "the server to be ready", || {
        server.log().contains(" ready ")
    });
    server
}

/// Starts the server like [`start_server`], with any endpoint, bucket and secret key.
pub fn start_server_at(
    endpoint: &str,
    bucket: &str,
    spool: &Path,
    extra: &[&str],
    secret: &str,
) -> Server {
    // Empty AWS config files, so no profile of the machine applies. With the metadata
    // service disabled, the credential chain never contacts a metadata address.
    let aws_config = spool.with_extension("aws-config");
    std::fs::write(&aws_config, "").unwrap();
    let aws_config = aws_config.to_str().unwrap();
    let mut args = vec![
        "--s3-endpoint",
        endpoint,
        "--s3-force-path-style",
        "--spool-dir",
        spool.to_str().unwrap(),
        "--s3-check-timeout",
        "5s",
    ];
    args.extend(extra);
    let output = format!("s3://{bucket}/{PREFIX}");
    Server::start_with_env(
        Path::new(&output),
        &args,
        &[
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("AWS_REGION", REGION),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", aws_config),
            ("AWS_SHARED_CREDENTIALS_FILE", aws_config),
        ],
    )
}

/// Returns the resident memory of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

/// Item ids in the form of [`count_items`]: `impression:ID` and `event:ID`.
pub type ItemIds = Vec<String>;

/// Posts `batches` batches from each of `devices` devices and returns the ids accepted with
/// `200`. Each batch has three impressions, with about `padding_bytes` of arguments, and two
/// events.
pub async fn post_traffic(
    server: &str,
    tag: &str,
    devices: usize,
    batches: usize,
    padding_bytes: usize,
) -> ItemIds {
    let client = reqwest::Client::new();
    let url = format!("{server}/v1/collect");
    let mut tasks = tokio::task::JoinSet::new();
    for device in 0..devices {
        let client = client.clone();
        let url = url.clone();
        let tag = tag.to_owned();
        tasks.spawn(async move {
            let mut accepted = Vec::new();
            for batch in 0..batches {
                let (body, ids) = batch_body(&tag, device, batch, padding_bytes);
                let Ok(response) = client.post(&url).json(&body).send().await else {
                    continue;
                };
                if response.status() == 200 {
                    accepted.extend(ids);
                }
            }
            accepted
        });
    }
    let mut accepted = Vec::new();
    while let Some(ids) = tasks.join_next().await {
        accepted.extend(ids.unwrap());
    }
    accepted
}

fn batch_body(
    tag: &str,
    device: usize,
    batch: usize,
    padding_bytes: usize,
) -> (serde_json::Value, ItemIds) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Varied text, so that compression does not shrink the padding away.
    let padding: String = (0..padding_bytes)
        .map(|i| char::from(b'a' + ((i * 7 + device * 13 + batch * 31) % 26) as u8))
        .collect();
    let mut ids = Vec::new();
    let impressions: Vec<_> = (0..3)
        .map(|n| {
            let id = format!("{tag}-d{device}-b{batch}-i{n}");
            ids.push(format!("impression:{id}"));
            serde_json::json!({
                "impressionId": id, "feature": "RatingBox", "time": now_ms,
                "args": { "padding": padding }, "variants": ["cta-test:B"]
            })
        })
        .collect();
    let events: Vec<_> = (0..2)
        .map(|n| {
            let id = format!("{tag}-d{device}-b{batch}-e{n}");
            ids.push(format!("event:{id}"));
            serde_json::json!({ "eventId": id, "name": "Rating", "time": now_ms, "fields": { "stars": n } })
        })
        .collect();
    let body = serde_json::json!({
        "deviceId": format!("{tag}-device-{device}"),
        "sentAt": now_ms,
        "impressions": impressions,
        "events": events,
    });
    (body, ids)
}

/// Returns every item id in `files`, sorted, after checking that none appears twice.
pub fn item_ids(files: &[AvroFile]) -> ItemIds {
    let counts = count_items(files);
    let repeated: Vec<_> = counts.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        repeated.is_empty(),
        "items stored more than once: {repeated:?}"
    );
    let mut ids: ItemIds = counts.into_keys().map(|(_, id)| id).collect();
    ids.sort();
    ids
}

/// Counts the complete files waiting in a spool directory. Files may be uploaded and removed
/// while it looks, so a file that vanished is not counted.
pub fn spooled_files(spool: &Path) -> usize {
    let mut count = 0;
    let mut pending = vec![spool.join("incoming-logs")];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "avro") {
                count += 1;
            }
        }
    }
    count
}

/// Waits until `done` returns true, checking every 100 ms for at most `limit`.
pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
