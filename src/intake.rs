//! Request checks before the body is parsed: the write key and the body's encoding, size and
//! read time. Also the client address to store.

use std::io::Read;
use std::net::IpAddr;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, header};
use flate2::read::MultiGzDecoder;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use ipnet::IpNet;
use subtle::ConstantTimeEq;

use crate::api::ApiError;
use crate::config::{CorsOrigins, IpMode, Settings, WriteKey};
use crate::limits::BatchLimits;

/// Header a client can send its write key in.
pub const WRITE_KEY_HEADER: HeaderName = HeaderName::from_static("x-write-key");
/// Query parameter a client can send its write key in; beacons cannot set headers.
pub const WRITE_KEY_PARAM: &str = "writeKey";
/// Query parameter a client can send its device id in; beacons cannot set headers.
pub const DEVICE_ID_PARAM: &str = "deviceId";
/// Prefix length an IPv4 address is cut to with `--ip-mode truncate`.
const TRUNCATED_IPV4_PREFIX: u8 = 24;
/// Prefix length an IPv6 address is cut to with `--ip-mode truncate`.
const TRUNCATED_IPV6_PREFIX: u8 = 48;

/// The intake rules, from the configuration.
#[derive(Debug, Clone)]
pub struct Intake {
    pub max_body_bytes: usize,
    pub max_decompressed_bytes: usize,
    pub body_read_timeout: Duration,
    pub limits: BatchLimits,
    pub write_keys: Vec<WriteKey>,
    pub cors_origins: CorsOrigins,
    pub trusted_proxies: Vec<IpNet>,
    pub ip_mode: IpMode,
}

/// The query parameters the collector reads.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct QueryParams {
    pub device_id: Option<String>,
    pub write_key: Option<String>,
}

/// A body encoding the server decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
}

// === impl Intake ===

impl Intake {
    /// Takes the intake rules from checked settings.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            max_body_bytes: settings.max_body_bytes,
            max_decompressed_bytes: settings.max_decompressed_bytes,
            body_read_timeout: settings.body_read_timeout,
            limits: settings.limits,
            write_keys: settings.write_keys.clone(),
            cors_origins: settings.cors_origins.clone(),
            trusted_proxies: settings.trusted_proxies.clone(),
            ip_mode: settings.ip_mode,
        }
    }

    /// Checks the request's write key when write keys are configured.
    pub fn check_write_key(
        &self,
        headers: &HeaderMap,
        query: &QueryParams,
    ) -> Result<(), ApiError> {
        if self.write_keys.is_empty() {
            return Ok(());
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim());
        let header_key = headers
            .get(&WRITE_KEY_HEADER)
            .and_then(|value| value.to_str().ok());
        let candidates = [bearer, header_key, query.write_key.as_deref()];

        let mut presented = candidates.into_iter().flatten().peekable();
        if presented.peek().is_none() {
            return Err(ApiError::MissingWriteKey);
        }
        // Every configured key is compared in full, so timing does not tell which one is close.
        let matched = presented.fold(false, |matched, candidate| {
            self.write_keys.iter().fold(matched, |matched, key| {
                matched | bool::from(key.0.as_bytes().ct_eq(candidate.as_bytes()))
            })
        });
        if matched {
            Ok(())
        } else {
            Err(ApiError::InvalidWriteKey)
        }
    }

    /// Reads the whole body within the size and time limits and decodes it.
    pub async fn read_body(&self, body: Body, headers: &HeaderMap) -> Result<Bytes, ApiError> {
        let encoding = body_encoding(headers)?;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max_body_bytes as u64) {
            return Err(ApiError::BodyTooLarge {
                limit_bytes: self.max_body_bytes,
            });
        }

        let read = Limited::new(body, self.max_body_bytes).collect();
        let bytes = match tokio::time::timeout(self.body_read_timeout, read).await {
            Err(_) => return Err(ApiError::BodyReadTimeout),
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(err)) if err.is::<LengthLimitError>() => {
                return Err(ApiError::BodyTooLarge {
                    limit_bytes: self.max_body_bytes,
                });
            }
            Ok(Err(_)) => return Err(ApiError::BodyRead),
        };

        match encoding {
            Encoding::Identity => Ok(bytes),
            Encoding::Gzip => gunzip(&bytes, self.max_decompressed_bytes).map(Bytes::from),
        }
    }

    /// Returns the client address to store: the peer, or the first untrusted hop of
    /// `X-Forwarded-For` when the peer is a trusted proxy, cut to the `--ip-mode` setting.
    pub fn client_address(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer?;
        let client = if self.is_trusted(peer) {
            self.forwarded_client(headers).unwrap_or(peer)
        } else {
            peer
        };
        match self.ip_mode {
            IpMode::Full => Some(client),
            IpMode::Truncate => Some(truncate(client)),
            IpMode::None => None,
        }
    }

    fn is_trusted(&self, address: IpAddr) -> bool {
        self.trusted_proxies
            .iter()
            .any(|net| net.contains(&address))
    }

    /// Walks `X-Forwarded-For` from the nearest hop back, skipping trusted proxies.
    fn forwarded_client(&self, headers: &HeaderMap) -> Option<IpAddr> {
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        let mut earliest_trusted = None;
        for hop in hops.iter().rev() {
            // An unreadable hop could be forged, so nothing before it is believed.
            let address = hop
                .parse::<IpAddr>()
                .or_else(|_| hop.parse::<std::net::SocketAddr>().map(|addr| addr.ip()))
                .ok()?;
            if !self.is_trusted(address) {
                return Some(address);
            }
            earliest_trusted = Some(address);
        }
        earliest_trusted
    }
}

