//! The `healthcheck` subcommand: requests a running server's readiness endpoint, for
//! container health checks on images that have no shell tools.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Default URL the health check requests.
pub const DEFAULT_URL: &str = "http://127.0.0.1:3004/readyz";
/// Most bytes of the response that are read; the status line comes first.
const MAX_RESPONSE_BYTES: u64 = 4096;

/// A failed health check.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("invalid URL {0:?}: expected http://HOST:PORT/PATH")]
    InvalidUrl(String),
    #[error("failed to reach {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url} answered {status_line:?}")]
    NotReady { url: String, status_line: String },
}

/// Sends `GET` to `url` and succeeds when the server responds with status 200.
pub fn check(url: &str, timeout: Duration) -> Result<(), HealthError> {
    let invalid = || HealthError::InvalidUrl(url.to_owned());
    let rest = url.strip_prefix("http://").ok_or_else(invalid)?;
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(invalid());
    }
    let unreachable = |source| HealthError::Unreachable {
        url: url.to_owned(),
        source,
    };

    let addr = authority
        .to_socket_addrs()
        .map_err(unreachable)?
        .next()
        .ok_or_else(invalid)?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(unreachable)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(unreachable)?;

    let mut response = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut response)
        .map_err(unreachable)?;
    let status_line = String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    if status_line.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(HealthError::NotReady {
            url: url.to_owned(),
            status_line,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// Serves one response on 127.0.0.1 and returns the URL of `path` on it.
    fn serve_once(response: &'static str, path: &str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            stream.write_all(response.as_bytes()).unwrap();
        });
        format!("http://{addr}{path}")
    }

    #[test]
    fn ready_server_passes() {
        let url = serve_once(
            "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n",
            "/readyz",
        );
        assert!(check(&url, Duration::from_secs(5)).is_ok());
    }

    #[test]
    fn draining_server_fails() {
        let url = serve_once(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
            "/readyz",
        );
        let err = check(&url, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("503"), "{err}");
    }

    #[test]
    fn closed_port_fails() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/readyz", listener.local_addr().unwrap());
        drop(listener);
        assert!(matches!(
            check(&url, Duration::from_secs(5)),
            Err(HealthError::Unreachable { .. })
        ));
    }

    #[test]
    fn non_http_url_is_rejected() {
        assert!(matches!(
            check("https://127.0.0.1/", Duration::from_secs(1)),
            Err(HealthError::InvalidUrl(_))
        ));
        assert!(matches!(
            check("http:///readyz", Duration::from_secs(1)),
            Err(HealthError::InvalidUrl(_))
        ));
    }
}
