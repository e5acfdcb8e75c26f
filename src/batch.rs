//! The `POST /v1/collect` body: parsing, validation and conversion into session items.
//!
//! A body is parsed once into typed structs; every error names the JSON path of the field and
//! the problem. A batch that passes is converted into [`Batch`], with item times corrected for
//! the client's clock skew, before any session is touched, so a batch is accepted or rejected
//! whole.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::clock::parse_rfc3339_ms;
use crate::limits::{BatchLimits, check_batch, check_depth};

/// Longest accepted device id, in bytes.
pub const MAX_DEVICE_ID_BYTES: usize = 256;
/// The field name reported for an error in the body as a whole.
pub const ROOT_FIELD: &str = "body";
/// Latest accepted time: 9999-12-31T23:59:59.999Z.
const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// A rejected batch: the field's JSON path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    pub kind: BatchErrorKind,
    /// JSON path of the field, such as `impressions[2].time`; [`ROOT_FIELD`] for the whole body.
    pub field: String,
    pub message: String,
}

/// Whether the body was not JSON at all or a field was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchErrorKind {
    InvalidJson,
    InvalidField,
}

/// A validated batch, ready to be recorded into the device's session.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub device_id: Box<str>,
    pub session_key: Option<Box<str>>,
    /// Server time at which the request arrived.
    pub received_ms: i64,
    pub context: Context,
    pub args: StringMap,
    pub impressions: Vec<Impression>,
    pub events: Vec<Event>,
}

/// Client-reported context of the visit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Context {
    pub entry_url: Option<Box<str>>,
    pub referrer: Option<Box<str>>,
    pub user_agent: Option<Box<str>>,
    pub client_type: Option<Box<str>>,
}

/// A JSON object flattened to string values: a string as itself, anything else as its JSON text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StringMap(pub Vec<(Box<str>, Box<str>)>);

/// One impression as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Impression {
    pub impression_id: Box<str>,
    pub feature: Box<str>,
    /// Client time corrected for skew, never after arrival.
    pub time_ms: i64,
    pub client_time_ms: Option<i64>,
    pub args: StringMap,
    pub outputs: StringMap,
    pub variants: Vec<Box<str>>,
}

/// One event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event_id: Box<str>,
    pub name: Box<str>,
    pub time_ms: i64,
    pub client_time_ms: Option<i64>,
    pub impression_id: Option<Box<str>>,
    /// The feature of the impression the event refers to; filled in by the session when known.
    pub feature: Option<Box<str>>,
    pub fields: StringMap,
}

/// Device id sources other than the body.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceIdSources<'a> {
    pub header: Option<&'a str>,
    pub query: Option<&'a str>,
}

