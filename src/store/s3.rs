//! The S3 output: uploads from the local spool with `aws-sdk-s3`.
//!
//! Each upload carries a checksum computed here from the file (CRC32C by default) as a plain
//! header, and the SDK's own checksums are limited to requests that require one. The SDK's
//! default streams the body with a trailing checksum. Some S3-compatible stores reject that,
//! and others store the chunk framing as part of the object. A whole body with a header
//! checksum is verified by every store. Retries are left to the publisher, so the SDK makes one attempt per call and
//! [`is_retryable`] alone decides what is tried again.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use tracing::{debug, error, warn};

use super::{ObjectStore, StoreError, create_dir_all, io_error, run_blocking, write_probe};
use crate::config::{ChecksumMode, S3Settings};

/// Time to open a connection to the store before the attempt fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to wait for the store's response once the request is sent.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest number of parts in one multipart upload, an S3 limit.
const MAX_PARTS: u64 = 10_000;
/// Size of the reads that compute a checksum.
const CHECKSUM_READ_BYTES: usize = 1024 * 1024;
/// S3 error codes that mean "try again later", whatever the HTTP status.
const RETRYABLE_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    // Temporary credentials ran out; the credential provider fetches new ones.
    "ExpiredToken",
];

/// What went wrong with one S3 request, reduced to what decides whether a retry can help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No complete response arrived: the connection was refused or reset, the name did not
    /// resolve, or the attempt timed out.
    Transport,
    /// The store returned an error status and, usually, an S3 error code.
    Response { status: u16, code: Option<String> },
    /// The request could not be built, such as for an invalid endpoint URL.
    Request,
}

/// An S3 bucket and key prefix that files are uploaded to from a local spool directory.
pub struct S3Store {
    client: Client,
    settings: S3Settings,
    /// The bucket, prefix and endpoint, for logs and errors.
    description: String,
}

// === impl S3Store ===

