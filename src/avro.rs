//! The Avro form of a closed session: the schema from `proto/session.avsc` and the encoding.
//!
//! The schema file is compiled in, so the code and the contract cannot drift apart unnoticed.
//! Every record is written through the schema-aware serializer, which rejects a field the
//! schema does not have, and the tests below read records back with the schema.

use std::sync::LazyLock;

use apache_avro::{Codec, DeflateSettings, Schema, ZstandardSettings};
use serde::Serialize;
use serde::ser::{SerializeMap, SerializeStruct, Serializer};

use crate::batch::StringMap;
use crate::config::CodecName;
use crate::session::{CloseReason, ClosedSession};

/// The schema of one session record, as published in `proto/session.avsc`.
pub const SCHEMA_JSON: &str = include_str!("../proto/session.avsc");

/// The parsed session schema.
pub static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    // The file is part of the binary and covered by tests, so a parse failure is a build defect.
    #[expect(
        clippy::expect_used,
        reason = "the compiled-in schema is checked by tests"
    )]
    Schema::parse_str(SCHEMA_JSON).expect("proto/session.avsc is a valid Avro schema")
});

/// A closed session with the server's own fields, ready to encode.
#[derive(Debug, Clone, Copy)]
pub struct SessionRecord<'a> {
    pub session: &'a ClosedSession,
    pub server_id: &'a str,
}

/// Returns the `apache-avro` codec for a configured codec name.
pub fn codec(name: CodecName) -> Codec {
    match name {
        CodecName::Null => Codec::Null,
        CodecName::Deflate => Codec::Deflate(DeflateSettings::default()),
        CodecName::Snappy => Codec::Snappy,
        CodecName::Zstandard => Codec::Zstandard(ZstandardSettings::default()),
    }
}

// === impl SessionRecord ===

impl Serialize for SessionRecord<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let session = self.session;
        let context = &session.context;
        let mut record = serializer.serialize_struct("Session", 17)?;
        record.serialize_field("session_id", &session.session_id.hyphenated().to_string())?;
        record.serialize_field("device_id", &*session.device_id)?;
        record.serialize_field("session_key", &session.session_key.as_deref())?;
        record.serialize_field(
            "previous_session_id",
            &session
                .previous_session_id
                .map(|id| id.hyphenated().to_string()),
        )?;
        record.serialize_field("start_time", &session.start_time_ms)?;
        record.serialize_field("end_time", &session.end_time_ms)?;
        record.serialize_field("closed_at", &session.closed_at_ms)?;
        record.serialize_field("close_reason", &session.close_reason)?;
        record.serialize_field("server_id", self.server_id)?;
        record.serialize_field("ip_address", &session.ip_address.as_deref())?;
        record.serialize_field("user_agent", &context.user_agent.as_deref())?;
        record.serialize_field("entry_url", &context.entry_url.as_deref())?;
        record.serialize_field("referrer", &context.referrer.as_deref())?;
        record.serialize_field("client_type", &context.client_type.as_deref())?;
        record.serialize_field("args", &session.args)?;
        record.serialize_field("impressions", &session.impressions)?;
        record.serialize_field("events", &session.events)?;
        record.end()
    }
}

impl Serialize for CloseReason {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The variant order is the symbol order of the schema's enum.
        let index = *self as u32;
        serializer.serialize_unit_variant("CloseReason", index, self.as_str())
    }
}

