//! The `POST /v1/collect` body: parsing, validation and conversion into session items.
//!
//! A body is parsed into typed structs whose strings borrow from the body where the JSON has
//! no escapes: by a single-pass parser for the common shape, else by serde. Every error names the JSON path of the field and the problem. A batch that
//! passes is converted into [`Batch`], with item times corrected for the client's clock skew,
//! before any session is touched, so a batch is accepted or rejected whole.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::clock::parse_rfc3339_ms;
use crate::limits::{BATCH_DEPTH, BatchLimits, check_batch, check_depth, has_nested_values};

mod fast;

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
///
/// Its strings borrow from the request body unless the JSON escaped them.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch<'a> {
    pub device_id: Box<str>,
    pub session_key: Option<Text<'a>>,
    /// Server time at which the request arrived.
    pub received_ms: i64,
    pub context: Context<'a>,
    pub args: StringMap<'a>,
    pub impressions: Vec<Impression<'a>>,
    pub events: Vec<Event<'a>>,
}

/// Client-reported context of the visit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context<'a> {
    pub entry_url: Option<Text<'a>>,
    pub referrer: Option<Text<'a>>,
    pub user_agent: Option<Text<'a>>,
    pub client_type: Option<Text<'a>>,
}

/// A string of a batch: borrowed from the body, or owned where the JSON escaped it.
pub type Text<'a> = Cow<'a, str>;

/// A JSON object flattened to string values: a string as itself, anything else as its JSON text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StringMap<'a>(pub Vec<(Text<'a>, Text<'a>)>);

/// One impression of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Impression<'a> {
    pub impression_id: Text<'a>,
    pub feature: Text<'a>,
    /// Client time corrected for skew, never after arrival.
    pub time_ms: i64,
    pub client_time_ms: Option<i64>,
    pub args: StringMap<'a>,
    pub outputs: StringMap<'a>,
    pub variants: Vec<Text<'a>>,
}

/// One event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    pub event_id: Text<'a>,
    pub name: Text<'a>,
    pub time_ms: i64,
    pub client_time_ms: Option<i64>,
    pub impression_id: Option<Text<'a>>,
    /// The feature of the impression the event refers to, when the client sent it.
    pub feature: Option<Text<'a>>,
    pub fields: StringMap<'a>,
}

/// Device id sources other than the body.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceIdSources<'a> {
    pub header: Option<&'a str>,
    pub query: Option<&'a str>,
}

// The body as sent. Unknown fields are rejected, so that a misspelt field is not dropped unseen.