impl S3Store {
    /// Builds the client from the standard AWS configuration chain and the S3 flags. Fails
    /// when no region is configured; credentials are looked up at the first request.
    pub async fn connect(settings: S3Settings) -> Result<Self, StoreError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let shared = loader.load().await;
        let Some(region) = shared.region().cloned() else {
            return Err(StoreError::Setup(format!(
                "no AWS region is configured for bucket {}; set --s3-region or AWS_REGION",
                settings.bucket
            )));
        };

        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .read_timeout(READ_TIMEOUT)
                    .build(),
            );
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        let endpoint = match &settings.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => format!("the AWS endpoint of region {region}"),
        };
        let description = format!("s3://{}/{} at {endpoint}", settings.bucket, settings.prefix);

        Ok(Self {
            client: Client::from_conf(config.build()),
            settings,
            description,
        })
    }

    /// Returns the full object key of `key`, below the prefix.
    fn object_key(&self, key: &str) -> String {
        if self.settings.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.settings.prefix)
        }
    }

    /// Returns the checksum header value of `length` bytes of `file` from `offset`, or `None`
    /// when checksums are off.
    async fn checksum(
        &self,
        file: &Path,
        offset: u64,
        length: u64,
    ) -> Result<Option<String>, StoreError> {
        match self.settings.checksum {
            ChecksumMode::None => Ok(None),
            ChecksumMode::Crc32c => {
                let file = file.to_owned();
                let crc = run_blocking(move || crc32c_of_range(&file, offset, length)).await?;
                Ok(Some(aws_smithy_types::base64::encode(crc.to_be_bytes())))
            }
        }
    }

    fn checksum_algorithm(&self) -> Option<ChecksumAlgorithm> {
        match self.settings.checksum {
            ChecksumMode::None => None,
            ChecksumMode::Crc32c => Some(ChecksumAlgorithm::Crc32C),
        }
    }

    /// Uploads `file` in one request; the body is read from the file as it is sent.
    async fn put_whole(&self, object_key: &str, file: &Path, bytes: u64) -> Result<(), StoreError> {
        let checksum = self.checksum(file, 0, bytes).await?;
        let body = file_body(file, 0, bytes).await?;
        self.client
            .put_object()
            .bucket(&self.settings.bucket)
            .key(object_key)
            .content_length(i64::try_from(bytes).unwrap_or(i64::MAX))
            .set_checksum_crc32_c(checksum)
            .body(body)
            .send()
            .await
            .map_err(|err| s3_error("upload", object_key, &err))?;
        Ok(())
    }

    /// Uploads `file` in parts and aborts the upload when any part fails, so no incomplete
    /// upload is left to be billed.
    async fn put_multipart(
        &self,
        object_key: &str,
        file: &Path,
        bytes: u64,
    ) -> Result<(), StoreError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.settings.bucket)
            .key(object_key)
            .set_checksum_algorithm(self.checksum_algorithm())
            .send()
            .await
            .map_err(|err| s3_error("start multipart upload of", object_key, &err))?;
        let Some(upload_id) = created.upload_id() else {
            return Err(StoreError::S3 {
                operation: "start multipart upload of",
                key: object_key.to_owned(),
                failure: Failure::Transport,
                message: "the response has no upload id".to_owned(),
            });
        };

        let result = self.upload_parts(object_key, upload_id, file, bytes).await;
        if result.is_err() {
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(&self.settings.bucket)
                .key(object_key)
                .upload_id(upload_id)
                .send()
                .await;
            if let Err(err) = aborted {
                warn!(key = object_key, upload_id, error = %error_message(&err), "failed to abort multipart upload");
            }
        }
        result
    }

    async fn upload_parts(
        &self,
        object_key: &str,
        upload_id: &str,
        file: &Path,
        bytes: u64,
    ) -> Result<(), StoreError> {
        let part_bytes = part_size(bytes, self.settings.multipart_threshold_bytes);
        let mut parts = Vec::new();
        let mut offset = 0;
        let mut part_number = 1;
        while offset < bytes {
            let length = part_bytes.min(bytes - offset);
            let checksum = self.checksum(file, offset, length).await?;
            let body = file_body(file, offset, length).await?;
            let uploaded = self
                .client
                .upload_part()
                .bucket(&self.settings.bucket)
                .key(object_key)
                .upload_id(upload_id)
                .part_number(part_number)
                .content_length(i64::try_from(length).unwrap_or(i64::MAX))
                .set_checksum_crc32_c(checksum.clone())
                .body(body)
                .send()
                .await
                .map_err(|err| s3_error("upload a part of", object_key, &err))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(part_number)
                    .set_e_tag(uploaded.e_tag().map(str::to_owned))
                    .set_checksum_crc32_c(checksum)
                    .build(),
            );
            offset += length;
            part_number += 1;
        }

        self.client
            .complete_multipart_upload()
            .bucket(&self.settings.bucket)
            .key(object_key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|err| s3_error("complete multipart upload of", object_key, &err))?;
        Ok(())
    }

    /// Uploads and deletes a small object, to show that the bucket accepts writes.
    async fn check_bucket(&self) -> Result<(), StoreError> {
        let probe_key = self.object_key(&format!(".write-check-{}", uuid::Uuid::now_v7().simple()));
        let body = b"impression-server write check";
        let checksum = match self.settings.checksum {
            ChecksumMode::None => None,
            ChecksumMode::Crc32c => Some(aws_smithy_types::base64::encode(
                crc32c::crc32c(body).to_be_bytes(),
            )),
        };
        self.client
            .put_object()
            .bucket(&self.settings.bucket)
            .key(&probe_key)
            .set_checksum_crc32_c(checksum)
            .body(ByteStream::from_static(body))
            .send()
            .await
            .map_err(|err| s3_error("write test object", &probe_key, &err))?;

        // Deleting needs s3:DeleteObject, which the server otherwise does not use.
        let deleted = self
            .client
            .delete_object()
            .bucket(&self.settings.bucket)
            .key(&probe_key)
            .send()
            .await;
        if let Err(err) = deleted {
            warn!(key = %probe_key, error = %error_message(&err), "failed to delete the test object; it can be deleted by hand");
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn staging_dir(&self) -> &Path {
        &self.settings.spool_dir
    }

    async fn check(&self) -> Result<(), StoreError> {
        let spool = self.settings.spool_dir.clone();
        run_blocking(move || check_spool(&spool)).await?;

        let timeout = self.settings.check_timeout;
        match tokio::time::timeout(timeout, self.check_bucket()).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout {
                operation: "test write",
                timeout,
            }),
        }
    }

    async fn publish(&self, key: &str, file: &Path) -> Result<(), StoreError> {
        let object_key = self.object_key(key);
        let bytes = tokio::fs::metadata(file)
            .await
            .map_err(io_error("read metadata of", file))?
            .len();

        if bytes >= self.settings.multipart_threshold_bytes {
            self.put_multipart(&object_key, file, bytes).await?;
        } else {
            self.put_whole(&object_key, file, bytes).await?;
        }

        // The object is stored, so a failed delete costs only a second upload of the same
        // key at the next start.
        if let Err(err) = tokio::fs::remove_file(file).await {
            error!(key = %object_key, path = %file.display(), error = %err, "uploaded file could not be deleted from the spool");
        } else {
            debug!(key = %object_key, bytes, "uploaded file and deleted it from the spool");
        }
        Ok(())
    }
}