// The body as sent. Unknown fields are ignored so that newer clients keep working.

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BatchBody {
    device_id: Option<String>,
    session_key: Option<Box<str>>,
    sent_at: Option<Timestamp>,
    context: Option<Context>,
    args: Option<StringMap>,
    impressions: Option<Vec<ImpressionBody>>,
    events: Option<Vec<EventBody>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ImpressionBody {
    impression_id: Box<str>,
    feature: Box<str>,
    time: Option<Timestamp>,
    args: Option<StringMap>,
    outputs: Option<StringMap>,
    variants: Option<Vec<Box<str>>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EventBody {
    event_id: Box<str>,
    name: Box<str>,
    time: Option<Timestamp>,
    impression_id: Option<Box<str>>,
    feature: Option<Box<str>>,
    fields: Option<StringMap>,
}

/// A time as milliseconds since the Unix epoch or as an RFC 3339 string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timestamp(i64);

// === impl Batch ===

impl Batch {
    /// Parses and validates a request body received at `received_ms`, with the default limits.
    pub fn parse(
        body: &[u8],
        device_ids: DeviceIdSources<'_>,
        received_ms: i64,
    ) -> Result<Self, BatchError> {
        Self::parse_with(body, device_ids, received_ms, &BatchLimits::default())
    }

    /// Parses and validates a request body received at `received_ms`, within `limits`.
    pub fn parse_with(
        body: &[u8],
        device_ids: DeviceIdSources<'_>,
        received_ms: i64,
        limits: &BatchLimits,
    ) -> Result<Self, BatchError> {
        check_depth(body, limits.max_json_depth)?;
        let batch = Self::parse_unchecked(body, device_ids, received_ms)?;
        check_batch(&batch, limits)?;
        Ok(batch)
    }

    fn parse_unchecked(
        body: &[u8],
        device_ids: DeviceIdSources<'_>,
        received_ms: i64,
    ) -> Result<Self, BatchError> {
        // serde would also read a struct from an array; a batch is an object and nothing else.
        if body.iter().find(|byte| !byte.is_ascii_whitespace()) != Some(&b'{') {
            return Err(BatchError {
                kind: BatchErrorKind::InvalidJson,
                field: ROOT_FIELD.to_owned(),
                message: "expected a JSON object".to_owned(),
            });
        }
        let parsed = parse_body(body)?;
        let device_id = resolve_device_id(parsed.device_id.as_deref(), device_ids)?;

        let session_key = parsed.session_key;
        if session_key.as_deref().is_some_and(str::is_empty) {
            return Err(invalid_field("sessionKey", "must not be empty"));
        }

        // Items are corrected by the age the client reports: arrival minus (sentAt - item time).
        let skew_ms = parsed.sent_at.map(|sent_at| received_ms - sent_at.0);
        let correct = |client_time: Option<Timestamp>| match client_time {
            None => (received_ms, None),
            Some(Timestamp(ms)) => {
                let corrected = skew_ms.map_or(ms, |skew| ms.saturating_add(skew));
                (corrected.clamp(0, received_ms), Some(ms))
            }
        };

        let impressions = parsed.impressions.unwrap_or_default();
        let mut stored_impressions = Vec::with_capacity(impressions.len());
        for (index, item) in impressions.into_iter().enumerate() {
            require_text(&item.impression_id, || {
                format!("impressions[{index}].impressionId")
            })?;
            require_text(&item.feature, || format!("impressions[{index}].feature"))?;
            let (time_ms, client_time_ms) = correct(item.time);
            stored_impressions.push(Impression {
                impression_id: item.impression_id,
                feature: item.feature,
                time_ms,
                client_time_ms,
                args: item.args.unwrap_or_default(),
                outputs: item.outputs.unwrap_or_default(),
                variants: item.variants.unwrap_or_default(),
            });
        }

        let events = parsed.events.unwrap_or_default();
        let mut stored_events = Vec::with_capacity(events.len());
        for (index, item) in events.into_iter().enumerate() {
            require_text(&item.event_id, || format!("events[{index}].eventId"))?;
            require_text(&item.name, || format!("events[{index}].name"))?;
            let (time_ms, client_time_ms) = correct(item.time);
            stored_events.push(Event {
                event_id: item.event_id,
                name: item.name,
                time_ms,
                client_time_ms,
                impression_id: item.impression_id.filter(|id| !id.is_empty()),
                feature: item.feature.filter(|feature| !feature.is_empty()),
                fields: item.fields.unwrap_or_default(),
            });
        }

        Ok(Batch {
            device_id,
            session_key,
            received_ms,
            context: parsed.context.unwrap_or_default(),
            args: parsed.args.unwrap_or_default(),
            impressions: stored_impressions,
            events: stored_events,
        })
    }
}

/// Deserializes the body. Tracking the JSON path costs an allocation per object key, so it is
/// done only for a body that failed, by parsing it a second time to name the field.
fn parse_body(body: &[u8]) -> Result<BatchBody, BatchError> {
    // `from_slice` also rejects anything after the object, as the second parse does below.
    if let Ok(parsed) = serde_json::from_slice(body) {
        return Ok(parsed);
    }

    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed: BatchBody =
        serde_path_to_error::deserialize(&mut deserializer).map_err(from_json_error)?;
    // Anything after the object, such as a second object, is an error, not silently dropped.
    deserializer.end().map_err(|err| BatchError {
        kind: BatchErrorKind::InvalidJson,
        field: ROOT_FIELD.to_owned(),
        message: err.to_string(),
    })?;
    Ok(parsed)
}

/// Picks the device id from body, header and query, which must agree when several are given.
fn resolve_device_id(
    body: Option<&str>,
    sources: DeviceIdSources<'_>,
) -> Result<Box<str>, BatchError> {
    let candidates = [
        ("deviceId", body),
        ("X-Device-Id header", sources.header),
        ("deviceId query parameter", sources.query),
    ];
    let mut chosen: Option<(&str, &str)> = None;
    for (source, value) in candidates {
        let Some(value) = value else { continue };
        match chosen {
            None => chosen = Some((source, value)),
            Some((first_source, first)) if first != value => {
                return Err(invalid_field(
                    "deviceId",
                    &format!(
                        "the {source} ({value:?}) differs from the {first_source} ({first:?})"
                    ),
                ));
            }
            Some(_) => {}
        }
    }

    let Some((_, device_id)) = chosen else {
        return Err(invalid_field(
            "deviceId",
            "missing: send it in the body, the X-Device-Id header or the deviceId query parameter",
        ));
    };
    if device_id.trim().is_empty() {
        return Err(invalid_field("deviceId", "must not be empty or blank"));
    }
    if device_id.len() > MAX_DEVICE_ID_BYTES {
        return Err(invalid_field("deviceId", "must be at most 256 bytes"));
    }
    if device_id.chars().any(char::is_control) {
        return Err(invalid_field(
            "deviceId",
            "must not contain control characters",
        ));
    }
    Ok(device_id.into())
}

fn require_text(value: &str, field: impl FnOnce() -> String) -> Result<(), BatchError> {
    if value.is_empty() {
        return Err(invalid_field(&field(), "must not be empty"));
    }
    Ok(())
}

fn invalid_field(field: &str, message: &str) -> BatchError {
    BatchError {
        kind: BatchErrorKind::InvalidField,
        field: field.to_owned(),
        message: message.to_owned(),
    }
}

fn from_json_error(err: serde_path_to_error::Error<serde_json::Error>) -> BatchError {
    let mut field = err.path().to_string();
    let inner = err.into_inner();
    let kind = match inner.classify() {
        serde_json::error::Category::Data => BatchErrorKind::InvalidField,
        serde_json::error::Category::Io
        | serde_json::error::Category::Syntax
        | serde_json::error::Category::Eof => BatchErrorKind::InvalidJson,
    };
    let message = inner.to_string();

    // serde reports a missing field at its parent; name the field itself.
    if let Some(missing) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        field = if field == "." {
            missing.to_owned()
        } else {
            format!("{field}.{missing}")
        };
    }
    // "?" means the error came before any field was reached, "." that it is the whole body.
    if field == "?" || field == "." {
        field = ROOT_FIELD.to_owned();
    }
    BatchError {
        kind,
        field,
        message,
    }
}

// === impl Impression and Event ===

impl Impression {
    /// Returns the estimated heap bytes of this impression, its own struct included.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.impression_id.len()
            + self.feature.len()
            + self.args.heap_bytes()
            + self.outputs.heap_bytes()
            + self
                .variants
                .iter()
                .map(|v| v.len() + std::mem::size_of::<Box<str>>())
                .sum::<usize>()
    }
}