#[derive(Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BatchBody<'a> {
    #[serde(borrow)]
    device_id: Option<BodyText<'a>>,
    #[serde(borrow)]
    session_key: Option<BodyText<'a>>,
    sent_at: Option<Timestamp>,
    #[serde(borrow)]
    context: Option<Object<ContextBody<'a>>>,
    #[serde(borrow)]
    args: Option<MapEntries<'a>>,
    #[serde(borrow)]
    impressions: Option<Vec<Object<ImpressionBody<'a>>>>,
    #[serde(borrow)]
    events: Option<Vec<Object<EventBody<'a>>>>,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ImpressionBody<'a> {
    #[serde(borrow)]
    impression_id: BodyText<'a>,
    #[serde(borrow)]
    feature: BodyText<'a>,
    time: Option<Timestamp>,
    #[serde(borrow)]
    args: Option<MapEntries<'a>>,
    #[serde(borrow)]
    outputs: Option<MapEntries<'a>>,
    #[serde(borrow)]
    variants: Option<Vec<BodyText<'a>>>,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EventBody<'a> {
    #[serde(borrow)]
    event_id: BodyText<'a>,
    #[serde(borrow)]
    name: BodyText<'a>,
    time: Option<Timestamp>,
    #[serde(borrow)]
    impression_id: Option<BodyText<'a>>,
    #[serde(borrow)]
    feature: Option<BodyText<'a>>,
    #[serde(borrow)]
    fields: Option<MapEntries<'a>>,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ContextBody<'a> {
    #[serde(borrow)]
    entry_url: Option<BodyText<'a>>,
    #[serde(borrow)]
    referrer: Option<BodyText<'a>>,
    #[serde(borrow)]
    user_agent: Option<BodyText<'a>>,
    #[serde(borrow)]
    client_type: Option<BodyText<'a>>,
}

/// A value that must be a JSON object. serde would also read a struct from an array of its
/// fields in order, which a client never means.
#[derive(Debug, PartialEq)]
struct Object<T>(T);

/// A time as milliseconds since the Unix epoch or as an RFC 3339 string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timestamp(i64);

/// The entries of a JSON object as the body has them, a key possibly more than once. Building
/// the batch turns them into a [`StringMap`], where a repeated key keeps its last value, as
/// `JSON.parse` does.
#[derive(Debug, PartialEq)]
struct MapEntries<'a>(Vec<(Text<'a>, Text<'a>)>);

/// Largest item map whose keys are compared pair by pair for repeats. A larger one is sorted.
const PAIRWISE_KEYS: usize = 8;

// === impl Batch ===

impl<'a> Batch<'a> {
    /// Parses and validates a request body received at `received_ms`, with the default limits.
    pub fn parse(
        body: &'a [u8],
        device_ids: DeviceIdSources<'_>,
        received_ms: i64,
    ) -> Result<Self, BatchError> {
        Self::parse_with(body, device_ids, received_ms, &BatchLimits::default())
    }

    /// Parses and validates a request body received at `received_ms`, within `limits`.
    pub fn parse_with(
        body: &'a [u8],
        device_ids: DeviceIdSources<'_>,
        received_ms: i64,
        limits: &BatchLimits,
    ) -> Result<Self, BatchError> {
        // The batch's own structure nests `BATCH_DEPTH` levels, so under any limit of at least
        // that only an object or array inside a map value can nest deeper. A body is
        // scanned for depth only when it has such a value or fails to parse, so that a deep
        // body is reported by its depth whatever else is wrong with it.
        let batch = match Self::parse_unchecked(body, device_ids, received_ms) {
            Ok(batch) => batch,
            Err(err) => {
                check_depth(body, limits.max_json_depth)?;
                return Err(err);
            }
        };
        if limits.max_json_depth < BATCH_DEPTH || has_nested_values(&batch) {
            check_depth(body, limits.max_json_depth)?;
        }
        check_batch(&batch, limits)?;
        Ok(batch)
    }

    fn parse_unchecked(
        body: &'a [u8],
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
        let device_id = resolve_device_id(text(&parsed.device_id), device_ids)?;

        let session_key = parsed.session_key.map(|key| key.0);
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
        for (index, Object(item)) in impressions.into_iter().enumerate() {
            require_text(&item.impression_id.0, || {
                format!("impressions[{index}].impressionId")
            })?;
            require_text(&item.feature.0, || format!("impressions[{index}].feature"))?;
            let (time_ms, client_time_ms) = correct(item.time);
            stored_impressions.push(Impression {
                impression_id: item.impression_id.0,
                feature: item.feature.0,
                time_ms,
                client_time_ms,
                args: item.args.map(MapEntries::into_item_map).unwrap_or_default(),
                outputs: item
                    .outputs
                    .map(MapEntries::into_item_map)
                    .unwrap_or_default(),
                variants: item
                    .variants
                    .map(|variants| variants.into_iter().map(|variant| variant.0).collect())
                    .unwrap_or_default(),
            });
        }

        let events = parsed.events.unwrap_or_default();
        let mut stored_events = Vec::with_capacity(events.len());
        for (index, Object(item)) in events.into_iter().enumerate() {
            require_text(&item.event_id.0, || format!("events[{index}].eventId"))?;
            require_text(&item.name.0, || format!("events[{index}].name"))?;
            let (time_ms, client_time_ms) = correct(item.time);
            stored_events.push(Event {
                event_id: item.event_id.0,
                name: item.name.0,
                time_ms,
                client_time_ms,
                impression_id: item
                    .impression_id
                    .map(|id| id.0)
                    .filter(|id| !id.is_empty()),
                feature: item
                    .feature
                    .map(|feature| feature.0)
                    .filter(|feature| !feature.is_empty()),
                fields: item
                    .fields
                    .map(MapEntries::into_item_map)
                    .unwrap_or_default(),
            });
        }

        Ok(Batch {
            device_id,
            session_key,
            received_ms,
            context: parsed
                .context
                .map(|Object(context)| context.into_context())
                .unwrap_or_default(),
            // The session merges later batches' args into these by binary search.
            args: parsed
                .args
                .map(MapEntries::into_sorted_map)
                .unwrap_or_default(),
            impressions: stored_impressions,
            events: stored_events,
        })
    }
}

/// Deserializes the body: with the parser for the common shape, then with serde where that one
/// gives up. Tracking the JSON path costs an allocation per object key, so it is done only for
/// a body that failed, by parsing it a third time to name the field.
fn parse_body(body: &[u8]) -> Result<BatchBody<'_>, BatchError> {
    // UTF-8 is checked once for the whole body, so the parser need not check every string.
    // `from_str` also rejects anything after the object, as the second parse does below.
    if let Ok(text) = std::str::from_utf8(body) {
        if let Some(parsed) = fast::parse(text) {
            return Ok(parsed);
        }
        if let Ok(parsed) = serde_json::from_str(text) {
            return Ok(parsed);
        }
    }

    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed: BatchBody<'_> =
        serde_path_to_error::deserialize(&mut deserializer).map_err(from_json_error)?;
    // Anything after the object, such as a second object, is an error, not silently dropped.
    deserializer.end().map_err(|err| BatchError {
        kind: BatchErrorKind::InvalidJson,
        field: ROOT_FIELD.to_owned(),
        message: err.to_string(),
    })?;
    Ok(parsed)
}

fn text<'t>(value: &'t Option<BodyText<'_>>) -> Option<&'t str> {
    value.as_ref().map(|value| &*value.0)
}

impl<'a> ContextBody<'a> {
    fn into_context(self) -> Context<'a> {
        Context {
            entry_url: self.entry_url.map(|text| text.0),
            referrer: self.referrer.map(|text| text.0),
            user_agent: self.user_agent.map(|text| text.0),
            client_type: self.client_type.map(|text| text.0),
        }
    }
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

    // A key that failed to parse shows as `?`, and the error belongs to the object around it.
    if let Some(parent) = field.strip_suffix(".?") {
        field = parent.to_owned();
    }
    // serde reports a missing or repeated field at its parent, so name the field itself.
    if let Some(named) = ["missing field `", "duplicate field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next())
    {
        field = if field == "." {
            named.to_owned()
        } else {
            format!("{field}.{named}")
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

// === impl Context ===

impl Context<'_> {
    /// Returns the context with every string owned, to outlive the request body.
    pub fn into_owned(self) -> Context<'static> {
        Context {
            entry_url: self.entry_url.map(owned),
            referrer: self.referrer.map(owned),
            user_agent: self.user_agent.map(owned),
            client_type: self.client_type.map(owned),
        }
    }
}

/// Returns `text` as an owned string of exactly its length, to keep in a session.
pub fn owned(text: Text<'_>) -> Text<'static> {
    Cow::Owned(match text {
        Cow::Borrowed(text) => text.to_owned(),
        // A number's text is written into a larger buffer, so keep only its length.
        Cow::Owned(text) => text.into_boxed_str().into_string(),
    })
}

// === impl StringMap ===

impl StringMap<'_> {
    /// Returns the estimated heap bytes of the map's entries.
    pub fn heap_bytes(&self) -> usize {
        let entries = self.0.capacity() * std::mem::size_of::<(Text<'_>, Text<'_>)>();
        entries
            + self
                .0
                .iter()
                .map(|(key, value)| key.len() + value.len())
                .sum::<usize>()
    }

    /// Returns the value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| &**v)
    }
}

// === impl MapEntries ===

impl<'a> MapEntries<'a> {
    /// Returns the entries as an item's map: each key once, in no particular order, since an
    /// Avro map has none. A few keys are compared pair by pair, which costs less than sorting
    /// them when no key repeats.
    fn into_item_map(self) -> StringMap<'a> {
        if self.0.len() > PAIRWISE_KEYS || self.has_repeated_key() {
            return self.into_sorted_map();
        }
        StringMap(self.0)
    }

    /// Returns whether a key appears more than once, comparing every pair of entries.
    fn has_repeated_key(&self) -> bool {
        let entries = &self.0;
        (1..entries.len()).any(|later| {
            let key = &entries[later].0;
            entries[..later].iter().any(|(earlier, _)| earlier == key)
        })
    }

    /// Returns the entries sorted by key, each key once.
    fn into_sorted_map(mut self) -> StringMap<'a> {
        // The sort is stable, so the last of equal keys is the last of its run, and `dedup_by`
        // keeps the first of a run.
        self.0.sort_by(|a, b| a.0.cmp(&b.0));
        self.0.dedup_by(|later, kept| {
            if later.0 != kept.0 {
                return false;
            }
            std::mem::swap(&mut later.1, &mut kept.1);
            true
        });
        StringMap(self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for MapEntries<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(MapEntriesVisitor)
    }
}