impl Serialize for StringMap<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(&**key, &**value)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use apache_avro::{Reader, Writer};
    use proptest::prelude::*;
    use serde_json::{Value, json};
    use uuid::Uuid;

    use super::*;
    use crate::batch::{Context, Event, Impression, Text};
    use crate::items::{Events, Impressions};

    /// A session with the items it was built from, which the expected record is made of.
    #[derive(Debug, Clone)]
    struct Generated {
        session: ClosedSession,
        impressions: Vec<Impression<'static>>,
        events: Vec<Event<'static>>,
    }

    impl Generated {
        fn new(
            mut session: ClosedSession,
            impressions: Vec<Impression<'static>>,
            events: Vec<Event<'static>>,
        ) -> Self {
            session.impressions = impressions.iter().cloned().collect();
            session.events = events.iter().cloned().collect();
            Self {
                session,
                impressions,
                events,
            }
        }
    }

    /// Encodes sessions into an Avro container in memory.
    fn encode(sessions: &[ClosedSession], codec: Codec, marker: Option<[u8; 16]>) -> Vec<u8> {
        let mut writer = Writer::builder()
            .schema(&SCHEMA)
            .writer(Vec::new())
            .codec(codec)
            .maybe_marker(marker)
            .build()
            .unwrap();
        for session in sessions {
            writer
                .append_ser(SessionRecord {
                    session,
                    server_id: "edge-1",
                })
                .unwrap();
        }
        writer.into_inner().unwrap()
    }

    fn decode(bytes: &[u8]) -> Vec<Value> {
        Reader::new(bytes)
            .unwrap()
            .map(|value| Value::try_from(value.unwrap()).unwrap())
            .collect()
    }

    fn map_json(map: &StringMap<'_>) -> Value {
        Value::Object(
            map.0
                .iter()
                .map(|(k, v)| (k.to_string(), json!(&**v)))
                .collect(),
        )
    }

    /// The record a reader must see for `generated`, built independently of the encoder.
    fn expected(generated: &Generated) -> Value {
        let session = &generated.session;
        let reason = session.close_reason.as_str();
        json!({
            "session_id": session.session_id.to_string(),
            "device_id": &*session.device_id,
            "session_key": session.session_key.as_deref(),
            "previous_session_id": session.previous_session_id.map(|id| id.to_string()),
            "start_time": session.start_time_ms,
            "end_time": session.end_time_ms,
            "closed_at": session.closed_at_ms,
            "close_reason": reason,
            "server_id": "edge-1",
            "ip_address": session.ip_address.as_deref(),
            "user_agent": session.context.user_agent.as_deref(),
            "entry_url": session.context.entry_url.as_deref(),
            "referrer": session.context.referrer.as_deref(),
            "client_type": session.context.client_type.as_deref(),
            "args": map_json(&session.args),
            "impressions": generated.impressions.iter().map(|i| json!({
                "impression_id": &*i.impression_id,
                "feature": &*i.feature,
                "time": i.time_ms,
                "client_time": i.client_time_ms,
                "args": map_json(&i.args),
                "outputs": map_json(&i.outputs),
                "variants": i.variants.iter().map(|v| &**v).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "events": generated.events.iter().map(|e| json!({
                "event_id": &*e.event_id,
                "name": &*e.name,
                "time": e.time_ms,
                "client_time": e.client_time_ms,
                "impression_id": e.impression_id.as_deref(),
                "feature": e.feature.as_deref(),
                "fields": map_json(&e.fields),
            })).collect::<Vec<_>>(),
        })
    }

    fn text() -> impl Strategy<Value = Text<'static>> {
        any::<String>().prop_map(Text::Owned)
    }

    fn optional_text() -> impl Strategy<Value = Option<Text<'static>>> {
        proptest::option::of(text())
    }

    fn boxed_text() -> impl Strategy<Value = Option<Box<str>>> {
        proptest::option::of(any::<String>().prop_map(String::into_boxed_str))
    }

    fn string_map() -> impl Strategy<Value = StringMap<'static>> {
        proptest::collection::btree_map(any::<String>(), any::<String>(), 0..4).prop_map(|map| {
            StringMap(
                map.into_iter()
                    .map(|(k, v)| (Text::Owned(k), Text::Owned(v)))
                    .collect(),
            )
        })
    }

    fn time() -> impl Strategy<Value = i64> {
        0..253_402_300_799_999i64
    }

    fn impression() -> impl Strategy<Value = Impression<'static>> {
        (
            text(),
            text(),
            time(),
            proptest::option::of(time()),
            string_map(),
            string_map(),
            proptest::collection::vec(text(), 0..3),
        )
            .prop_map(
                |(impression_id, feature, time_ms, client_time_ms, args, outputs, variants)| {
                    Impression {
                        impression_id,
                        feature,
                        time_ms,
                        client_time_ms,
                        args,
                        outputs,
                        variants,
                    }
                },
            )
    }

    fn event() -> impl Strategy<Value = Event<'static>> {
        (
            text(),
            text(),
            time(),
            proptest::option::of(time()),
            optional_text(),
            optional_text(),
            string_map(),
        )
            .prop_map(
                |(event_id, name, time_ms, client_time_ms, impression_id, feature, fields)| Event {
                    event_id,
                    name,
                    time_ms,
                    client_time_ms,
                    impression_id,
                    feature,
                    fields,
                },
            )
    }

    fn close_reason() -> impl Strategy<Value = CloseReason> {
        prop_oneof![
            Just(CloseReason::Inactivity),
            Just(CloseReason::MaxDuration),
            Just(CloseReason::MaxSize),
            Just(CloseReason::MemoryPressure),
            Just(CloseReason::SessionKeyChanged),
            Just(CloseReason::Shutdown),
            Just(CloseReason::Flush),
        ]
    }

    fn closed_session() -> impl Strategy<Value = Generated> {
        let context = (
            optional_text(),
            optional_text(),
            optional_text(),
            optional_text(),
        )
            .prop_map(|(entry_url, referrer, user_agent, client_type)| Context {
                entry_url,
                referrer,
                user_agent,
                client_type,
            });
        (
            (
                any::<u128>(),
                any::<String>().prop_map(String::into_boxed_str),
                boxed_text(),
                proptest::option::of(any::<u128>()),
            ),
            (time(), time(), time(), close_reason()),
            (boxed_text(), context, string_map()),
            (
                proptest::collection::vec(impression(), 0..4),
                proptest::collection::vec(event(), 0..4),
            ),
        )
            .prop_map(|(ids, times, client, items)| {
                let session = ClosedSession {
                    session_id: Uuid::from_u128(ids.0),
                    device_id: ids.1,
                    session_key: ids.2,
                    previous_session_id: ids.3.map(Uuid::from_u128),
                    start_time_ms: times.0,
                    end_time_ms: times.1,
                    closed_at_ms: times.2,
                    close_reason: times.3,
                    ip_address: client.0,
                    context: client.1,
                    args: client.2,
                    impressions: Impressions::default(),
                    events: Events::default(),
                };
                Generated::new(session, items.0, items.1)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn records_round_trip(sessions in proptest::collection::vec(closed_session(), 1..4)) {
            let closed: Vec<ClosedSession> =
                sessions.iter().map(|generated| generated.session.clone()).collect();
            let bytes = encode(&closed, Codec::Snappy, None);
            let expected: Vec<Value> = sessions.iter().map(expected).collect();
            prop_assert_eq!(decode(&bytes), expected);
        }
    }

    fn golden_session() -> Generated {
        let impression = Impression {
            impression_id: "0b6e".into(),
            feature: "RatingBox".into(),
            time_ms: 1_733_310_000_000,
            client_time_ms: Some(1_733_310_000_500),
            args: StringMap(vec![("product".into(), "shoe-42".into())]),
            outputs: StringMap(vec![("callToAction".into(), "Rate it".into())]),
            variants: vec!["cta-test:B".into()],
        };
        let event = Event {
            event_id: "5c1d".into(),
            name: "Rating".into(),
            time_ms: 1_733_310_004_000,
            client_time_ms: None,
            impression_id: Some("0b6e".into()),
            feature: Some("RatingBox".into()),
            fields: StringMap(vec![("stars".into(), "5".into())]),
        };
        let session = ClosedSession {
            session_id: Uuid::from_u128(0x0193_8c8e_5a00_7000_8000_0000_0000_0001),
            device_id: "d-6f1c2a".into(),
            session_key: Some("tab-1".into()),
            previous_session_id: None,
            start_time_ms: 1_733_310_000_000,
            end_time_ms: 1_733_310_005_000,
            closed_at_ms: 1_733_311_805_000,
            close_reason: CloseReason::Inactivity,
            ip_address: Some("203.0.113.7".into()),
            context: Context {
                entry_url: Some("https://shop.example/p/42".into()),
                referrer: None,
                user_agent: Some("Mozilla/5.0".into()),
                client_type: Some("web".into()),
            },
            args: StringMap(vec![
                ("plan".into(), "pro".into()),
                ("userId".into(), "u-1".into()),
            ]),
            impressions: Impressions::default(),
            events: Events::default(),
        };
        Generated::new(session, vec![impression], vec![event])
    }

    /// The bytes of one record are pinned, so any change to the encoding is a visible diff.
    /// Set `IMPRESSION_SERVER_UPDATE_GOLDEN=1` to rewrite the file after an intended change.
    #[test]
    fn encoding_matches_golden_file() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/session.avro");
        let bytes = encode(&[golden_session().session], Codec::Null, Some([7; 16]));
        if std::env::var_os("IMPRESSION_SERVER_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &bytes).unwrap();
        }
        let golden = std::fs::read(&path).unwrap();
        assert_eq!(
            bytes, golden,
            "encoding differs from tests/golden/session.avro"
        );
        assert_eq!(decode(&golden), vec![expected(&golden_session())]);
    }

    #[test]
    fn schema_file_parses() {
        assert_eq!(
            SCHEMA.name().map(|name| name.fullname(None)),
            Some("impression_server.Session".to_owned())
        );
    }
}
