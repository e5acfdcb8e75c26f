//! The impressions and events of a session, held as their Avro binary encoding.
//!
//! A session keeps its impressions in one list of byte chunks and its events in another. Each
//! item is stored as the bytes it has inside the `impressions` or `events` array of the session
//! record in `proto/session.avsc`, whole inside one chunk. A few chunks per array cost a few
//! allocations instead of one per string, and a session's memory stays close to its encoded
//! size. A full chunk is never grown: the next item starts a new one, so items are never copied
//! after they are written. The writer reads the items back as borrowed strings and writes them
//! through the schema-aware serializer, so the schema still checks every record.
//!
//! An item is added only after its batch passed validation, and the bytes are read only by this
//! module, so a decoding error means a defect here. It is reported as an error, never a panic.

use std::marker::PhantomData;

use serde::Serialize;
use serde::ser::{Error as _, SerializeMap, SerializeSeq, SerializeStruct, Serializer};

use crate::batch::{Event, Impression, StringMap, Text};

/// Stored items of one kind: each one's Avro encoding, back to back across chunks.
///
/// An item's offset counts the bytes of every item before it, as if the chunks were one buffer.
#[derive(Debug, Clone)]
pub struct Items<K> {
    /// The first chunk, sized for the first batch. Most sessions need no other.
    first: Vec<u8>,
    /// The chunks after the first, boxed so that sessions without them pay one pointer.
    later: Option<Box<LaterChunks>>,
    len: usize,
    kind: PhantomData<K>,
}

/// Chunks after the first, in order.
#[derive(Debug, Clone, Default)]
struct LaterChunks(Vec<Chunk>);

/// A chunk after the first, with the offset of its first byte.
#[derive(Debug, Clone)]
struct Chunk {
    start: usize,
    bytes: Vec<u8>,
}

/// Largest chunk allocated for items smaller than it. Chunks grow with the items stored, like a
/// buffer that doubles, up to this size, so the room left unused in a session's last chunk stays
/// below this size however large the session grows.
const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// The impressions of one session.
pub type Impressions = Items<ImpressionKind>;

/// The events of one session.
pub type Events = Items<EventKind>;

/// A kind of stored item: how its encoding is read back.
pub trait ItemKind {
    /// The item read back, its strings borrowed from the buffer.
    type View<'a>: Serialize;

    /// Reads the item that starts at `*at` in `bytes` and moves `*at` past it.
    fn read<'a>(bytes: &'a [u8], at: &mut usize) -> Result<Self::View<'a>, CorruptItems>;
}

/// The kind of [`Impressions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImpressionKind {}

/// The kind of [`Events`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {}

/// Stored bytes that do not decode as the items written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stored session items are corrupt at byte {at}")]
pub struct CorruptItems {
    at: usize,
}

/// One stored impression, its strings borrowed from the buffer.
#[derive(Debug, Clone, Copy)]
pub struct ImpressionView<'a> {
    pub impression_id: &'a str,
    pub feature: &'a str,
    pub time_ms: i64,
    pub client_time_ms: Option<i64>,
    pub args: MapView<'a>,
    pub outputs: MapView<'a>,
    pub variants: ListView<'a>,
}

/// One stored event, its strings borrowed from the buffer.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    pub event_id: &'a str,
    pub name: &'a str,
    pub time_ms: i64,
    pub client_time_ms: Option<i64>,
    pub impression_id: Option<&'a str>,
    pub feature: Option<&'a str>,
    pub fields: MapView<'a>,
}

/// A stored map of strings: its entry count and the bytes of its entries.
#[derive(Debug, Clone, Copy)]
pub struct MapView<'a> {
    len: usize,
    entries: &'a [u8],
}

/// A stored array of strings: its length and the bytes of its elements.
#[derive(Debug, Clone, Copy)]
pub struct ListView<'a> {
    len: usize,
    elements: &'a [u8],
}

// === impl Items ===

impl<K> Default for Items<K> {
    fn default() -> Self {
        Self {
            first: Vec::new(),
            later: None,
            len: 0,
            kind: PhantomData,
        }
    }
}