struct MapEntriesVisitor;

impl<'de> Visitor<'de> for MapEntriesVisitor {
    type Value = MapEntries<'de>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<MapEntries<'de>, A::Error> {
        let mut entries: Vec<(Text<'de>, Text<'de>)> =
            Vec::with_capacity(access.size_hint().unwrap_or(0).min(64));
        while let Some((BodyText(key), ValueText(text))) =
            access.next_entry::<BodyText<'de>, ValueText<'de>>()?
        {
            entries.push((key, text));
        }
        Ok(MapEntries(entries))
    }
}

/// A string of the body, borrowed where it has no escapes. (`Cow`'s own `Deserialize` always
/// copies, and serde borrows into a `Cow` only when it is a field's whole type.)
#[derive(Debug, PartialEq)]
struct BodyText<'a>(Text<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for BodyText<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(BodyTextVisitor)
    }
}

struct BodyTextVisitor;

impl<'de> Visitor<'de> for BodyTextVisitor {
    type Value = BodyText<'de>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<BodyText<'de>, E> {
        Ok(BodyText(Cow::Borrowed(text)))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<BodyText<'de>, E> {
        Ok(BodyText(Cow::Owned(text.to_owned())))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<BodyText<'de>, E> {
        Ok(BodyText(Cow::Owned(text)))
    }
}

