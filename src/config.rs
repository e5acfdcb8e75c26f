//! The server's configuration: one `clap` struct, every flag also an environment variable.
//!
//! `--help` is the configuration reference. Values are checked once, at start, by
//! [`ServeConfig::validate`].

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::limits::{self, BatchLimits};

/// Default address the HTTP server listens on.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:3004";
/// Default output: a local directory with the same key layout as the S3 output.
pub const DEFAULT_OUTPUT: &str = "./data";
/// Default inactivity after which a session closes.
pub const DEFAULT_SESSION_TIMEOUT: &str = "30m";
/// Default longest session; a longer one continues as a linked session.
pub const DEFAULT_MAX_SESSION_DURATION: &str = "24h";
/// Default longest time a partition file stays open before it is finished and uploaded.
pub const DEFAULT_UPLOAD_INTERVAL: &str = "1h";
/// Default size at which a partition file is finished and uploaded (64 MiB).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Default time in-flight requests get to finish after a shutdown signal.
pub const DEFAULT_DRAIN_TIMEOUT: &str = "10s";
/// Default time the final write and upload get after the requests have drained.
pub const DEFAULT_SHUTDOWN_TIMEOUT: &str = "60s";
/// Default largest request body (1 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default largest body after gzip decompression (4 MiB).
pub const DEFAULT_MAX_DECOMPRESSED_BYTES: usize = 4 * 1024 * 1024;
/// Default time a client gets to send its request head.
pub const DEFAULT_HEADER_READ_TIMEOUT: &str = "10s";
/// Default time a client gets to send its request body.
pub const DEFAULT_BODY_READ_TIMEOUT: &str = "10s";
/// Default directory where files wait for their upload to an S3 output.
pub const DEFAULT_SPOOL_DIR: &str = "./spool";
/// Default size from which a file is uploaded in parts (16 MiB).
pub const DEFAULT_MULTIPART_THRESHOLD_BYTES: u64 = 16 * 1024 * 1024;
/// Default number of files uploaded at the same time.
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 4;
/// Default time the test write to an S3 output gets at start.
pub const DEFAULT_S3_CHECK_TIMEOUT: &str = "20s";

/// Smallest accepted `--max-file-bytes`: below it every session would get its own file.
const MIN_FILE_BYTES: u64 = 4 * 1024;
/// Smallest accepted `--max-json-depth`: a batch with items and their maps.
const MIN_JSON_DEPTH: usize = limits::BATCH_DEPTH;
/// Longest accepted `--server-id`; it becomes part of every object key.
const MAX_SERVER_ID_CHARS: usize = 64;
/// Smallest accepted `--s3-multipart-threshold-bytes`: S3 rejects parts below 5 MiB, except
/// the last one.
const MIN_MULTIPART_THRESHOLD_BYTES: u64 = 5 * 1024 * 1024;
/// Largest accepted `--upload-concurrency`.
const MAX_UPLOAD_CONCURRENCY: usize = 64;
/// Maximum number of threads that serve HTTP connections.
const MAX_HTTP_THREADS: usize = 1024;

/// Collects impressions and events into visitor sessions and writes them as hourly Avro files.
#[derive(Debug, Parser)]
#[command(
    name = "impression-server",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Flags of `serve`, which runs when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeConfig,
}

/// The binary's subcommands.
#[derive(Debug, Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start, never moved in a loop"
)]
pub enum Command {
    /// Run the HTTP server (the default).
    Serve(ServeConfig),
    /// Exit 0 when a running server reports ready, 1 otherwise; for container health checks.
    Healthcheck(HealthcheckArgs),
}

/// Flags of `healthcheck`.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthcheckArgs {
    /// URL of the server's readiness endpoint.
    #[arg(long, env = "IMPRESSION_SERVER_HEALTHCHECK_URL", default_value = crate::healthcheck::DEFAULT_URL)]
    pub url: String,

    /// Time to wait for the response.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
}

impl Cli {
    /// Returns the subcommand to run; `serve` when none is given.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(self.serve))
    }
}