/// Reads the `deviceId` and `writeKey` query parameters.
pub fn query_params(query: Option<&str>) -> QueryParams {
    let mut params = QueryParams::default();
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*name {
            DEVICE_ID_PARAM if params.device_id.is_none() => {
                params.device_id = Some(value.into_owned())
            }
            WRITE_KEY_PARAM if params.write_key.is_none() => {
                params.write_key = Some(value.into_owned())
            }
            _ => {}
        }
    }
    params
}

/// Returns the body's encoding, rejecting any the server does not decode.
fn body_encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    let mut encoding = Encoding::Identity;
    for value in headers.get_all(header::CONTENT_ENCODING) {
        for name in String::from_utf8_lossy(value.as_bytes()).split(',') {
            let name = name.trim().to_ascii_lowercase();
            match name.as_str() {
                "" | "identity" => {}
                "gzip" | "x-gzip" if encoding == Encoding::Identity => encoding = Encoding::Gzip,
                _ => return Err(ApiError::UnsupportedEncoding { encoding: name }),
            }
        }
    }
    Ok(encoding)
}

/// Decompresses a gzip body, stopping as soon as it passes `limit_bytes`.
fn gunzip(compressed: &[u8], limit_bytes: usize) -> Result<Vec<u8>, ApiError> {
    let mut decoded = Vec::with_capacity(compressed.len().saturating_mul(4).min(limit_bytes));
    let cap = u64::try_from(limit_bytes)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    MultiGzDecoder::new(compressed)
        .take(cap)
        .read_to_end(&mut decoded)
        .map_err(|_| ApiError::InvalidGzip)?;
    if decoded.len() > limit_bytes {
        return Err(ApiError::DecompressedTooLarge { limit_bytes });
    }
    Ok(decoded)
}