/// Equal when they hold the same items, however the items fall into chunks.
impl<K> PartialEq for Items<K> {
    fn eq(&self, other: &Self) -> bool {
        let bytes = |items: &Self| {
            let chunks = items.chunks().map(|(_, bytes)| bytes);
            chunks.flatten().copied().collect::<Vec<u8>>()
        };
        self.len == other.len && bytes(self) == bytes(other)
    }
}

impl<K> Eq for Items<K> {}

impl<K> Items<K> {
    /// Returns the chunks after the first.
    fn later_chunks(&self) -> &[Chunk] {
        self.later.as_deref().map_or(&[], |later| &later.0)
    }

    /// Returns each chunk with the offset of its first byte.
    fn chunks(&self) -> impl Iterator<Item = (usize, &[u8])> {
        let later = self.later_chunks().iter();
        std::iter::once((0, self.first.as_slice()))
            .chain(later.map(|chunk| (chunk.start, chunk.bytes.as_slice())))
    }

    /// Returns the chunk that contains `offset` and the offset of its first byte.
    fn chunk_at(&self, offset: usize) -> (usize, &[u8]) {
        let later = self.later_chunks();
        // The last later chunk that starts at or before `offset`, else the first chunk.
        match later
            .partition_point(|chunk| chunk.start <= offset)
            .checked_sub(1)
        {
            Some(index) => (later[index].start, &later[index].bytes),
            None => (0, &self.first),
        }
    }

    /// Returns the bytes of every item written so far.
    fn written_bytes(&self) -> usize {
        match self.later_chunks().last() {
            Some(chunk) => chunk.start + chunk.bytes.len(),
            None => self.first.len(),
        }
    }

    /// Returns the chunk that the next item goes into.
    fn tail(&mut self) -> &mut Vec<u8> {
        match self.later.as_mut().and_then(|later| later.0.last_mut()) {
            Some(chunk) => &mut chunk.bytes,
            None => &mut self.first,
        }
    }
}

impl<K: ItemKind> Items<K> {
    /// Returns the number of items.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Returns whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Returns the bytes allocated for the items.
    pub fn heap_bytes(&self) -> usize {
        let list = self.later.as_ref().map_or(0, |later| {
            std::mem::size_of::<LaterChunks>() + later.0.capacity() * std::mem::size_of::<Chunk>()
        });
        let chunks: usize = self
            .later_chunks()
            .iter()
            .map(|chunk| chunk.bytes.capacity())
            .sum();
        self.first.capacity() + list + chunks
    }

    /// Returns the id of the item at `offset`, as raw bytes: the id is the first field of both
    /// records.
    pub fn id_at(&self, offset: usize) -> Option<&[u8]> {
        let (start, bytes) = self.chunk_at(offset);
        Reader::at(bytes, offset - start).bytes().ok()
    }

    /// Returns the offset of each item in the order added, stopping at the first that fails.
    pub fn offsets(&self) -> impl Iterator<Item = usize> + '_ {
        self.read_all()
            .map_while(|(start, item)| item.ok().map(|_| start))
    }

    /// Returns every item in the order added, stopping after the first error.
    pub fn iter(&self) -> impl Iterator<Item = Result<K::View<'_>, CorruptItems>> {
        let mut failed = false;
        self.read_all().map_while(move |(_, item)| {
            if failed {
                return None;
            }
            failed = item.is_err();
            Some(item)
        })
    }

    /// Reads the items chunk by chunk, each with its offset. A chunk that ends inside an item
    /// gives an error, and so does a count of items that the chunks do not hold.
    fn read_all(&self) -> impl Iterator<Item = (usize, Result<K::View<'_>, CorruptItems>)> {
        let end = self.written_bytes();
        let mut chunks = self.chunks();
        let mut current = chunks.next();
        let mut at = 0;
        (0..self.len).map(move |_| {
            while current.is_some_and(|(_, bytes)| at >= bytes.len()) {
                current = chunks.next();
                at = 0;
            }
            let Some((start, bytes)) = current else {
                return (end, Err(CorruptItems { at: end }));
            };
            let offset = start + at;
            let item = K::read(bytes, &mut at).map_err(|err| CorruptItems { at: start + err.at });
            (offset, item)
        })
    }

    /// Reserves exactly the bytes that `encode` counts when no item was written yet, so a
    /// session's first batch allocates once. Later batches skip the counting pass: the items
    /// that do not fit start new chunks.
    fn reserve_counted(&mut self, encode: impl FnOnce(&mut Counter)) {
        if self.len > 0 {
            return;
        }
        let mut counter = Counter(0);
        encode(&mut counter);
        self.first.reserve_exact(counter.0);
    }

    /// Appends `item` and returns its offset. An item that does not fit the room left in the
    /// last chunk goes whole into a new chunk.
    fn append(&mut self, item: &impl Encode) -> usize {
        let offset = self.written_bytes();
        self.len += 1;
        let tail = self.tail();
        let filled = tail.len();
        let mut room = Room {
            chunk: tail,
            full: false,
        };
        item.encode(&mut room);
        if !room.full {
            return offset;
        }
        tail.truncate(filled);
        let mut counter = Counter(0);
        item.encode(&mut counter);
        let mut bytes = Vec::with_capacity(counter.0.max(offset.min(MAX_CHUNK_BYTES)));
        item.encode(&mut bytes);
        if offset == 0 {
            self.first = bytes;
        } else {
            let later = self.later.get_or_insert_with(Box::default);
            later.0.push(Chunk {
                start: offset,
                bytes,
            });
        }
        offset
    }
}

