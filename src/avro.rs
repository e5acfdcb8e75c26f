//! The Avro form of a closed session: the schema from `proto/session.avsc` and the encoding.
//!
//! The schema file is compiled in, so the code and the contract cannot drift apart unnoticed:
//! every record is written through the schema-aware serializer, which rejects a field the
//! schema does not have, and the tests below read records back with the schema.

use std::sync::LazyLock;

use apache_avro::{Codec, DeflateSettings, Schema, ZstandardSettings};
use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq, SerializeStruct, Serializer};

use crate::batch::{Event, Impression, StringMap};
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
        let (index, symbol) = match self {
            CloseReason::Inactivity => (0, "inactivity"),
            CloseReason::MaxDuration => (1, "max_duration"),
            CloseReason::MaxSize => (2, "max_size"),
            CloseReason::MemoryPressure => (3, "memory_pressure"),
            CloseReason::SessionKeyChanged => (4, "session_key_changed"),
            CloseReason::Shutdown => (5, "shutdown"),
            CloseReason::Flush => (6, "flush"),
        };
        serializer.serialize_unit_variant("CloseReason", index, symbol)
    }
}

impl Serialize for Impression {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut record = serializer.serialize_struct("Impression", 7)?;
        record.serialize_field("impression_id", &*self.impression_id)?;
        record.serialize_field("feature", &*self.feature)?;
        record.serialize_field("time", &self.time_ms)?;
        record.serialize_field("client_time", &self.client_time_ms)?;
        record.serialize_field("args", &self.args)?;
        record.serialize_field("outputs", &self.outputs)?;
        record.serialize_field("variants", &StrList(&self.variants))?;
        record.end()
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut record = serializer.serialize_struct("Event", 7)?;
        record.serialize_field("event_id", &*self.event_id)?;
        record.serialize_field("name", &*self.name)?;
        record.serialize_field("time", &self.time_ms)?;
        record.serialize_field("client_time", &self.client_time_ms)?;
        record.serialize_field("impression_id", &self.impression_id.as_deref())?;
        record.serialize_field("feature", &self.feature.as_deref())?;
        record.serialize_field("fields", &self.fields)?;
        record.end()
    }
}

impl Serialize for StringMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(&**key, &**value)?;
        }
        map.end()
    }
}

struct StrList<'a>(&'a [Box<str>]);

impl Serialize for StrList<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for item in self.0 {
            seq.serialize_element(&**item)?;
        }
        seq.end()
    }
}
