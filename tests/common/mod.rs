//! Shared helpers for the end-to-end tests: the real binary on 127.0.0.1 and two independent
//! Avro readers for what it wrote.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of these helpers"
)]

pub mod s3;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// How long the server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `impression-server` binary running as a child process.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts the binary on `127.0.0.1:0` writing to `output`, and waits until it listens.
    pub fn start(output: &Path, extra_args: &[&str]) -> Server {
        Server::start_named(output, "test-server", extra_args)
    }

    /// Starts the binary like [`Server::start`], with `server_id` as its `--server-id`.
    pub fn start_named(output: &Path, server_id: &str, extra_args: &[&str]) -> Server {
        Server::launch(output, server_id, extra_args, &[])
    }

    /// Starts the binary like [`Server::start`], with `env` added to its environment.
    pub fn start_with_env(output: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::launch(output, "test-server", extra_args, env)
    }

    fn launch(output: &Path, server_id: &str, extra_args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_impression-server"))
            .args(["--listen", "127.0.0.1:0", "--server-id", server_id])
            .arg("--output")
            .arg(output)
            .args(extra_args)
            .env("RUST_LOG", "info")
            // No test may reach a cloud metadata address, whatever its output.
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start impression-server");

        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let log_writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = listening_addr(&line) {
                    let _ = addr_tx.send(addr);
                }
                let mut log = log_writer.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });

        let addr = match addr_rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start listening; log:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        Server { child, addr, log }
    }

    /// Returns the URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the server.
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"));
        kill(pid, signal).expect("signal the server");
    }

    /// Sends SIGINT and waits for the process to exit.
    pub fn interrupt_and_wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        self.signal(Signal::SIGINT);
        self.wait(timeout)
    }

    /// Returns whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit, and returns its status and log.
    pub fn wait(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the server") {
                // Give the log thread a moment to read the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return (status, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Returns everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Returns the address in a `listening addr=...` log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("listening") {
        return None;
    }
    let start = line.find("addr=")? + "addr=".len();
    line[start..].split_whitespace().next()?.parse().ok()
}

/// One Avro file of the output, as a reader saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct AvroFile {
    /// Path relative to the output folder, which is the object key.
    pub key: String,
    pub codec: String,
    /// The writer schema embedded in the file.
    pub schema: Value,
    /// Records as JSON, times in milliseconds since the Unix epoch.
    pub records: Vec<Value>,
}

/// Reads every Avro file under `output/incoming-logs` with the `apache-avro` crate.
pub fn read_output_rust(output: &Path) -> Vec<AvroFile> {
    let mut paths = Vec::new();
    collect_avro_files(&output.join("incoming-logs"), &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let file = std::fs::File::open(&path).unwrap();
            let reader = apache_avro::Reader::new(file).unwrap();
            let schema: Value =
                serde_json::from_str(&reader.writer_schema().canonical_form()).unwrap();
            let codec = reader
                .user_metadata()
                .get("avro.codec")
                .map(|codec| String::from_utf8_lossy(codec).into_owned());
            let records = reader
                .map(|value| Value::try_from(value.unwrap()).unwrap())
                .collect();
            AvroFile {
                key: path
                    .strip_prefix(output)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                codec: codec.unwrap_or_default(),
                schema,
                records,
            }
        })
        .collect()
}

/// Reads every Avro file under `output/incoming-logs` with Python `fastavro`.
pub fn read_output_fastavro(output: &Path) -> Vec<AvroFile> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/read_avro.py");
    let result = Command::new("python3")
        .arg(script)
        .arg(output)
        .output()
        .expect("run python3 (fastavro must be installed)");
    assert!(
        result.status.success(),
        "fastavro reader failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let files: Vec<Value> = serde_json::from_slice(&result.stdout).unwrap();
    files
        .into_iter()
        .map(|file| AvroFile {
            key: file["key"].as_str().unwrap().to_owned(),
            codec: file["codec"].as_str().unwrap().to_owned(),
            schema: file["schema"].clone(),
            records: file["records"].as_array().unwrap().clone(),
        })
        .collect()
}

fn collect_avro_files(dir: &Path, paths: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_avro_files(&path, paths);
        } else if path.extension().is_some_and(|ext| ext == "avro") {
            paths.push(path);
        }
    }
}

/// Reads the output with both readers, checks they agree record for record and that every file
/// embeds the schema of `proto/session.avsc`, and returns the files.
pub fn read_output_checked(output: &Path) -> Vec<AvroFile> {
    let from_rust = read_output_rust(output);
    let from_python = read_output_fastavro(output);
    assert_eq!(
        from_rust.len(),
        from_python.len(),
        "both readers see the same files"
    );

    let published =
        apache_avro::Schema::parse_str(include_str!("../../proto/session.avsc")).unwrap();
    for (rust, python) in from_rust.iter().zip(&from_python) {
        assert_eq!(rust.key, python.key);
        assert_eq!(
            rust.records, python.records,
            "readers disagree on {}",
            rust.key
        );
        let embedded = apache_avro::Schema::parse(&python.schema).unwrap();
        assert_eq!(
            embedded.canonical_form(),
            published.canonical_form(),
            "schema of {}",
            rust.key
        );
        assert!(!rust.records.is_empty(), "{} is empty", rust.key);
    }
    from_python
}

/// Checks that every record lies in the partition of its `closed_at` hour.
pub fn assert_partitions(files: &[AvroFile]) {
    for file in files {
        for record in &file.records {
            let closed_at = record["closed_at"].as_i64().unwrap();
            let hour = chrono::DateTime::from_timestamp_millis(closed_at).unwrap();
            let partition = hour.format("incoming-logs/ds=%Y-%m-%d/hh=%H/").to_string();
            assert!(
                file.key.starts_with(&partition),
                "{} holds a session closed at {hour}",
                file.key
            );
        }
    }
}

/// Counts each impression and event id per session id: `(session_id, item_id) -> count`.
pub fn count_items(files: &[AvroFile]) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for record in files.iter().flat_map(|file| &file.records) {
        let session_id = record["session_id"].as_str().unwrap().to_owned();
        for impression in record["impressions"].as_array().unwrap() {
            let id = format!(
                "impression:{}",
                impression["impression_id"].as_str().unwrap()
            );
            *counts.entry((session_id.clone(), id)).or_insert(0) += 1;
        }
        for event in record["events"].as_array().unwrap() {
            let id = format!("event:{}", event["event_id"].as_str().unwrap());
            *counts.entry((session_id.clone(), id)).or_insert(0) += 1;
        }
    }
    counts
}