impl Items<ImpressionKind> {
    /// Reserves room for `items` when they are the first.
    pub fn reserve_for(&mut self, items: &[Impression<'_>]) {
        self.reserve_counted(|counter| {
            for item in items {
                item.encode(counter);
            }
        });
    }

    /// Appends `item` and returns its offset, which [`id_at`](Self::id_at) takes.
    pub fn push(&mut self, item: &Impression<'_>) -> usize {
        self.append(item)
    }

    /// Returns the feature of the impression at `offset`.
    pub fn feature_at(&self, offset: usize) -> Option<&str> {
        let (start, bytes) = self.chunk_at(offset);
        let mut reader = Reader::at(bytes, offset - start);
        reader.bytes().ok()?;
        reader.text().ok()
    }
}

impl Items<EventKind> {
    /// Reserves room for `items` when they are the first, each with the feature that `feature`
    /// gives it, as [`push`](Self::push) will store it.
    pub fn reserve_for<'f>(
        &mut self,
        items: &[Event<'_>],
        feature: impl Fn(&Event<'_>) -> Option<&'f str>,
    ) {
        self.reserve_counted(|counter| {
            for item in items {
                EventWithFeature(item, feature(item)).encode(counter);
            }
        });
    }

    /// Appends `item`, with `feature` where the event names none, and returns its offset.
    pub fn push(&mut self, item: &Event<'_>, feature: Option<&str>) -> usize {
        self.append(&EventWithFeature(item, feature))
    }
}

impl<'a> FromIterator<Impression<'a>> for Impressions {
    fn from_iter<I: IntoIterator<Item = Impression<'a>>>(items: I) -> Self {
        let mut impressions = Self::default();
        for item in items {
            impressions.push(&item);
        }
        impressions
    }
}

impl<'a> FromIterator<Event<'a>> for Events {
    fn from_iter<I: IntoIterator<Item = Event<'a>>>(items: I) -> Self {
        let mut events = Self::default();
        for item in items {
            events.push(&item, None);
        }
        events
    }
}

impl ItemKind for ImpressionKind {
    type View<'a> = ImpressionView<'a>;

    fn read<'a>(bytes: &'a [u8], at: &mut usize) -> Result<ImpressionView<'a>, CorruptItems> {
        let mut reader = Reader::at(bytes, *at);
        let view = reader.impression()?;
        *at = reader.at;
        Ok(view)
    }
}

impl ItemKind for EventKind {
    type View<'a> = EventView<'a>;

    fn read<'a>(bytes: &'a [u8], at: &mut usize) -> Result<EventView<'a>, CorruptItems> {
        let mut reader = Reader::at(bytes, *at);
        let view = reader.event()?;
        *at = reader.at;
        Ok(view)
    }
}

// === impl MapView and ListView ===

