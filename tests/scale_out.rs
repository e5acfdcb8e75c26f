//! Scale-out: three instances behind nginx, configured with `deploy/nginx/impression-server.conf`,
//! which routes each device to one instance by its id. After SIGINT, every acknowledged item is
//! in the union of the three outputs exactly once, and each device's items are in one instance.
//!
//! Needs Debian's `nginx` (`apt-get install nginx`); the test fails when it is missing.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{AvroFile, Server, read_output_checked};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const INSTANCES: usize = 3;
/// Devices that send their id in the header or the query, which nginx hashes on.
const ROUTED_DEVICES: usize = 90;
/// Devices that send their id only in the body, which nginx cannot see.
const BODY_ONLY_DEVICES: usize = 4;
const BATCHES_PER_DEVICE: usize = 4;
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
const NGINX_START_TIMEOUT: Duration = Duration::from_secs(10);
const NGINX_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The configuration under test, shipped in the repository.
const NGINX_SITE: &str = include_str!("../deploy/nginx/impression-server.conf");

/// Acknowledged items: `(device id, "impression:<id>" or "event:<id>") -> 1`.
type Items = BTreeMap<(String, String), usize>;

/// nginx as a foreground child process, with its configuration, logs and pid file in a
/// temporary directory.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx on a free port of 127.0.0.1 in front of `upstreams`, and waits until it
    /// accepts connections.
    fn start(upstreams: &[SocketAddr]) -> Nginx {
        let binary = find_nginx();
        let dir = tempfile::tempdir().unwrap();
        let addr = free_local_addr();
        std::fs::write(dir.path().join("site.conf"), site_config(addr, upstreams)).unwrap();
        std::fs::write(dir.path().join("nginx.conf"), main_config(dir.path())).unwrap();

        let error_log = dir.path().join("error.log");
        let child = Command::new(&binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(&error_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("failed to start {}: {err}", binary.display()));
        let mut nginx = Nginx { child, addr, dir };

        let deadline = Instant::now() + NGINX_START_TIMEOUT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!(
                    "nginx exited with {status} at start; error log:\n{}",
                    nginx.error_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {addr} within {NGINX_START_TIMEOUT:?}; error log:\n{}",
                nginx.error_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    /// Stops nginx with SIGTERM (fast shutdown), and kills it if it does not exit in time.
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + NGINX_STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Returns the nginx binary: `$NGINX`, else `nginx` on `PATH`, else Debian's `/usr/sbin/nginx`
/// (`/usr/sbin` is often missing from a non-root user's `PATH`).
fn find_nginx() -> PathBuf {
    if let Some(path) = std::env::var_os("NGINX") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "NGINX={} is not a file", path.display());
        return path;
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nginx not found on PATH or in /usr/sbin: the scale-out test needs it \
                 (apt-get install nginx), or set NGINX to its path"
            )
        })
}

/// Returns a port on 127.0.0.1 that was free a moment ago.
fn free_local_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Returns the shipped site configuration with the test's listen address and upstreams in place
/// of the example ones.
fn site_config(listen: SocketAddr, upstreams: &[SocketAddr]) -> String {
    let mut lines = Vec::new();
    let mut replaced_servers = 0;
    let mut replaced_listen = 0;
    for line in NGINX_SITE.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("server 127.0.0.1:") {
            if replaced_servers == 0 {
                for upstream in upstreams {
                    lines.push(format!(
                        "    server {upstream} max_fails=1 fail_timeout=10s;"
                    ));
                }
            }
            replaced_servers += 1;
        } else if trimmed.starts_with("listen ") {
            lines.push(format!("    listen {listen};"));
            replaced_listen += 1;
        } else {
            lines.push(line.to_owned());
        }
    }
    assert_eq!(
        replaced_servers, 3,
        "the example lists three upstream servers"
    );
    assert_eq!(replaced_listen, 1, "the example has one listen line");
    lines.join("\n")
}

/// Returns an nginx.conf that keeps everything inside `dir` and runs in the foreground as one
/// process, which the test can stop by its pid.
fn main_config(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{
    worker_connections 256;
}}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/site.conf;
}}
"
    )
}

/// How a batch carries its device id.
#[derive(Clone, Copy)]
enum IdIn {
    Header,
    Query,
    HeaderAndBody,
    Body,
}