/// Returns whether a failed request may succeed when sent again unchanged: on transport
/// failures, server errors (5xx), 408 and 429, and the S3 codes for throttling and
/// temporary trouble. Other client errors, such as `AccessDenied`, `NoSuchBucket` or
/// `SignatureDoesNotMatch`, need a change of configuration.
pub fn is_retryable(failure: &Failure) -> bool {
    match failure {
        Failure::Transport => true,
        Failure::Response { status, code } => {
            *status >= 500
                || *status == 408
                || *status == 429
                || code
                    .as_deref()
                    .is_some_and(|code| RETRYABLE_CODES.contains(&code))
        }
        Failure::Request => false,
    }
}

/// Reduces an SDK error to a [`Failure`].
fn failure_of<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> Failure
where
    R: HasStatus,
{
    match err {
        SdkError::ConstructionFailure(_) => Failure::Request,
        SdkError::DispatchFailure(dispatch) if dispatch.is_user() => Failure::Request,
        SdkError::ServiceError(service) => Failure::Response {
            status: service.raw().status_code(),
            code: service.err().code().map(str::to_owned),
        },
        // Timeouts, refused or reset connections, and responses that could not be read.
        _ => Failure::Transport,
    }
}

/// The HTTP status of a raw response; a seam so tests need not build SDK responses.
trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// Builds the error of a failed request: its classification and a one-line message.
fn s3_error<E, R>(operation: &'static str, key: &str, err: &SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: HasStatus + std::fmt::Debug,
{
    StoreError::S3 {
        operation,
        key: key.to_owned(),
        failure: failure_of(err),
        message: error_message(err),
    }
}

/// Returns a one-line message: the S3 code, message, status and what to check for an error
/// response, and the chain of causes otherwise, such as "Connection refused".
fn error_message<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: HasStatus + std::fmt::Debug,
{
    let text = match err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status_code();
            let code = service.err().code();
            let mut text = match (code, service.err().message()) {
                (Some(code), Some(message)) => format!("{code}: {message} (HTTP {status})"),
                (Some(code), None) => format!("{code} (HTTP {status})"),
                _ => format!("HTTP {status}"),
            };
            if let Some(hint) = code.and_then(hint_for) {
                text.push_str("; ");
                text.push_str(hint);
            }
            text
        }
        other => {
            let mut causes = vec![other.to_string()];
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                causes.push(cause.to_string());
                source = cause.source();
            }
            causes.join(": ")
        }
    };
    text.replace(['\n', '\r'], " ")
}

/// Returns what an operator should check after the S3 error `code`.
fn hint_for(code: &str) -> Option<&'static str> {
    match code {
        "NoSuchBucket" => Some("create the bucket or correct --output"),
        "AccessDenied" | "SignatureDoesNotMatch" | "InvalidAccessKeyId" | "ExpiredToken" => {
            Some("check the AWS credentials and the bucket policy")
        }
        "PermanentRedirect" | "AuthorizationHeaderMalformed" => {
            Some("check --s3-region and --s3-endpoint")
        }
        _ => None,
    }
}