impl<'a> MapView<'a> {
    /// Returns the number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Returns whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Returns the entries in stored order, which is sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = Result<(&'a str, &'a str), CorruptItems>> + 'a {
        let mut reader = Reader::at(self.entries, 0);
        (0..self.len).map(move |_| Ok((reader.text()?, reader.text()?)))
    }
}

impl<'a> ListView<'a> {
    /// Returns the number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Returns whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Returns the elements in order.
    pub fn iter(&self) -> impl Iterator<Item = Result<&'a str, CorruptItems>> + 'a {
        let mut reader = Reader::at(self.elements, 0);
        (0..self.len).map(move |_| reader.text())
    }
}

// === Encoding ===

/// A destination for encoded bytes: a buffer, or a counter that only adds up their length.
trait Output {
    fn put(&mut self, bytes: &[u8]);

    /// Writes one byte. Most Avro `long`s here are one byte: lengths, counts, union branches.
    /// Writing them a byte at a time avoids a call to copy a slice for each.
    fn put_byte(&mut self, byte: u8);
}

impl Output for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }

    fn put_byte(&mut self, byte: u8) {
        self.push(byte);
    }
}

struct Counter(usize);

impl Output for Counter {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }

    fn put_byte(&mut self, _byte: u8) {
        self.0 += 1;
    }
}

/// Writes into the room left in a chunk and notes when bytes do not fit, so that the chunk is
/// never reallocated.
struct Room<'a> {
    chunk: &'a mut Vec<u8>,
    full: bool,
}

impl Output for Room<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if self.full || self.chunk.capacity() - self.chunk.len() < bytes.len() {
            self.full = true;
        } else {
            self.chunk.extend_from_slice(bytes);
        }
    }

    fn put_byte(&mut self, byte: u8) {
        if self.full || self.chunk.len() == self.chunk.capacity() {
            self.full = true;
        } else {
            self.chunk.push(byte);
        }
    }
}

/// An item that writes its Avro encoding.
trait Encode {
    fn encode(&self, out: &mut impl Output);
}

impl Encode for Impression<'_> {
    fn encode(&self, out: &mut impl Output) {
        put_impression(out, self);
    }
}