/// Everything `serve` needs, parsed from flags and `IMPRESSION_SERVER_*` variables.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Address and port to listen on.
    #[arg(long, env = "IMPRESSION_SERVER_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Output for finished files: `s3://bucket/prefix`, or a local directory.
    #[arg(long, env = "IMPRESSION_SERVER_OUTPUT", default_value = DEFAULT_OUTPUT)]
    pub output: String,

    /// Directory where finished files wait until their upload to an S3 output succeeded.
    #[arg(long, env = "IMPRESSION_SERVER_SPOOL_DIR", default_value = DEFAULT_SPOOL_DIR)]
    pub spool_dir: PathBuf,

    /// S3 endpoint URL, for S3-compatible stores, such as `http://127.0.0.1:3900`
    /// [default: the AWS endpoint of the region].
    #[arg(long, env = "IMPRESSION_SERVER_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// AWS region of the bucket [default: from the AWS environment and profile].
    #[arg(long, env = "IMPRESSION_SERVER_S3_REGION")]
    pub s3_region: Option<String>,

    /// Address the bucket in the URL path instead of the host name, as most S3-compatible
    /// stores require.
    #[arg(long, env = "IMPRESSION_SERVER_S3_FORCE_PATH_STYLE")]
    pub s3_force_path_style: bool,

    /// Checksum sent with every upload, so that the store verifies the bytes it received.
    #[arg(long, env = "IMPRESSION_SERVER_S3_CHECKSUM", value_enum, default_value_t = ChecksumMode::Crc32c)]
    pub s3_checksum: ChecksumMode,

    /// File size in bytes from which a file is uploaded in parts of this size.
    #[arg(long, env = "IMPRESSION_SERVER_S3_MULTIPART_THRESHOLD_BYTES", default_value_t = DEFAULT_MULTIPART_THRESHOLD_BYTES)]
    pub s3_multipart_threshold_bytes: u64,

    /// Time the test write to the S3 output gets at start, credential lookup included.
    #[arg(long, env = "IMPRESSION_SERVER_S3_CHECK_TIMEOUT", default_value = DEFAULT_S3_CHECK_TIMEOUT, value_parser = parse_duration)]
    pub s3_check_timeout: Duration,

    /// Number of files uploaded at the same time.
    #[arg(long, env = "IMPRESSION_SERVER_UPLOAD_CONCURRENCY", default_value_t = DEFAULT_UPLOAD_CONCURRENCY)]
    pub upload_concurrency: usize,

    /// Inactivity after which a session closes, such as `30m` or `90s`.
    #[arg(long, env = "IMPRESSION_SERVER_SESSION_TIMEOUT", default_value = DEFAULT_SESSION_TIMEOUT, value_parser = parse_duration)]
    pub session_timeout: Duration,

    /// Maximum session duration; a longer session is cut and continues as a linked session.
    #[arg(long, env = "IMPRESSION_SERVER_MAX_SESSION_DURATION", default_value = DEFAULT_MAX_SESSION_DURATION, value_parser = parse_duration)]
    pub max_session_duration: Duration,

    /// Impressions plus events at which a session is cut and continues as a linked session.
    #[arg(long, env = "IMPRESSION_SERVER_MAX_SESSION_ITEMS", default_value_t = crate::session::DEFAULT_MAX_SESSION_ITEMS)]
    pub max_session_items: usize,

    /// Maximum time a partition file stays open before it is finished and uploaded.
    #[arg(long, env = "IMPRESSION_SERVER_UPLOAD_INTERVAL", default_value = DEFAULT_UPLOAD_INTERVAL, value_parser = parse_duration)]
    pub upload_interval: Duration,

    /// Size in bytes at which a partition file is finished and uploaded.
    #[arg(long, env = "IMPRESSION_SERVER_MAX_FILE_BYTES", default_value_t = DEFAULT_MAX_FILE_BYTES)]
    pub max_file_bytes: u64,

    /// Compression codec of the Avro files.
    #[arg(long, env = "IMPRESSION_SERVER_CODEC", value_enum, default_value_t = CodecName::Snappy)]
    pub codec: CodecName,

    /// Name of this instance in object keys and records [default: the host name].
    #[arg(long, env = "IMPRESSION_SERVER_SERVER_ID")]
    pub server_id: Option<String>,

    /// Time in-flight requests get to finish after a shutdown signal.
    #[arg(long, env = "IMPRESSION_SERVER_DRAIN_TIMEOUT", default_value = DEFAULT_DRAIN_TIMEOUT, value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Time the final write and upload get after the requests have drained.
    #[arg(long, env = "IMPRESSION_SERVER_SHUTDOWN_TIMEOUT", default_value = DEFAULT_SHUTDOWN_TIMEOUT, value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Maximum request body in bytes; a larger body is rejected with 413.
    #[arg(long, env = "IMPRESSION_SERVER_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Maximum body in bytes after gzip decompression; a larger body is rejected with 413.
    #[arg(long, env = "IMPRESSION_SERVER_MAX_DECOMPRESSED_BYTES", default_value_t = DEFAULT_MAX_DECOMPRESSED_BYTES)]
    pub max_decompressed_bytes: usize,

    /// Maximum number of impressions, and of events, in one batch.
    #[arg(long, env = "IMPRESSION_SERVER_MAX_BATCH_ITEMS", default_value_t = limits::DEFAULT_MAX_BATCH_ITEMS)]
    pub max_batch_items: usize,

    /// Maximum length in bytes of any string in a batch, map keys included.
    #[arg(long, env = "IMPRESSION_SERVER_MAX_STRING_BYTES", default_value_t = limits::DEFAULT_MAX_STRING_BYTES)]
    pub max_string_bytes: usize,

    /// Maximum number of keys in one `args`, `outputs` or `fields` object, and of variants.
    #[arg(long, env = "IMPRESSION_SERVER_MAX_MAP_KEYS", default_value_t = limits::DEFAULT_MAX_MAP_KEYS)]
    pub max_map_keys: usize,

    /// Maximum nesting of arrays and objects in a body; the batch itself uses 4 levels.
    #[arg(long, env = "IMPRESSION_SERVER_MAX_JSON_DEPTH", default_value_t = limits::DEFAULT_MAX_JSON_DEPTH)]
    pub max_json_depth: usize,

    /// Threads that serve HTTP connections. By default, one per available CPU core.
    #[arg(long, env = "IMPRESSION_SERVER_HTTP_THREADS")]
    pub http_threads: Option<usize>,

    /// Time a client gets to send its request head before the connection is closed.
    #[arg(long, env = "IMPRESSION_SERVER_HEADER_READ_TIMEOUT", default_value = DEFAULT_HEADER_READ_TIMEOUT, value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Time a client gets to send its request body before the request is rejected with 408.
    #[arg(long, env = "IMPRESSION_SERVER_BODY_READ_TIMEOUT", default_value = DEFAULT_BODY_READ_TIMEOUT, value_parser = parse_duration)]
    pub body_read_timeout: Duration,

    /// Write keys, separated by commas, one of which every batch must carry; none means no key
    /// is needed.
    #[arg(
        long,
        env = "IMPRESSION_SERVER_WRITE_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub write_keys: Vec<WriteKey>,

    /// Origins allowed to post from a browser, separated by commas, or `*` for any origin.
    #[arg(
        long,
        env = "IMPRESSION_SERVER_CORS_ORIGINS",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub cors_origins: Vec<String>,

    /// Proxies whose X-Forwarded-For header is trusted: addresses or CIDR ranges, separated by
    /// commas. Without it, the client address is the connection's peer address.
    #[arg(long, env = "IMPRESSION_SERVER_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_ip_net)]
    pub trusted_proxies: Vec<IpNet>,

    /// How much of the client address is stored.
    #[arg(long, env = "IMPRESSION_SERVER_IP_MODE", value_enum, default_value_t = IpMode::Full)]
    pub ip_mode: IpMode,

    /// Format of the log lines on standard error.
    #[arg(long, env = "IMPRESSION_SERVER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Format of the log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// A write key; its `Debug` form hides the value so that it never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct WriteKey(pub String);