/// One value of a [`StringMap`] as its stored text. Strings borrow from the body, other scalars
/// become text, and objects and arrays are built as a [`serde_json::Value`] and written back as
/// compact JSON.
struct ValueText<'a>(Text<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for ValueText<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueTextVisitor)
    }
}

struct ValueTextVisitor;

impl<'de> Visitor<'de> for ValueTextVisitor {
    type Value = ValueText<'de>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<ValueText<'de>, E> {
        Ok(ValueText(Cow::Borrowed(text)))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<ValueText<'de>, E> {
        Ok(ValueText(Cow::Owned(text.to_owned())))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<ValueText<'de>, E> {
        Ok(ValueText(Cow::Owned(text)))
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<ValueText<'de>, E> {
        Ok(ValueText(Cow::Borrowed(if value {
            "true"
        } else {
            "false"
        })))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<ValueText<'de>, E> {
        number_text(value)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<ValueText<'de>, E> {
        number_text(value)
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<ValueText<'de>, E> {
        number_text(value)
    }

    fn visit_unit<E: de::Error>(self) -> Result<ValueText<'de>, E> {
        Ok(ValueText(Cow::Borrowed("null")))
    }

    fn visit_map<A: MapAccess<'de>>(self, access: A) -> Result<ValueText<'de>, A::Error> {
        let value = serde_json::Value::deserialize(de::value::MapAccessDeserializer::new(access))?;
        Ok(ValueText(Cow::Owned(value.to_string())))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, access: A) -> Result<ValueText<'de>, A::Error> {
        let value = serde_json::Value::deserialize(de::value::SeqAccessDeserializer::new(access))?;
        Ok(ValueText(Cow::Owned(value.to_string())))
    }
}