/// Sends one device's batches in order through nginx and returns the acknowledged items.
async fn send_device(
    client: reqwest::Client,
    base: String,
    device_id: String,
    body_only: bool,
) -> Items {
    let mut acknowledged = Items::new();
    for batch in 0..BATCHES_PER_DEVICE {
        let id_in = match (body_only, batch % 3) {
            (true, _) => IdIn::Body,
            (false, 0) => IdIn::Header,
            (false, 1) => IdIn::Query,
            (false, _) => IdIn::HeaderAndBody,
        };
        let impression_id = format!("{device_id}-i{batch}");
        let event_id = format!("{device_id}-e{batch}");
        let mut body = json!({
            "sessionKey": "tab-1",
            "impressions": [{"impressionId": impression_id, "feature": "RatingBox"}],
            "events": [{"eventId": event_id, "name": "Rating", "impressionId": impression_id}],
        });

        let collect = format!("{base}/v1/collect");
        let request = match id_in {
            IdIn::Header => client.post(&collect).header("x-device-id", &device_id),
            IdIn::Query => client.post(format!("{collect}?deviceId={device_id}")),
            IdIn::HeaderAndBody | IdIn::Body => {
                body["deviceId"] = json!(device_id);
                let request = client.post(&collect);
                if matches!(id_in, IdIn::HeaderAndBody) {
                    request.header("x-device-id", &device_id)
                } else {
                    request
                }
            }
        };
        let response = request
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{device_id} batch {batch}");
        let response: Value = response.json().await.unwrap();
        assert_eq!(
            response["accepted"],
            json!({"impressions": 1, "events": 1}),
            "{device_id} batch {batch}"
        );
        acknowledged.insert(
            (device_id.clone(), format!("impression:{impression_id}")),
            1,
        );
        acknowledged.insert((device_id.clone(), format!("event:{event_id}")), 1);
    }
    acknowledged
}

/// Counts each item of `files` per device, and adds the device to `instances_of_device`
/// under `server_id`.
fn collect_items(
    server_id: &str,
    files: &[AvroFile],
    items: &mut Items,
    instances_of_device: &mut BTreeMap<String, BTreeSet<String>>,
) {
    for file in files {
        let file_name = file.key.rsplit('/').next().unwrap();
        assert!(
            file_name.starts_with(&format!("{server_id}-")),
            "{} is named after its instance {server_id}",
            file.key
        );
        for record in &file.records {
            assert_eq!(record["server_id"], server_id, "{}", file.key);
            let device = record["device_id"].as_str().unwrap().to_owned();
            instances_of_device
                .entry(device.clone())
                .or_default()
                .insert(server_id.to_owned());
            for impression in record["impressions"].as_array().unwrap() {
                let id = impression["impression_id"].as_str().unwrap();
                *items
                    .entry((device.clone(), format!("impression:{id}")))
                    .or_insert(0) += 1;
            }
            for event in record["events"].as_array().unwrap() {
                let id = event["event_id"].as_str().unwrap();
                *items
                    .entry((device.clone(), format!("event:{id}")))
                    .or_insert(0) += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_stay_on_one_instance() {
    let outputs: Vec<tempfile::TempDir> = (0..INSTANCES)
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let server_ids: Vec<String> = (0..INSTANCES).map(|n| format!("edge-{n}")).collect();
    let mut servers: Vec<Server> = outputs
        .iter()
        .zip(&server_ids)
        .map(|(output, id)| Server::start_named(output.path(), id, &[]))
        .collect();
    let nginx = Nginx::start(&servers.iter().map(|s| s.addr).collect::<Vec<_>>());

    // Every device sends its batches in order, as a browser tab does, and devices run concurrently.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let routed = (0..ROUTED_DEVICES).map(|n| (format!("device-{n}"), false));
    let body_only = (0..BODY_ONLY_DEVICES).map(|n| (format!("body-only-{n}"), true));
    let tasks: Vec<_> = routed
        .chain(body_only)
        .map(|(device_id, body_only)| {
            tokio::spawn(send_device(
                client.clone(),
                nginx.url(""),
                device_id,
                body_only,
            ))
        })
        .collect();
    let mut acknowledged = Items::new();
    for task in tasks {
        acknowledged.extend(task.await.unwrap());
    }

    // SIGINT to all instances at once, as when a deployment stops them together.
    for server in &servers {
        server.signal(Signal::SIGINT);
    }
    for (server, id) in servers.iter_mut().zip(&server_ids) {
        let (status, log) = server.wait(EXIT_TIMEOUT);
        assert!(status.success(), "{id}: exit status {status}; log:\n{log}");
    }
    drop(nginx);

    let mut written = Items::new();
    let mut instances_of_device = BTreeMap::new();
    for (output, id) in outputs.iter().zip(&server_ids) {
        let files = read_output_checked(output.path());
        collect_items(id, &files, &mut written, &mut instances_of_device);
    }

    assert_eq!(
        written, acknowledged,
        "every acknowledged item is in the union of the outputs exactly once"
    );
    for n in 0..ROUTED_DEVICES {
        let device = format!("device-{n}");
        assert_eq!(
            instances_of_device[&device].len(),
            1,
            "{device} is whole in one instance, but is in {:?}",
            instances_of_device[&device]
        );
    }
    let used: BTreeSet<&String> = (0..ROUTED_DEVICES)
        .flat_map(|n| &instances_of_device[&format!("device-{n}")])
        .collect();
    assert_eq!(
        used.len(),
        INSTANCES,
        "the hash spreads devices over every instance"
    );

    // nginx does not read bodies, so it spreads the batches of a device whose id is only in the
    // body round robin, and the device's visit is split over instances.
    let split = (0..BODY_ONLY_DEVICES)
        .filter(|n| instances_of_device[&format!("body-only-{n}")].len() > 1)
        .count();
    assert!(
        split > 0,
        "body-only devices are spread: {instances_of_device:?}"
    );
}