impl std::fmt::Debug for WriteKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("WriteKey(<hidden>)")
    }
}

impl std::str::FromStr for WriteKey {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let key = text.trim();
        if key.is_empty() {
            return Err("a write key must not be empty".to_owned());
        }
        if !key.chars().all(|c| c.is_ascii_graphic()) {
            return Err("a write key may contain only visible ASCII characters".to_owned());
        }
        Ok(WriteKey(key.to_owned()))
    }
}

/// How much of the client address is stored in the `ip_address` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IpMode {
    /// The whole address.
    Full,
    /// The network only: IPv4 to /24, IPv6 to /48.
    Truncate,
    /// No address.
    None,
}

/// The origins allowed to post from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    Any,
    List(Vec<String>),
}

/// The Avro codecs a file can be written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CodecName {
    Null,
    Deflate,
    Snappy,
    Zstandard,
}

/// The checksums an upload can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ChecksumMode {
    /// CRC32C of the body, computed before the upload and checked by the store.
    Crc32c,
    /// No checksum beyond what the transport does.
    None,
}

/// A configuration that parses but cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid --{flag}: {problem}")]
    Invalid { flag: &'static str, problem: String },
}

/// A checked configuration: the output resolved and the server id chosen.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub output: Output,
    pub upload_concurrency: usize,
    pub session_timeout: Duration,
    pub max_session_duration: Duration,
    pub max_session_items: usize,
    pub upload_interval: Duration,
    pub max_file_bytes: u64,
    pub codec: CodecName,
    pub server_id: String,
    pub drain_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_decompressed_bytes: usize,
    pub limits: BatchLimits,
    pub http_threads: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub write_keys: Vec<WriteKey>,
    pub cors_origins: CorsOrigins,
    pub trusted_proxies: Vec<IpNet>,
    pub ip_mode: IpMode,
    pub log_format: LogFormat,
}