impl Event {
    /// Returns the estimated heap bytes of this event, its own struct included.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.event_id.len()
            + self.name.len()
            + self.impression_id.as_deref().map_or(0, str::len)
            + self.feature.as_deref().map_or(0, str::len)
            + self.fields.heap_bytes()
    }
}

// === impl StringMap ===

impl StringMap {
    /// Returns the estimated heap bytes of the map's entries.
    pub fn heap_bytes(&self) -> usize {
        let entries = self.0.capacity() * std::mem::size_of::<(Box<str>, Box<str>)>();
        entries
            + self
                .0
                .iter()
                .map(|(key, value)| key.len() + value.len())
                .sum::<usize>()
    }

    /// Returns the value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| &**k == key).map(|(_, v)| &**v)
    }
}

impl<'de> Deserialize<'de> for StringMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(StringMapVisitor)
    }
}

struct StringMapVisitor;

impl<'de> Visitor<'de> for StringMapVisitor {
    type Value = StringMap;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<StringMap, A::Error> {
        let mut entries: Vec<(Box<str>, Box<str>)> =
            Vec::with_capacity(access.size_hint().unwrap_or(0).min(64));
        while let Some((key, ValueText(text))) = access.next_entry::<Box<str>, ValueText>()? {
            entries.push((key, text));
        }

        // A repeated key keeps its last value, as JSON.parse does. The sort is stable, so the
        // last of equal keys is the last of its run, and `dedup_by` keeps the first of a run.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.dedup_by(|later, kept| {
            if later.0 != kept.0 {
                return false;
            }
            std::mem::swap(&mut later.1, &mut kept.1);
            true
        });
        Ok(StringMap(entries))
    }
}

/// One value of a [`StringMap`] as its stored text. Scalars go straight to text; objects and
/// arrays are built as a [`serde_json::Value`] and written back as compact JSON.
struct ValueText(Box<str>);

impl<'de> Deserialize<'de> for ValueText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueTextVisitor)
    }
}