/// Returns the part size for a file of `bytes`: the threshold, or larger when the file would
/// otherwise need more parts than S3 allows.
fn part_size(bytes: u64, threshold_bytes: u64) -> u64 {
    threshold_bytes.max(bytes.div_ceil(MAX_PARTS))
}

/// Returns a body that reads `length` bytes of `file` from `offset` as it is sent.
async fn file_body(file: &Path, offset: u64, length: u64) -> Result<ByteStream, StoreError> {
    ByteStream::read_from()
        .path(file)
        .offset(offset)
        .length(Length::Exact(length))
        .build()
        .await
        .map_err(|err| StoreError::Io {
            action: "open",
            path: file.to_owned(),
            source: std::io::Error::other(err),
        })
}

/// Computes the CRC32C of `length` bytes of `path` from `offset`.
fn crc32c_of_range(path: &Path, offset: u64, length: u64) -> Result<u32, StoreError> {
    use std::io::Seek;

    let mut file = std::fs::File::open(path).map_err(io_error("open", path))?;
    file.seek(std::io::SeekFrom::Start(offset))
        .map_err(io_error("seek in", path))?;
    let mut reader = file.take(length);
    let mut buffer = vec![0; CHECKSUM_READ_BYTES];
    let mut crc = 0;
    let mut read_total = 0;
    loop {
        let read = reader.read(&mut buffer).map_err(io_error("read", path))?;
        if read == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &buffer[..read]);
        read_total += read as u64;
    }
    if read_total != length {
        return Err(StoreError::Io {
            action: "read",
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("expected {length} bytes from offset {offset}, read {read_total}"),
            ),
        });
    }
    Ok(crc)
}

/// Creates the spool directory and shows that files can be written there.
fn check_spool(spool: &Path) -> Result<(), StoreError> {
    create_dir_all(spool)?;
    write_probe(spool)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, code: Option<&str>) -> Failure {
        Failure::Response {
            status,
            code: code.map(str::to_owned),
        }
    }

    #[test]
    fn retryable_failures() {
        let cases = [
            Failure::Transport,
            response(500, Some("InternalError")),
            response(503, Some("SlowDown")),
            response(503, None),
            response(429, None),
            response(408, None),
            response(400, Some("RequestTimeout")),
            response(400, Some("ExpiredToken")),
            response(400, Some("ThrottlingException")),
        ];
        for failure in cases {
            assert!(is_retryable(&failure), "{failure:?}");
        }
    }

    #[test]
    fn permanent_failures() {
        let cases = [
            Failure::Request,
            response(403, Some("AccessDenied")),
            response(403, Some("SignatureDoesNotMatch")),
            response(403, Some("InvalidAccessKeyId")),
            response(404, Some("NoSuchBucket")),
            response(400, Some("InvalidRequest")),
            response(400, None),
        ];
        for failure in cases {
            assert!(!is_retryable(&failure), "{failure:?}");
        }
    }

    #[test]
    fn part_size_respects_part_limit() {
        let threshold = 16 * 1024 * 1024;
        assert_eq!(part_size(20 * 1024 * 1024, threshold), threshold);
        let huge = 400 * 1024 * 1024 * 1024;
        let size = part_size(huge, threshold);
        assert!(size > threshold);
        assert!(huge.div_ceil(size) <= MAX_PARTS);
    }

    #[test]
    fn crc32c_of_range_matches_slice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();

        let whole = crc32c_of_range(&path, 0, data.len() as u64).unwrap();
        assert_eq!(whole, crc32c::crc32c(&data));
        let middle = crc32c_of_range(&path, 1000, 2_000_000).unwrap();
        assert_eq!(middle, crc32c::crc32c(&data[1000..2_001_000]));
    }

    #[test]
    fn crc32c_of_range_rejects_short_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"short").unwrap();
        let err = crc32c_of_range(&path, 0, 100).unwrap_err();
        assert!(err.to_string().contains("expected 100 bytes"), "{err}");
    }
}