/// Destination of finished files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A local directory with the same key layout as the S3 output.
    Local {
        dir: PathBuf,
    },
    S3(S3Settings),
}

/// An S3 bucket output and its client settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; empty for the bucket root.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
    pub checksum: ChecksumMode,
    pub spool_dir: PathBuf,
    pub multipart_threshold_bytes: u64,
    pub check_timeout: Duration,
}

// === impl ServeConfig ===

impl ServeConfig {
    /// Checks every value and resolves the defaults that depend on the machine.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let invalid = |flag, problem: &str| ConfigError::Invalid {
            flag,
            problem: problem.to_owned(),
        };

        let output = self.parse_output()?;
        for (flag, value) in [
            ("session-timeout", self.session_timeout),
            ("max-session-duration", self.max_session_duration),
            ("upload-interval", self.upload_interval),
        ] {
            if value < Duration::from_secs(1) {
                return Err(invalid(flag, "must be at least 1s"));
            }
        }
        if self.max_session_duration < self.session_timeout {
            return Err(invalid(
                "max-session-duration",
                "must not be shorter than --session-timeout",
            ));
        }
        if self.max_file_bytes < MIN_FILE_BYTES {
            return Err(invalid("max-file-bytes", "must be at least 4096"));
        }
        for (flag, value) in [
            ("max-body-bytes", self.max_body_bytes),
            ("max-decompressed-bytes", self.max_decompressed_bytes),
            ("max-batch-items", self.max_batch_items),
            ("max-string-bytes", self.max_string_bytes),
            ("max-map-keys", self.max_map_keys),
            ("max-session-items", self.max_session_items),
        ] {
            if value == 0 {
                return Err(invalid(flag, "must be greater than 0"));
            }
        }
        if self.max_json_depth < MIN_JSON_DEPTH {
            return Err(invalid(
                "max-json-depth",
                "must be at least 4, the depth of a batch itself",
            ));
        }
        for (flag, value) in [
            ("header-read-timeout", self.header_read_timeout),
            ("body-read-timeout", self.body_read_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(flag, "must be greater than 0"));
            }
        }
        let cors_origins = parse_cors_origins(&self.cors_origins)
            .map_err(|problem| invalid("cors-origins", &problem))?;
        if self.upload_concurrency == 0 || self.upload_concurrency > MAX_UPLOAD_CONCURRENCY {
            return Err(invalid("upload-concurrency", "must be 1 to 64"));
        }
        let http_threads = self.http_threads.unwrap_or_else(available_cores);
        if http_threads == 0 || http_threads > MAX_HTTP_THREADS {
            return Err(invalid("http-threads", "must be 1 to 1024"));
        }

        let server_id = match self.server_id {
            Some(id) => id,
            None => default_server_id(),
        };
        check_server_id(&server_id).map_err(|problem| invalid("server-id", problem))?;

        Ok(Settings {
            listen: self.listen,
            output,
            upload_concurrency: self.upload_concurrency,
            session_timeout: self.session_timeout,
            max_session_duration: self.max_session_duration,
            max_session_items: self.max_session_items,
            upload_interval: self.upload_interval,
            max_file_bytes: self.max_file_bytes,
            codec: self.codec,
            server_id,
            drain_timeout: self.drain_timeout,
            shutdown_timeout: self.shutdown_timeout,
            max_body_bytes: self.max_body_bytes,
            max_decompressed_bytes: self.max_decompressed_bytes,
            limits: BatchLimits {
                max_items: self.max_batch_items,
                max_string_bytes: self.max_string_bytes,
                max_map_keys: self.max_map_keys,
                max_json_depth: self.max_json_depth,
            },
            http_threads,
            header_read_timeout: self.header_read_timeout,
            body_read_timeout: self.body_read_timeout,
            write_keys: self.write_keys,
            cors_origins,
            trusted_proxies: self.trusted_proxies,
            ip_mode: self.ip_mode,
            log_format: self.log_format,
        })
    }
}