/// Cuts an address to its network: IPv4 to /24, IPv6 to /48.
fn truncate(address: IpAddr) -> IpAddr {
    let prefix = match address {
        IpAddr::V4(_) => TRUNCATED_IPV4_PREFIX,
        IpAddr::V6(_) => TRUNCATED_IPV6_PREFIX,
    };
    IpNet::new(address, prefix).map_or(address, |net| net.network())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use axum::http::HeaderValue;
    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    fn intake() -> Intake {
        Intake {
            max_body_bytes: 1024,
            max_decompressed_bytes: 4096,
            body_read_timeout: Duration::from_secs(5),
            limits: BatchLimits::default(),
            write_keys: Vec::new(),
            cors_origins: CorsOrigins::Any,
            trusted_proxies: Vec::new(),
            ip_mode: IpMode::Full,
        }
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::try_from(*name).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    #[tokio::test]
    async fn gzip_body_is_decoded() {
        let body = gzip(br#"{"deviceId": "d"}"#);
        let bytes = intake()
            .read_body(Body::from(body), &headers(&[("content-encoding", "gzip")]))
            .await
            .unwrap();
        assert_eq!(&bytes[..], br#"{"deviceId": "d"}"#);
    }

    #[tokio::test]
    async fn gzip_bomb_stops_at_limit() {
        // 1 MiB of zeros compresses to about 1 KiB.
        let bomb = gzip(&vec![0; 1024 * 1024]);
        assert!(bomb.len() < 1024 * 1024 / 100);
        let mut intake = intake();
        intake.max_body_bytes = bomb.len();
        let err = intake
            .read_body(Body::from(bomb), &headers(&[("content-encoding", "gzip")]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ApiError::DecompressedTooLarge { limit_bytes: 4096 }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn corrupt_gzip_is_rejected() {
        let mut body = gzip(b"{}");
        body.truncate(body.len() - 6);
        let err = intake()
            .read_body(Body::from(body), &headers(&[("content-encoding", "gzip")]))
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::InvalidGzip), "{err:?}");
    }

    #[tokio::test]
    async fn unknown_or_stacked_encoding_is_rejected() {
        for encoding in ["br", "deflate", "gzip, gzip", "zstd"] {
            let err = intake()
                .read_body(
                    Body::from("{}"),
                    &headers(&[("content-encoding", encoding)]),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(err, ApiError::UnsupportedEncoding { .. }),
                "{encoding}: {err:?}"
            );
        }
    }

    #[test]
    fn write_key_from_any_source() {
        let mut intake = intake();
        intake.write_keys = vec![WriteKey("k-1".into()), WriteKey("k-2".into())];
        let none = QueryParams::default();
        assert!(
            intake
                .check_write_key(&headers(&[("authorization", "Bearer k-2")]), &none)
                .is_ok()
        );
        assert!(
            intake
                .check_write_key(&headers(&[("x-write-key", "k-1")]), &none)
                .is_ok()
        );
        let query = query_params(Some("deviceId=d&writeKey=k-1"));
        assert!(intake.check_write_key(&HeaderMap::new(), &query).is_ok());

        let err = intake
            .check_write_key(&HeaderMap::new(), &none)
            .unwrap_err();
        assert!(matches!(err, ApiError::MissingWriteKey));
        let err = intake
            .check_write_key(&headers(&[("x-write-key", "k-3")]), &none)
            .unwrap_err();
        assert!(matches!(err, ApiError::InvalidWriteKey));
        let err = intake
            .check_write_key(&headers(&[("authorization", "Basic k-1")]), &none)
            .unwrap_err();
        assert!(
            matches!(err, ApiError::MissingWriteKey),
            "only the Bearer scheme carries a key"
        );
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxy() {
        let mut intake = intake();
        intake.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
        let forwarded = headers(&[("x-forwarded-for", "198.51.100.1, 203.0.113.9, 10.1.1.1")]);

        let direct = intake.client_address(Some("192.0.2.4".parse().unwrap()), &forwarded);
        assert_eq!(
            direct,
            Some("192.0.2.4".parse().unwrap()),
            "an untrusted peer cannot forge it"
        );

        let proxied = intake.client_address(Some("10.0.0.2".parse().unwrap()), &forwarded);
        assert_eq!(
            proxied,
            Some("203.0.113.9".parse().unwrap()),
            "the nearest untrusted hop"
        );

        let with_port = headers(&[("x-forwarded-for", "203.0.113.9:4711, [2001:db8::7]:80")]);
        let proxied = intake.client_address(Some("10.0.0.2".parse().unwrap()), &with_port);
        assert_eq!(
            proxied,
            Some("2001:db8::7".parse().unwrap()),
            "a hop may carry a port"
        );

        let garbled = headers(&[("x-forwarded-for", "203.0.113.9, not-an-ip")]);
        let proxied = intake.client_address(Some("10.0.0.2".parse().unwrap()), &garbled);
        assert_eq!(proxied, Some("10.0.0.2".parse().unwrap()));
    }

    #[test]
    fn ip_mode_truncates_or_drops() {
        let mut intake = intake();
        intake.ip_mode = IpMode::Truncate;
        let v4 = intake.client_address(Some("203.0.113.77".parse().unwrap()), &HeaderMap::new());
        assert_eq!(v4, Some("203.0.113.0".parse().unwrap()));
        let v6 = intake.client_address(
            Some("2001:db8:aa:bb::1".parse().unwrap()),
            &HeaderMap::new(),
        );
        assert_eq!(v6, Some("2001:db8:aa::".parse().unwrap()));
        intake.ip_mode = IpMode::None;
        assert_eq!(
            intake.client_address(Some("203.0.113.77".parse().unwrap()), &HeaderMap::new()),
            None
        );
    }
}