/// An event and the feature it takes where it names none.
struct EventWithFeature<'a, 'b>(&'a Event<'b>, Option<&'a str>);

impl Encode for EventWithFeature<'_, '_> {
    fn encode(&self, out: &mut impl Output) {
        put_event(out, self.0, self.1);
    }
}

/// Writes an Avro `long`: zig-zag, then 7 bits a byte, low bits first.
fn put_long(out: &mut impl Output, value: i64) {
    let mut rest = ((value << 1) ^ (value >> 63)) as u64;
    while rest >= 0x80 {
        out.put_byte((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.put_byte(rest as u8);
}

fn put_len(out: &mut impl Output, len: usize) {
    put_long(out, i64::try_from(len).unwrap_or(i64::MAX));
}

fn put_text(out: &mut impl Output, text: &str) {
    put_len(out, text.len());
    out.put(text.as_bytes());
}

/// Writes a `["null", "long"]` union.
fn put_optional_long(out: &mut impl Output, value: Option<i64>) {
    match value {
        None => put_long(out, 0),
        Some(value) => {
            put_long(out, 1);
            put_long(out, value);
        }
    }
}

/// Writes a `["null", "string"]` union.
fn put_optional_text(out: &mut impl Output, text: Option<&str>) {
    match text {
        None => put_long(out, 0),
        Some(text) => {
            put_long(out, 1);
            put_text(out, text);
        }
    }
}

/// Writes a map of strings as one block followed by the empty block that ends it.
fn put_map(out: &mut impl Output, map: &StringMap<'_>) {
    if !map.0.is_empty() {
        put_len(out, map.0.len());
        for (key, value) in &map.0 {
            put_text(out, key);
            put_text(out, value);
        }
    }
    put_long(out, 0);
}

/// Writes an array of strings as one block followed by the empty block that ends it.
fn put_list(out: &mut impl Output, list: &[Text<'_>]) {
    if !list.is_empty() {
        put_len(out, list.len());
        for text in list {
            put_text(out, text);
        }
    }
    put_long(out, 0);
}

/// Writes an `Impression` record; the id comes first, as [`Items::id_at`] expects.
fn put_impression(out: &mut impl Output, item: &Impression<'_>) {
    put_text(out, &item.impression_id);
    put_text(out, &item.feature);
    put_long(out, item.time_ms);
    put_optional_long(out, item.client_time_ms);
    put_map(out, &item.args);
    put_map(out, &item.outputs);
    put_list(out, &item.variants);
}

/// Writes an `Event` record; the id comes first, as [`Items::id_at`] expects.
fn put_event(out: &mut impl Output, item: &Event<'_>, feature: Option<&str>) {
    put_text(out, &item.event_id);
    put_text(out, &item.name);
    put_long(out, item.time_ms);
    put_optional_long(out, item.client_time_ms);
    put_optional_text(out, item.impression_id.as_deref());
    put_optional_text(out, item.feature.as_deref().or(feature));
    put_map(out, &item.fields);
}

// === Decoding ===

/// A cursor over bytes that the functions above wrote.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn at(bytes: &'a [u8], at: usize) -> Self {
        Self { bytes, at }
    }

    fn corrupt(&self) -> CorruptItems {
        CorruptItems { at: self.at }
    }

    fn long(&mut self) -> Result<i64, CorruptItems> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = *self.bytes.get(self.at).ok_or_else(|| self.corrupt())?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        Err(self.corrupt())
    }

    fn len(&mut self) -> Result<usize, CorruptItems> {
        let value = self.long()?;
        usize::try_from(value).map_err(|_| self.corrupt())
    }

    fn bytes(&mut self) -> Result<&'a [u8], CorruptItems> {
        let len = self.len()?;
        let end = self.at.checked_add(len).ok_or_else(|| self.corrupt())?;
        let bytes = self.bytes.get(self.at..end).ok_or_else(|| self.corrupt())?;
        self.at = end;
        Ok(bytes)
    }

    fn text(&mut self) -> Result<&'a str, CorruptItems> {
        let at = self.at;
        let bytes = self.bytes()?;
        std::str::from_utf8(bytes).map_err(|_| CorruptItems { at })
    }

    fn optional_long(&mut self) -> Result<Option<i64>, CorruptItems> {
        match self.long()? {
            0 => Ok(None),
            1 => self.long().map(Some),
            _ => Err(self.corrupt()),
        }
    }

    fn optional_text(&mut self) -> Result<Option<&'a str>, CorruptItems> {
        match self.long()? {
            0 => Ok(None),
            1 => self.text().map(Some),
            _ => Err(self.corrupt()),
        }
    }

    /// Reads one block of entries of `strings_per_entry` strings each, and the empty block that
    /// ends it. Returns the entry count and the bytes of the entries.
    fn block(&mut self, strings_per_entry: usize) -> Result<(usize, &'a [u8]), CorruptItems> {
        let len = self.len()?;
        let start = self.at;
        if len > 0 {
            for _ in 0..len * strings_per_entry {
                self.bytes()?;
            }
            if self.long()? != 0 {
                return Err(self.corrupt());
            }
        }
        Ok((len, &self.bytes[start..self.at]))
    }

    fn map(&mut self) -> Result<MapView<'a>, CorruptItems> {
        let (len, entries) = self.block(2)?;
        Ok(MapView { len, entries })
    }

    fn list(&mut self) -> Result<ListView<'a>, CorruptItems> {
        let (len, elements) = self.block(1)?;
        Ok(ListView { len, elements })
    }

    fn impression(&mut self) -> Result<ImpressionView<'a>, CorruptItems> {
        Ok(ImpressionView {
            impression_id: self.text()?,
            feature: self.text()?,
            time_ms: self.long()?,
            client_time_ms: self.optional_long()?,
            args: self.map()?,
            outputs: self.map()?,
            variants: self.list()?,
        })
    }

    fn event(&mut self) -> Result<EventView<'a>, CorruptItems> {
        Ok(EventView {
            event_id: self.text()?,
            name: self.text()?,
            time_ms: self.long()?,
            client_time_ms: self.optional_long()?,
            impression_id: self.optional_text()?,
            feature: self.optional_text()?,
            fields: self.map()?,
        })
    }
}