// === impl ServeConfig, output ===

impl ServeConfig {
    /// Resolves `--output` and, for an S3 output, checks the flags that go with it.
    fn parse_output(&self) -> Result<Output, ConfigError> {
        let invalid = |flag, problem: String| ConfigError::Invalid { flag, problem };

        let Some(location) = self.output.strip_prefix("s3://") else {
            if self.output.contains("://") {
                return Err(invalid(
                    "output",
                    format!(
                        "{} is not supported, expected s3://bucket/prefix or a local directory",
                        self.output
                    ),
                ));
            }
            if self.output.is_empty() {
                return Err(invalid("output", "must not be empty".to_owned()));
            }
            return Ok(Output::Local {
                dir: PathBuf::from(&self.output),
            });
        };

        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        check_bucket_name(bucket).map_err(|problem| {
            invalid(
                "output",
                format!("invalid bucket name {bucket:?}: {problem}"),
            )
        })?;
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|part| part == "." || part == "..") {
            return Err(invalid(
                "output",
                format!("prefix {prefix:?} must not contain . or .. segments"),
            ));
        }
        if let Some(endpoint) = &self.s3_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(invalid(
                "s3-endpoint",
                format!("{endpoint} must start with http:// or https://"),
            ));
        }
        if self.s3_multipart_threshold_bytes < MIN_MULTIPART_THRESHOLD_BYTES {
            return Err(invalid(
                "s3-multipart-threshold-bytes",
                format!("must be at least {MIN_MULTIPART_THRESHOLD_BYTES} (5 MiB)"),
            ));
        }
        if self.s3_check_timeout < Duration::from_secs(1) {
            return Err(invalid(
                "s3-check-timeout",
                "must be at least 1s".to_owned(),
            ));
        }
        if self.spool_dir.as_os_str().is_empty() {
            return Err(invalid("spool-dir", "must not be empty".to_owned()));
        }

        Ok(Output::S3(S3Settings {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            force_path_style: self.s3_force_path_style,
            checksum: self.s3_checksum,
            spool_dir: self.spool_dir.clone(),
            multipart_threshold_bytes: self.s3_multipart_threshold_bytes,
            check_timeout: self.s3_check_timeout,
        }))
    }
}

/// Parses a duration written like `30m`, `90s` or `1h 30m`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|err| format!("{err}; expected a duration like 30m or 90s"))
}

/// Parses an address or CIDR range; a bare address is a range of one.
fn parse_ip_net(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net);
    }
    text.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
        format!("invalid address or CIDR range {text:?}; expected e.g. 10.0.0.5 or 10.0.0.0/8")
    })
}

/// Checks the CORS origins: `*` alone, or a list of `http://` or `https://` origins.
fn parse_cors_origins(origins: &[String]) -> Result<CorsOrigins, String> {
    let origins: Vec<&str> = origins
        .iter()
        .map(|origin| origin.trim())
        .filter(|o| !o.is_empty())
        .collect();
    if origins.is_empty() {
        return Err("give at least one origin, or * for any".to_owned());
    }
    if origins.contains(&"*") {
        if origins.len() > 1 {
            return Err("* allows any origin and cannot be combined with others".to_owned());
        }
        return Ok(CorsOrigins::Any);
    }
    for origin in &origins {
        let scheme_ok = origin.starts_with("http://") || origin.starts_with("https://");
        let path_free = origin.splitn(4, '/').nth(3).is_none();
        if !scheme_ok || !path_free || origin.ends_with('/') {
            return Err(format!(
                "invalid origin {origin:?}; expected a scheme and host such as https://shop.example"
            ));
        }
    }
    Ok(CorsOrigins::List(
        origins.into_iter().map(str::to_owned).collect(),
    ))
}