struct ValueTextVisitor;

impl<'de> Visitor<'de> for ValueTextVisitor {
    type Value = ValueText;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<ValueText, E> {
        Ok(ValueText(text.into()))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<ValueText, E> {
        Ok(ValueText(text.into_boxed_str()))
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<ValueText, E> {
        Ok(ValueText(if value { "true" } else { "false" }.into()))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<ValueText, E> {
        Ok(ValueText(value.to_string().into_boxed_str()))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<ValueText, E> {
        Ok(ValueText(value.to_string().into_boxed_str()))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<ValueText, E> {
        // serde_json's own float formatting, so the text is what `Value::to_string` writes.
        Ok(ValueText(
            serde_json::Value::from(value).to_string().into_boxed_str(),
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<ValueText, E> {
        Ok(ValueText("null".into()))
    }

    fn visit_map<A: MapAccess<'de>>(self, access: A) -> Result<ValueText, A::Error> {
        let value = serde_json::Value::deserialize(de::value::MapAccessDeserializer::new(access))?;
        Ok(ValueText(value.to_string().into_boxed_str()))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, access: A) -> Result<ValueText, A::Error> {
        let value = serde_json::Value::deserialize(de::value::SeqAccessDeserializer::new(access))?;
        Ok(ValueText(value.to_string().into_boxed_str()))
    }
}

// === impl Timestamp ===

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TimestampVisitor)
    }
}

struct TimestampVisitor;

impl Visitor<'_> for TimestampVisitor {
    type Value = Timestamp;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("milliseconds since the Unix epoch or an RFC 3339 string")
    }

    fn visit_u64<E: de::Error>(self, ms: u64) -> Result<Timestamp, E> {
        match i64::try_from(ms) {
            Ok(ms) if ms <= MAX_TIME_MS => Ok(Timestamp(ms)),
            _ => Err(E::custom("time is after the year 9999")),
        }
    }

    fn visit_i64<E: de::Error>(self, ms: i64) -> Result<Timestamp, E> {
        if ms < 0 {
            return Err(E::custom("time is before 1970-01-01"));
        }
        self.visit_u64(ms.unsigned_abs())
    }

    fn visit_f64<E: de::Error>(self, ms: f64) -> Result<Timestamp, E> {
        // Fractional milliseconds, as from `performance.timeOrigin + performance.now()`, are
        // cut to whole ones.
        if !ms.is_finite() || ms >= (MAX_TIME_MS + 1) as f64 {
            return Err(E::custom("time is after the year 9999"));
        }
        if ms < 0.0 {
            return Err(E::custom("time is before 1970-01-01"));
        }
        #[expect(
            clippy::cast_possible_truncation,
            reason = "the value is in range and whole"
        )]
        Ok(Timestamp(ms.floor() as i64))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Timestamp, E> {
        let ms = parse_rfc3339_ms(text)
            .ok_or_else(|| E::custom(format!("invalid RFC 3339 time {text:?}")))?;
        if ms < 0 {
            return Err(E::custom("time is before 1970-01-01"));
        }
        Ok(Timestamp(ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECEIVED_MS: i64 = 1_733_310_010_000;

    fn parse(body: &str) -> Result<Batch, BatchError> {
        Batch::parse(body.as_bytes(), DeviceIdSources::default(), RECEIVED_MS)
    }

    #[test]
    fn full_example_parses() {
        let batch = parse(
            r#"{"deviceId": "d-1", "sessionKey": "tab-1", "sentAt": 1733310005000,
                "context": {"entryUrl": "https://shop.example/p/42", "clientType": "web"},
                "args": {"userId": "u-1", "n": 3, "flag": true, "nested": {"a": [1, "x"]}},
                "impressions": [{"impressionId": "i-1", "feature": "RatingBox", "time": 1733310000000,
                                 "outputs": {"callToAction": "Rate it"}, "variants": ["cta-test:B"]}],
                "events": [{"eventId": "e-1", "name": "Rating", "time": "2024-12-04T11:00:04Z",
                            "impressionId": "i-1", "fields": {"stars": 5}}]}"#,
        )
        .unwrap();
        assert_eq!(&*batch.device_id, "d-1");
        assert_eq!(batch.session_key.as_deref(), Some("tab-1"));
        assert_eq!(batch.context.client_type.as_deref(), Some("web"));
        assert_eq!(batch.args.get("userId"), Some("u-1"));
        assert_eq!(batch.args.get("n"), Some("3"));
        assert_eq!(batch.args.get("flag"), Some("true"));
        assert_eq!(batch.args.get("nested"), Some(r#"{"a":[1,"x"]}"#));
        assert_eq!(
            batch.impressions[0].outputs.get("callToAction"),
            Some("Rate it")
        );
        assert_eq!(&*batch.impressions[0].variants[0], "cta-test:B");
        assert_eq!(batch.events[0].fields.get("stars"), Some("5"));
        assert_eq!(batch.events[0].client_time_ms, Some(1_733_310_004_000));
    }

    #[test]
    fn skew_correction_uses_sent_at() {
        // The client clock is 1 hour ahead: it reports an item 4 s old, sent 10 ms ago.
        let hour_ms = 3_600_000;
        let sent_at = RECEIVED_MS + hour_ms - 10;
        let time = sent_at - 4_000;
        let body = format!(
            r#"{{"deviceId": "d", "sentAt": {sent_at}, "impressions": [{{"impressionId": "i", "feature": "f", "time": {time}}}]}}"#
        );
        let batch = parse(&body).unwrap();
        assert_eq!(batch.impressions[0].time_ms, RECEIVED_MS - 4_000);
        assert_eq!(batch.impressions[0].client_time_ms, Some(time));
    }

    #[test]
    fn time_never_after_arrival() {
        let future = RECEIVED_MS + 60_000;
        let body = format!(
            r#"{{"deviceId": "d", "events": [{{"eventId": "e", "name": "n", "time": {future}}}]}}"#
        );
        let batch = parse(&body).unwrap();
        assert_eq!(batch.events[0].time_ms, RECEIVED_MS);
        assert_eq!(batch.events[0].client_time_ms, Some(future));
    }

    #[test]
    fn missing_time_uses_arrival() {
        let batch =
            parse(r#"{"deviceId": "d", "events": [{"eventId": "e", "name": "n"}]}"#).unwrap();
        assert_eq!(batch.events[0].time_ms, RECEIVED_MS);
        assert_eq!(batch.events[0].client_time_ms, None);
    }

    #[test]
    fn wrong_type_names_field_path() {
        let err = parse(r#"{"deviceId": "d", "impressions": [{"impressionId": "i", "feature": "f", "time": true}]}"#)
            .unwrap_err();
        assert_eq!(err.kind, BatchErrorKind::InvalidField);
        assert_eq!(err.field, "impressions[0].time");
    }

    #[test]
    fn missing_required_field_is_named() {
        let err = parse(r#"{"deviceId": "d", "events": [{"eventId": "e"}]}"#).unwrap_err();
        assert_eq!(err.field, "events[0].name");
        assert!(
            err.message.starts_with("missing field `name`"),
            "{}",
            err.message
        );
    }

    #[test]
    fn empty_feature_is_rejected() {
        let err =
            parse(r#"{"deviceId": "d", "impressions": [{"impressionId": "i", "feature": ""}]}"#)
                .unwrap_err();
        assert_eq!(err.field, "impressions[0].feature");
    }

    #[test]
    fn invalid_json_is_a_syntax_error() {
        let err = parse(r#"{"deviceId": "d", "#).unwrap_err();
        assert_eq!(err.kind, BatchErrorKind::InvalidJson);
        assert_eq!(err.field, ROOT_FIELD);
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let body = format!(
            r#"{{"deviceId": "d", "args": {{"x": {}{}}}}}"#,
            "[".repeat(500),
            "]".repeat(500)
        );
        let err = parse(&body).unwrap_err();
        assert_eq!(err.field, format!("args.x{}", "[0]".repeat(18)));
        assert!(
            err.message.contains("nested deeper than 20"),
            "{}",
            err.message
        );
    }

    #[test]
    fn lone_surrogate_is_rejected() {
        let err = parse(r#"{"deviceId": "d\ud800"}"#).unwrap_err();
        assert_eq!(err.kind, BatchErrorKind::InvalidJson);
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        let body = b"{\"deviceId\": \"d\xff\"}";
        let err = Batch::parse(body, DeviceIdSources::default(), RECEIVED_MS).unwrap_err();
        assert_eq!(err.kind, BatchErrorKind::InvalidJson);
    }

    #[test]
    fn device_id_from_header_or_query() {
        let sources = DeviceIdSources {
            header: Some("d-9"),
            query: Some("d-9"),
        };
        let batch = Batch::parse(b"{}", sources, RECEIVED_MS).unwrap();
        assert_eq!(&*batch.device_id, "d-9");
    }

    #[test]
    fn device_id_sources_must_agree() {
        let sources = DeviceIdSources {
            header: Some("d-2"),
            query: None,
        };
        let err = Batch::parse(br#"{"deviceId": "d-1"}"#, sources, RECEIVED_MS).unwrap_err();
        assert_eq!(err.field, "deviceId");
        assert!(err.message.contains("X-Device-Id"), "{}", err.message);
    }

    #[test]
    fn missing_device_id_is_rejected() {
        let err = parse(r#"{"impressions": []}"#).unwrap_err();
        assert_eq!(err.field, "deviceId");
        assert!(err.message.starts_with("missing"), "{}", err.message);
    }

    #[test]
    fn map_values_stored_as_json_text() {
        let batch = parse(
            r#"{"deviceId": "d", "args": {"s": "a\"b", "i": -7, "u": 18446744073709551615,
                "f": 0.1, "e": 1e300, "t": true, "n": null, "o": {"k": [1, 2.5]}, "a": []}}"#,
        )
        .unwrap();
        assert_eq!(batch.args.get("s"), Some("a\"b"));
        assert_eq!(batch.args.get("i"), Some("-7"));
        assert_eq!(batch.args.get("u"), Some("18446744073709551615"));
        assert_eq!(batch.args.get("f"), Some("0.1"));
        assert_eq!(batch.args.get("e"), Some("1e+300"));
        assert_eq!(batch.args.get("t"), Some("true"));
        assert_eq!(batch.args.get("n"), Some("null"));
        assert_eq!(batch.args.get("o"), Some(r#"{"k":[1,2.5]}"#));
        assert_eq!(batch.args.get("a"), Some("[]"));
    }

    #[test]
    fn repeated_map_key_keeps_last_value() {
        let batch = parse(r#"{"deviceId": "d", "args": {"a": "1", "b": "2", "a": "3"}}"#).unwrap();
        assert_eq!(batch.args.0.len(), 2);
        assert_eq!(batch.args.get("a"), Some("3"));
    }

    #[test]
    fn float_times_are_cut_to_milliseconds() {
        let body = r#"{"deviceId": "d", "sentAt": 1.5e12, "events": [{"eventId": "e", "name": "n", "time": 1733310000000.75}]}"#;
        let batch = parse(body).unwrap();
        assert_eq!(batch.events[0].client_time_ms, Some(1_733_310_000_000));
    }

    #[test]
    fn trailing_data_is_rejected() {
        for body in [
            r#"{"deviceId": "a"}{"deviceId": "b"}"#,
            r#"{"deviceId": "a"} x"#,
        ] {
            let err = parse(body).unwrap_err();
            assert_eq!(err.kind, BatchErrorKind::InvalidJson, "{body}");
            assert!(err.message.contains("trailing"), "{}", err.message);
        }
        assert!(
            parse("{\"deviceId\": \"a\"}\n").is_ok(),
            "trailing whitespace is fine"
        );
    }

    #[test]
    fn top_level_must_be_object() {
        for body in [
            r#"["d", null, null, null, null, null, null]"#,
            "[]",
            "\"d\"",
            "7",
            "",
        ] {
            let err = parse(body).unwrap_err();
            assert_eq!(err.field, ROOT_FIELD, "{body}");
            assert_eq!(err.message, "expected a JSON object", "{body}");
        }
    }

    #[test]
    fn unknown_field_is_rejected() {
        let err = parse(r#"{"deviceId": "d", "impresions": []}"#).unwrap_err();
        assert_eq!(err.field, "impresions");
        assert!(err.message.contains("unknown field"), "{}", err.message);
        let err =
            parse(r#"{"deviceId": "d", "events": [{"eventId": "e", "name": "n", "feild": 1}]}"#)
                .unwrap_err();
        assert_eq!(err.field, "events[0].feild");
    }

    #[test]
    fn blank_device_id_is_rejected() {
        let err = parse(r#"{"deviceId": "   "}"#).unwrap_err();
        assert_eq!(err.field, "deviceId");
    }

    #[test]
    fn negative_and_huge_times_are_rejected() {
        for time in [
            "-1",
            "-1.5",
            "1e300",
            "99999999999999999999999",
            r#""yesterday""#,
        ] {
            let body = format!(r#"{{"deviceId": "d", "sentAt": {time}}}"#);
            let err = parse(&body).unwrap_err();
            assert_eq!(err.field, "sentAt", "{time}");
        }
    }
}