/// Writes a number as serde_json writes it, which is what `Value::to_string` gives, without
/// going through `core::fmt`.
fn number_text<'de, E: de::Error>(value: impl serde::Serialize) -> Result<ValueText<'de>, E> {
    serde_json::to_string(&value)
        .map(|text| ValueText(Cow::Owned(text)))
        .map_err(E::custom)
}

// === impl Object ===

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ObjectVisitor(std::marker::PhantomData))
    }
}

struct ObjectVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = Object<T>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, access: A) -> Result<Object<T>, A::Error> {
        T::deserialize(de::value::MapAccessDeserializer::new(access)).map(Object)
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
        // A year-9999 time with a negative offset is later than 9999 in UTC.
        if ms > MAX_TIME_MS {
            return Err(E::custom("time is after the year 9999"));
        }
        Ok(Timestamp(ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECEIVED_MS: i64 = 1_733_310_010_000;

    fn parse(body: &str) -> Result<Batch<'_>, BatchError> {
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
    fn time_after_9999_by_offset_is_rejected() {
        let item = r#"{"deviceId": "d", "impressions": [{"impressionId": "i", "feature": "f",
                       "time": "9999-12-31T23:59:59.999-00:01"}]}"#;
        let err = parse(item).unwrap_err();
        assert_eq!(err.field, "impressions[0].time");
        assert!(
            err.message.contains("after the year 9999"),
            "{}",
            err.message
        );

        let sent_at = r#"{"deviceId": "d", "sentAt": "9999-12-31T23:59:59-01:00"}"#;
        assert_eq!(parse(sent_at).unwrap_err().field, "sentAt");
    }

    #[test]
    fn array_for_object_is_rejected() {
        for (body, field) in [
            (
                r#"{"deviceId": "d", "impressions": [["i", "f", null, null, null, null]]}"#,
                "impressions[0]",
            ),
            (
                r#"{"deviceId": "d", "events": [["e", "n", null, null, null, null]]}"#,
                "events[0]",
            ),
            (
                r#"{"deviceId": "d", "context": ["u", null, null, null]}"#,
                "context",
            ),
        ] {
            let err = parse(body).unwrap_err();
            assert_eq!(err.field, field, "{body}");
            assert!(err.message.contains("a JSON object"), "{}", err.message);
        }
    }

    #[test]
    fn repeated_field_is_named() {
        let top = parse(r#"{"deviceId": "d", "deviceId": "d"}"#).unwrap_err();
        assert_eq!(top.field, "deviceId");
        let nested = parse(r#"{"deviceId": "d", "context": {"entryUrl": "u", "entryUrl": "v"}}"#)
            .unwrap_err();
        assert_eq!(nested.field, "context.entryUrl");
    }

    #[test]
    fn bad_map_value_names_map() {
        let err = parse(r#"{"deviceId": "d", "args": {"a": 0x10}}"#).unwrap_err();
        assert!(err.field.starts_with("args"), "{}", err.field);
        assert!(!err.field.contains('?'), "{}", err.field);
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
    fn repeated_item_map_key_keeps_last_value() {
        let few = r#""a": "1", "b": "2", "a": "3""#;
        let many = r#""a": "1", "b": "2", "c": "3", "d": "4", "e": "5", "f": "6", "g": "7", "h": "8", "a": "9""#;
        for (entries, keys, last) in [(few, 2, "3"), (many, 8, "9")] {
            let body = format!(
                r#"{{"deviceId": "d", "impressions": [{{"impressionId": "i", "feature": "f", "outputs": {{{entries}}}}}], "events": [{{"eventId": "e", "name": "n", "fields": {{{entries}}}}}]}}"#
            );
            let batch = parse(&body).unwrap();
            for map in [&batch.impressions[0].outputs, &batch.events[0].fields] {
                assert_eq!(map.0.len(), keys, "{entries}");
                assert_eq!(map.get("a"), Some(last), "{entries}");
                assert_eq!(map.get("b"), Some("2"), "{entries}");
            }
        }
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