/// Returns the number of CPU cores this process may run on, or 1 when it cannot be read.
fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// Returns the host name, or `impression-server` when it is not a valid server id.
fn default_server_id() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    if check_server_id(&host).is_ok() {
        host
    } else {
        "impression-server".to_owned()
    }
}

/// Checks that a server id is safe as part of an object key.
fn check_server_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > MAX_SERVER_ID_CHARS {
        return Err("must be 1 to 64 characters");
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !id.chars().all(allowed) || id.starts_with('.') {
        return Err(
            "may contain only letters, digits, '-', '_' and '.', and must not start with '.'",
        );
    }
    Ok(())
}

/// Checks a bucket name against the S3 naming rules that matter for addressing it.
fn check_bucket_name(name: &str) -> Result<(), &'static str> {
    if name.len() < 3 || name.len() > 63 {
        return Err("must be 3 to 63 characters");
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.');
    if !name.chars().all(allowed) {
        return Err("may contain only lowercase letters, digits, '-' and '.'");
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !edge_ok(name.chars().next()) || !edge_ok(name.chars().last()) {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let cli =
            Cli::try_parse_from(std::iter::once("impression-server").chain(args.iter().copied()))
                .map_err(|err| err.to_string())?;
        match cli.into_command() {
            Command::Serve(config) => config.validate().map_err(|err| err.to_string()),
            Command::Healthcheck(args) => Err(format!("healthcheck {}", args.url)),
        }
    }

    #[test]
    fn defaults_apply_without_flags() {
        let settings = parse(&["--server-id", "a"]).unwrap();
        assert_eq!(settings.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(settings.session_timeout, Duration::from_secs(30 * 60));
        assert_eq!(
            settings.max_session_duration,
            Duration::from_secs(24 * 3600)
        );
        assert_eq!(settings.upload_interval, Duration::from_secs(3600));
        assert_eq!(settings.codec, CodecName::Snappy);
        assert_eq!(settings.max_body_bytes, 1024 * 1024);
        assert_eq!(
            settings.output,
            Output::Local {
                dir: PathBuf::from("./data")
            }
        );
        assert_eq!(settings.upload_concurrency, 4);
    }

    #[test]
    fn serve_subcommand_takes_same_flags() {
        let settings = parse(&["serve", "--session-timeout", "90s", "--server-id", "a"]).unwrap();
        assert_eq!(settings.session_timeout, Duration::from_secs(90));
    }

    #[test]
    fn durations_reject_bare_numbers() {
        let err = parse(&["--session-timeout", "30"]).unwrap_err();
        assert!(err.contains("--session-timeout"), "{err}");
    }

    #[test]
    fn s3_output_takes_bucket_and_prefix() {
        let settings = parse(&[
            "--output",
            "s3://logs-bucket/edge/eu/",
            "--s3-endpoint",
            "http://127.0.0.1:9000",
            "--s3-force-path-style",
            "--server-id",
            "a",
        ])
        .unwrap();
        let Output::S3(s3) = settings.output else {
            panic!("expected an S3 output, got {:?}", settings.output);
        };
        assert_eq!(s3.bucket, "logs-bucket");
        assert_eq!(s3.prefix, "edge/eu");
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(s3.force_path_style);
        assert_eq!(s3.checksum, ChecksumMode::Crc32c);
        assert_eq!(s3.spool_dir, PathBuf::from("./spool"));
        assert_eq!(s3.multipart_threshold_bytes, 16 * 1024 * 1024);
        assert_eq!(s3.check_timeout, Duration::from_secs(20));
    }

    #[test]
    fn s3_output_without_prefix() {
        let settings = parse(&["--output", "s3://logs-bucket", "--server-id", "a"]).unwrap();
        let Output::S3(s3) = settings.output else {
            panic!("expected an S3 output");
        };
        assert_eq!(s3.bucket, "logs-bucket");
        assert_eq!(s3.prefix, "");
    }

    #[test]
    fn s3_output_rejects_bad_values() {
        let cases: &[(&[&str], &str)] = &[
            (&["--output", "s3://"], "--output"),
            (&["--output", "s3://Bad_Bucket/p"], "--output"),
            (&["--output", "s3://ab/p"], "--output"),
            (&["--output", "s3://bucket/a/../b"], "--output"),
            (&["--output", "gs://bucket/p"], "--output"),
            (
                &["--output", "s3://bucket", "--s3-endpoint", "127.0.0.1:9000"],
                "--s3-endpoint",
            ),
            (
                &[
                    "--output",
                    "s3://bucket",
                    "--s3-multipart-threshold-bytes",
                    "1024",
                ],
                "--s3-multipart-threshold-bytes",
            ),
            (&["--upload-concurrency", "0"], "--upload-concurrency"),
        ];
        for (args, flag) in cases {
            let mut args = args.to_vec();
            args.extend(["--server-id", "a"]);
            let err = parse(&args).unwrap_err();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
    }

    #[test]
    fn s3_checksum_accepts_none() {
        let settings = parse(&[
            "--output",
            "s3://bucket",
            "--s3-checksum",
            "none",
            "--server-id",
            "a",
        ])
        .unwrap();
        let Output::S3(s3) = settings.output else {
            panic!("expected an S3 output");
        };
        assert_eq!(s3.checksum, ChecksumMode::None);
    }

    #[test]
    fn server_id_must_be_key_safe() {
        let err = parse(&["--server-id", "a/b"]).unwrap_err();
        assert!(err.contains("--server-id"), "{err}");
        assert!(parse(&["--server-id", ".hidden"]).is_err());
        assert!(parse(&["--server-id", "edge-1.eu_west"]).is_ok());
    }

    #[test]
    fn intake_flags_parse() {
        let settings = parse(&[
            "--server-id",
            "a",
            "--write-keys",
            "k1,k2",
            "--cors-origins",
            "https://shop.example,http://localhost:8080",
            "--trusted-proxies",
            "10.0.0.0/8,192.0.2.7",
            "--ip-mode",
            "truncate",
        ])
        .unwrap();
        assert_eq!(
            settings.write_keys,
            vec![WriteKey("k1".into()), WriteKey("k2".into())]
        );
        assert_eq!(
            settings.cors_origins,
            CorsOrigins::List(vec![
                "https://shop.example".into(),
                "http://localhost:8080".into()
            ])
        );
        assert_eq!(settings.trusted_proxies.len(), 2);
        assert_eq!(settings.ip_mode, IpMode::Truncate);
        assert_eq!(
            parse(&["--server-id", "a"]).unwrap().cors_origins,
            CorsOrigins::Any
        );
    }

    #[test]
    fn write_key_is_hidden_in_debug() {
        let settings = parse(&["--server-id", "a", "--write-keys", "s3cret"]).unwrap();
        assert!(!format!("{settings:?}").contains("s3cret"));
    }

    #[test]
    fn http_threads_default_to_available_cores() {
        let settings = parse(&["--server-id", "a"]).unwrap();
        assert_eq!(settings.http_threads, available_cores());
        let settings = parse(&["--server-id", "a", "--http-threads", "3"]).unwrap();
        assert_eq!(settings.http_threads, 3);
    }

    #[test]
    fn http_threads_out_of_range_are_rejected() {
        for count in ["0", "1025", "-1", "two"] {
            let flag = format!("--http-threads={count}");
            let err = parse(&["--server-id", "a", &flag]).unwrap_err();
            assert!(err.contains("--http-threads"), "{count}: {err}");
        }
    }

    #[test]
    fn invalid_intake_flags_are_rejected() {
        for (args, flag) in [
            (
                &["--cors-origins", "*,https://a.example"][..],
                "--cors-origins",
            ),
            (&["--cors-origins", "shop.example"][..], "--cors-origins"),
            (
                &["--cors-origins", "https://a.example/path"][..],
                "--cors-origins",
            ),
            (
                &["--trusted-proxies", "proxy.internal"][..],
                "--trusted-proxies",
            ),
            (&["--max-json-depth", "3"][..], "--max-json-depth"),
            (&["--max-batch-items", "0"][..], "--max-batch-items"),
            (&["--write-keys", ""][..], "--write-keys"),
        ] {
            let mut all = vec!["--server-id", "a"];
            all.extend_from_slice(args);
            let err = parse(&all).unwrap_err();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
    }

    #[test]
    fn max_duration_not_below_timeout() {
        let err = parse(&[
            "--session-timeout",
            "2h",
            "--max-session-duration",
            "1h",
            "--server-id",
            "a",
        ])
        .unwrap_err();
        assert!(err.contains("--max-session-duration"), "{err}");
    }
}
