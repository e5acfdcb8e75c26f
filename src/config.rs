//! The server's configuration: one `clap` struct, every flag also an environment variable.
//!
//! `--help` is the configuration reference. Values are checked once, at start, by
//! [`ServeConfig::validate`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

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

/// Smallest accepted `--max-file-bytes`: below it every session would get its own file.
const MIN_FILE_BYTES: u64 = 4 * 1024;
/// Longest accepted `--server-id`; it becomes part of every object key.
const MAX_SERVER_ID_CHARS: usize = 64;

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
pub enum Command {
    /// Run the HTTP server (the default).
    Serve(ServeConfig),
}

impl Cli {
    /// Returns the configuration of `serve`, given explicitly or by default.
    pub fn into_serve_config(self) -> ServeConfig {
        match self.command {
            Some(Command::Serve(config)) => config,
            None => self.serve,
        }
    }
}

/// Everything `serve` needs, parsed from flags and `IMPRESSION_SERVER_*` variables.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Address and port to listen on.
    #[arg(long, env = "IMPRESSION_SERVER_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Output directory for finished files (S3 output is not available yet).
    #[arg(long, env = "IMPRESSION_SERVER_OUTPUT", default_value = DEFAULT_OUTPUT)]
    pub output: String,

    /// Inactivity after which a session closes, such as `30m` or `90s`.
    #[arg(long, env = "IMPRESSION_SERVER_SESSION_TIMEOUT", default_value = DEFAULT_SESSION_TIMEOUT, value_parser = parse_duration)]
    pub session_timeout: Duration,

    /// Maximum session duration; a longer session is cut and continues as a linked session.
    #[arg(long, env = "IMPRESSION_SERVER_MAX_SESSION_DURATION", default_value = DEFAULT_MAX_SESSION_DURATION, value_parser = parse_duration)]
    pub max_session_duration: Duration,

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
}

/// The Avro codecs a file can be written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CodecName {
    Null,
    Deflate,
    Snappy,
    Zstandard,
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
    pub output_dir: PathBuf,
    pub session_timeout: Duration,
    pub max_session_duration: Duration,
    pub upload_interval: Duration,
    pub max_file_bytes: u64,
    pub codec: CodecName,
    pub server_id: String,
    pub drain_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub max_body_bytes: usize,
}

// === impl ServeConfig ===

impl ServeConfig {
    /// Checks every value and resolves the defaults that depend on the machine.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let invalid = |flag, problem: &str| ConfigError::Invalid {
            flag,
            problem: problem.to_owned(),
        };

        if self.output.starts_with("s3://") {
            return Err(invalid(
                "output",
                "S3 output is not available yet, use a local directory",
            ));
        }
        if self.output.contains("://") {
            return Err(invalid("output", "expected a local directory path"));
        }
        if self.output.is_empty() {
            return Err(invalid("output", "must not be empty"));
        }
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
        if self.max_body_bytes == 0 {
            return Err(invalid("max-body-bytes", "must be greater than 0"));
        }

        let server_id = match self.server_id {
            Some(id) => id,
            None => default_server_id(),
        };
        check_server_id(&server_id).map_err(|problem| invalid("server-id", problem))?;

        Ok(Settings {
            listen: self.listen,
            output_dir: PathBuf::from(self.output),
            session_timeout: self.session_timeout,
            max_session_duration: self.max_session_duration,
            upload_interval: self.upload_interval,
            max_file_bytes: self.max_file_bytes,
            codec: self.codec,
            server_id,
            drain_timeout: self.drain_timeout,
            shutdown_timeout: self.shutdown_timeout,
            max_body_bytes: self.max_body_bytes,
        })
    }
}

/// Parses a duration written like `30m`, `90s` or `1h 30m`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|err| format!("{err}; expected a duration like 30m or 90s"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let cli =
            Cli::try_parse_from(std::iter::once("impression-server").chain(args.iter().copied()))
                .map_err(|err| err.to_string())?;
        cli.into_serve_config()
            .validate()
            .map_err(|err| err.to_string())
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
        assert_eq!(settings.output_dir, PathBuf::from("./data"));
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
    fn s3_output_is_rejected_for_now() {
        let err = parse(&["--output", "s3://bucket/prefix", "--server-id", "a"]).unwrap_err();
        assert!(err.contains("--output"), "{err}");
    }

    #[test]
    fn server_id_must_be_key_safe() {
        let err = parse(&["--server-id", "a/b"]).unwrap_err();
        assert!(err.contains("--server-id"), "{err}");
        assert!(parse(&["--server-id", ".hidden"]).is_err());
        assert!(parse(&["--server-id", "edge-1.eu_west"]).is_ok());
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