// === Serialization for the Avro writer ===

impl<K: ItemKind> Serialize for Items<K> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.len()))?;
        for item in self.iter() {
            seq.serialize_element(&item.map_err(S::Error::custom)?)?;
        }
        seq.end()
    }
}

impl Serialize for ImpressionView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut record = serializer.serialize_struct("Impression", 7)?;
        record.serialize_field("impression_id", self.impression_id)?;
        record.serialize_field("feature", self.feature)?;
        record.serialize_field("time", &self.time_ms)?;
        record.serialize_field("client_time", &self.client_time_ms)?;
        record.serialize_field("args", &self.args)?;
        record.serialize_field("outputs", &self.outputs)?;
        record.serialize_field("variants", &self.variants)?;
        record.end()
    }
}

impl Serialize for EventView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut record = serializer.serialize_struct("Event", 7)?;
        record.serialize_field("event_id", self.event_id)?;
        record.serialize_field("name", self.name)?;
        record.serialize_field("time", &self.time_ms)?;
        record.serialize_field("client_time", &self.client_time_ms)?;
        record.serialize_field("impression_id", &self.impression_id)?;
        record.serialize_field("feature", &self.feature)?;
        record.serialize_field("fields", &self.fields)?;
        record.end()
    }
}

impl Serialize for MapView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len))?;
        for entry in self.iter() {
            let (key, value) = entry.map_err(S::Error::custom)?;
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

impl Serialize for ListView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.len))?;
        for element in self.iter() {
            seq.serialize_element(element.map_err(S::Error::custom)?)?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    fn impression(id: &str, args: &[(&'static str, &'static str)]) -> Impression<'static> {
        Impression {
            impression_id: Cow::Owned(id.to_owned()),
            feature: "Box".into(),
            time_ms: -5,
            client_time_ms: Some(1_733_310_000_000),
            args: StringMap(
                args.iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            ),
            outputs: StringMap::default(),
            variants: vec!["cta:A".into(), "layout:2".into()],
        }
    }

    /// Returns a click on impression `a` that names no feature.
    fn click_on_a() -> Event<'static> {
        Event {
            event_id: "e".into(),
            name: "Click".into(),
            time_ms: 1,
            client_time_ms: None,
            impression_id: Some("a".into()),
            feature: None,
            fields: StringMap::default(),
        }
    }

    #[test]
    fn impressions_read_back_as_written() {
        let mut stored = Impressions::default();
        stored.reserve_for(&[impression("a", &[("k", "v")]), impression("é", &[])]);
        let reserved = stored.heap_bytes();
        let first = stored.push(&impression("a", &[("k", "v"), ("l", "w")]));
        let second = stored.push(&impression("é", &[]));
        assert_eq!(stored.len(), 2);
        assert_eq!(stored.id_at(first), Some(&b"a"[..]));
        assert_eq!(stored.id_at(second), Some("é".as_bytes()));
        assert_eq!(stored.feature_at(second), Some("Box"));
        assert!(stored.heap_bytes() >= reserved);

        let views: Vec<ImpressionView<'_>> = stored.iter().map(Result::unwrap).collect();
        assert_eq!(views[0].impression_id, "a");
        assert_eq!(views[0].time_ms, -5);
        assert_eq!(views[0].client_time_ms, Some(1_733_310_000_000));
        let args: Vec<(&str, &str)> = views[0].args.iter().map(Result::unwrap).collect();
        assert_eq!(args, [("k", "v"), ("l", "w")]);
        assert!(views[1].args.is_empty());
        let variants: Vec<&str> = views[1].variants.iter().map(Result::unwrap).collect();
        assert_eq!(variants, ["cta:A", "layout:2"]);
    }

    #[test]
    fn first_batch_is_reserved_exactly() {
        let items = [impression("a", &[("k", "v")]), impression("b", &[])];
        let mut stored = Impressions::default();
        stored.reserve_for(&items);
        for item in &items {
            stored.push(item);
        }
        assert_eq!(stored.heap_bytes(), stored.first.len());
        assert!(stored.later.is_none());
    }

    #[test]
    fn first_events_are_reserved_with_features() {
        let events = [click_on_a(), click_on_a()];
        let mut stored = Events::default();
        stored.reserve_for(&events, |_| Some("Box"));
        for event in &events {
            stored.push(event, Some("Box"));
        }
        assert!(stored.later.is_none());
        assert_eq!(stored.heap_bytes(), stored.first.len());
    }

    #[test]
    fn event_feature_fills_only_missing() {
        let mut event = click_on_a();
        let mut stored = Events::default();
        stored.push(&event, Some("Box"));
        event.feature = Some("Own".into());
        stored.push(&event, Some("Box"));
        let features: Vec<Option<&str>> = stored.iter().map(|view| view.unwrap().feature).collect();
        assert_eq!(features, [Some("Box"), Some("Own")]);
    }

    #[test]
    fn longs_use_zigzag_varints() {
        for (value, encoded) in [
            (0i64, &[0u8][..]),
            (-1, &[1]),
            (1, &[2]),
            (-64, &[0x7f]),
            (64, &[0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            put_long(&mut out, value);
            assert_eq!(out, encoded, "{value}");
            assert_eq!(Reader::at(&out, 0).long(), Ok(value));
        }
        for value in [i64::MIN, i64::MAX] {
            let mut out = Vec::new();
            put_long(&mut out, value);
            assert_eq!(Reader::at(&out, 0).long(), Ok(value));
        }
    }

    #[test]
    fn truncated_bytes_give_errors() {
        let mut stored = Impressions::default();
        stored.push(&impression("a", &[("k", "v")]));
        let full = stored.first.clone();
        for cut in 0..full.len() {
            stored.first = full[..cut].to_vec();
            assert!(stored.iter().any(|item| item.is_err()), "cut at {cut}");
        }
    }

    #[test]
    fn later_items_start_new_chunks() {
        let ids: Vec<String> = (0..300).map(|n| format!("i-{n}")).collect();
        let items: Vec<Impression<'_>> = ids.iter().map(|id| impression(id, &[])).collect();
        let mut stored = Impressions::default();
        stored.reserve_for(&items[..2]);
        let mut offsets = Vec::new();
        let mut chunk_addresses = Vec::new();
        for item in &items {
            offsets.push(stored.push(item));
            chunk_addresses.push(stored.tail().as_ptr());
        }
        let later = stored.later.as_ref().unwrap();
        assert!(later.0.len() > 2, "{} later chunks", later.0.len());

        // Chunks were never reallocated: every chunk still has the address it had when its
        // items were written.
        let addresses: Vec<*const u8> = stored.chunks().map(|(_, bytes)| bytes.as_ptr()).collect();
        assert!(
            chunk_addresses
                .iter()
                .all(|address| addresses.contains(address))
        );
        assert_eq!(stored.offsets().collect::<Vec<_>>(), offsets);
        for (id, &offset) in ids.iter().zip(&offsets) {
            assert_eq!(stored.id_at(offset), Some(id.as_bytes()));
            assert_eq!(stored.feature_at(offset), Some("Box"));
        }
        let read: Vec<&str> = stored
            .iter()
            .map(|item| item.unwrap().impression_id)
            .collect();
        assert_eq!(read, ids);

        // The same items in one chunk are equal. The room left is at most what was written.
        let whole: Impressions = items.iter().cloned().collect();
        let mut exact = Impressions::default();
        exact.reserve_for(&items);
        items.iter().for_each(|item| _ = exact.push(item));
        assert!(exact.later.is_none());
        assert_eq!(stored, exact);
        assert_eq!(whole, exact);
        let written = exact.first.len();
        assert!(
            stored.heap_bytes() <= 2 * written + 1024,
            "{}",
            stored.heap_bytes()
        );
    }

    #[test]
    fn missing_items_give_errors() {
        let mut stored = Impressions::default();
        stored.push(&impression("a", &[]));
        stored.len = 2;
        let read: Vec<_> = stored.iter().collect();
        assert_eq!(read.len(), 2);
        assert!(read[0].is_ok());
        assert!(read[1].is_err());
    }
}
