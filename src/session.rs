//! Visitor sessions: one per device, in a sharded map, closed by inactivity, duration, a new
//! `sessionKey` or shutdown.
//!
//! [`SessionStore`] is the only way in. No map guard leaves it, and none is held while the
//! deadline queue is locked. A session that a request closes goes to the [`SessionSink`] while
//! its shard is still locked, so [`SessionStore::close_all`] cannot overtake it.
//!
//! Expiry does not scan the map. Each session has one entry in a deadline queue. The sweeper pops
//! only entries that are due and re-queues a session that was active since, so its cost grows
//! with the number of sessions due, not with the number of sessions.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use foldhash::fast::RandomState;
use hashbrown::HashTable;
use uuid::Uuid;

use crate::batch::{Batch, Context, Event, StringMap, Text, owned};
use crate::items::{Events, Impressions, ItemKind, Items};
use crate::metrics::Metrics;

/// Bytes of one bucket in a duplicate index: an entry and its control byte.
const INDEX_BUCKET_BYTES: usize = std::mem::size_of::<IndexEntry>() + 1;
/// Items of one kind from which a session keeps a hash index of their ids. Below this a scan of
/// the stored items is cheap, and a session with fewer items pays for no index.
const INDEX_FROM_ITEMS: usize = 8;

/// Reason a session was closed; the order matches the `CloseReason` enum of `proto/session.avsc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    Inactivity,
    MaxDuration,
    MaxSize,
    MemoryPressure,
    SessionKeyChanged,
    Shutdown,
    Flush,
}

impl CloseReason {
    /// Every reason, in the order of the schema's symbols.
    pub const ALL: [CloseReason; 7] = [
        CloseReason::Inactivity,
        CloseReason::MaxDuration,
        CloseReason::MaxSize,
        CloseReason::MemoryPressure,
        CloseReason::SessionKeyChanged,
        CloseReason::Shutdown,
        CloseReason::Flush,
    ];

    /// Returns the reason's symbol in the Avro schema.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Inactivity => "inactivity",
            CloseReason::MaxDuration => "max_duration",
            CloseReason::MaxSize => "max_size",
            CloseReason::MemoryPressure => "memory_pressure",
            CloseReason::SessionKeyChanged => "session_key_changed",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Flush => "flush",
        }
    }
}

/// A finished session, as written to the Avro file.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedSession {
    pub session_id: Uuid,
    pub device_id: Box<str>,
    pub session_key: Option<Box<str>>,
    pub previous_session_id: Option<Uuid>,
    pub start_time_ms: i64,
    pub end_time_ms: i64,
    pub closed_at_ms: i64,
    pub close_reason: CloseReason,
    pub ip_address: Option<Box<str>>,
    pub context: Context<'static>,
    pub args: StringMap<'static>,
    pub impressions: Impressions,
    pub events: Events,
}

/// Receives every session the store closes.
pub trait SessionSink: Send + Sync + 'static {
    /// Takes a closed session; must not block for long, because callers may be request handlers.
    fn closed(&self, session: ClosedSession);
}

/// Collects closed sessions in memory, for tests.
impl SessionSink for Arc<Mutex<Vec<ClosedSession>>> {
    fn closed(&self, session: ClosedSession) {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(session);
    }
}

/// When sessions close.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Inactivity after which a session closes.
    pub timeout: Duration,
    /// Maximum session duration; a longer session continues as a linked session.
    pub max_duration: Duration,
    /// Impressions plus events at which a session is cut and continues as a linked session.
    pub max_items: usize,
}

/// Default number of impressions plus events at which a session is cut.
pub const DEFAULT_MAX_SESSION_ITEMS: usize = 10_000;

/// Client details from the connection and headers, beside the body. They are borrowed, and a
/// session copies them only when it stores them.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientInfo<'a> {
    pub ip_address: Option<IpAddr>,
    /// The `User-Agent` header, used when the body's context has none.
    pub user_agent: Option<&'a str>,
}

/// The result of recording one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub session_id: Uuid,
    /// Whether this batch opened the session.
    pub opened: bool,
    pub impressions: usize,
    pub events: usize,
    pub duplicate_impressions: usize,
    pub duplicate_events: usize,
}

impl Recorded {
    /// Returns the items dropped because their id was already in the session.
    pub fn duplicates(&self) -> usize {
        self.duplicate_impressions + self.duplicate_events
    }
}

/// A batch that could not be recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// All active sessions, keyed by device id.
pub struct SessionStore {
    sessions: DashMap<Box<str>, Session>,
    /// One entry per session; stale entries are dropped when popped.
    deadlines: Mutex<BinaryHeap<Reverse<Deadline>>>,
    /// Set once at shutdown; read under a shard lock so that no session is added after the last
    /// shard was emptied.
    closing: AtomicBool,
    limits: SessionLimits,
    /// Hashes item ids for the per-session duplicate index, with a seed of its own.
    id_hasher: RandomState,
    sink: Box<dyn SessionSink>,
    metrics: Arc<Metrics>,
    /// Estimated heap bytes of all active sessions.
    resident_bytes: AtomicI64,
}

/// An active session.
#[derive(Debug)]
struct Session {
    id: Uuid,
    previous_id: Option<Uuid>,
    session_key: Option<Box<str>>,
    start_ms: i64,
    last_active_ms: i64,
    /// Accepted requests; 0 for a continuation that has not heard from the device yet.
    requests: u32,
    /// Estimated heap bytes of the session, its own struct included.
    bytes: usize,
    ip_address: Option<Box<str>>,
    context: Context<'static>,
    args: StringMap<'static>,
    impressions: Impressions,
    events: Events,
    /// Stored items by id, so that a repeated id is dropped.
    impression_index: IdIndex,
    event_index: IdIndex,
}

/// An index of stored items by id: a scan while they are few, then a hash table of entries.
#[derive(Debug, Default)]
struct IdIndex(HashTable<IndexEntry>);

/// One item in an [`IdIndex`]: its offset in the low [`OFFSET_BITS`] bits and the [`IdTag`] of
/// its id above them. With the tag in the entry, the table grows without reading any item, and a
/// lookup reads an item only when the tags agree.
#[derive(Debug, Clone, Copy)]
struct IndexEntry(u64);

/// Bits of an [`IndexEntry`] that hold the offset: 2^40 bytes, far beyond any session.
const OFFSET_BITS: u32 = 40;

/// The top 24 bits of the hash of an item id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IdTag(u32);

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    at_ms: i64,
    session_id: Uuid,
    device_id: Box<str>,
}

// === impl SessionStore ===

impl SessionStore {
    /// Creates an empty store that hands closed sessions to `sink`.
    pub fn new(limits: SessionLimits, sink: Box<dyn SessionSink>) -> Self {
        Self {
            sessions: DashMap::new(),
            deadlines: Mutex::new(BinaryHeap::new()),
            closing: AtomicBool::new(false),
            limits,
            id_hasher: RandomState::default(),
            sink,
            metrics: Arc::new(Metrics::new()),
            resident_bytes: AtomicI64::new(0),
        }
    }

    /// Reports opened and closed sessions and their memory to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Returns the estimated heap bytes of all active sessions.
    pub fn resident_bytes(&self) -> i64 {
        self.resident_bytes.load(Ordering::Relaxed)
    }

    /// Hands a closed session to the sink and accounts for it.
    fn hand_off(&self, closed: ClosedSession, bytes: usize) {
        self.resident_bytes
            .fetch_sub(bytes_i64(bytes), Ordering::Relaxed);
        let duration_ms = closed.end_time_ms.saturating_sub(closed.start_time_ms);
        let items = closed.impressions.len() + closed.events.len();
        self.metrics
            .session_closed(closed.close_reason, duration_ms as f64 / 1000.0, items);
        self.sink.closed(closed);
    }

    /// Records a validated batch into its device's session, opening or replacing the session
    /// as needed.
    pub fn record(
        &self,
        batch: Batch<'_>,
        client: ClientInfo<'_>,
    ) -> Result<Recorded, RecordError> {
        let now_ms = batch.received_ms;
        let mut scheduled = None;

        let recorded = {
            let entry = self.sessions.entry(batch.device_id.clone());
            if self.closing.load(Ordering::SeqCst) {
                return Err(RecordError::ShuttingDown);
            }
            let mut session = match entry {
                Entry::Occupied(occupied) => {
                    let mut session = occupied.into_ref();
                    if let Some(reason) = session.close_reason_before(&batch, now_ms, &self.limits)
                    {
                        let next =
                            if matches!(reason, CloseReason::MaxDuration | CloseReason::MaxSize) {
                                Session::continuing(&session, now_ms)
                            } else {
                                Session::new(now_ms)
                            };
                        let old = std::mem::replace(&mut *session, next);
                        // Handed on under the shard lock: `close_all` takes this lock after us, so
                        // the writer gets this session before its final command.
                        let old_bytes = old.bytes;
                        if let Some(closed) = old.close(reason, now_ms, &batch.device_id) {
                            self.hand_off(closed, old_bytes);
                        }
                        scheduled = Some(session.id);
                    }
                    session
                }
                Entry::Vacant(vacant) => {
                    let session = vacant.insert(Session::new(now_ms));
                    scheduled = Some(session.id);
                    session
                }
            };
            let bytes_before = session.bytes;
            let recorded = session.apply(batch, client, &self.id_hasher);
            let change = bytes_i64(session.bytes) - bytes_i64(bytes_before);
            self.resident_bytes.fetch_add(change, Ordering::Relaxed);
            recorded
        };
        if recorded.0.opened {
            self.metrics.session_opened();
        }

        if let Some(session_id) = scheduled {
            // Every session starts with one queue entry at its earliest possible deadline.
            self.schedule(Deadline {
                at_ms: now_ms.saturating_add(millis(self.limits.timeout)),
                session_id,
                device_id: recorded.1,
            });
        }
        Ok(recorded.0)
    }

    /// Closes every session whose deadline is at or before `now_ms`; returns how many closed.
    pub fn close_expired(&self, now_ms: i64) -> usize {
        let mut closed_count = 0;
        loop {
            let due = {
                let mut deadlines = self.lock_deadlines();
                match deadlines.peek() {
                    Some(Reverse(next)) if next.at_ms <= now_ms => deadlines.pop(),
                    _ => break,
                }
            };
            let Some(Reverse(due)) = due else { break };

            let mut closed: Option<(ClosedSession, usize)> = None;
            let mut rescheduled = None;
            if let Entry::Occupied(occupied) = self.sessions.entry(due.device_id.clone()) {
                let session = occupied.get();
                if session.id != due.session_id {
                    // A newer session replaced this one and has its own entry.
                } else if let Some(reason) = session.expiry(now_ms, &self.limits) {
                    if matches!(reason, CloseReason::MaxDuration | CloseReason::MaxSize) {
                        let mut occupied = occupied;
                        let next = Session::continuing(occupied.get(), now_ms);
                        let next_deadline = next.deadline_ms(&self.limits);
                        rescheduled = Some((next.id, next_deadline));
                        let old = std::mem::replace(occupied.get_mut(), next);
                        let bytes = old.bytes;
                        closed = old
                            .close(reason, now_ms, &due.device_id)
                            .map(|c| (c, bytes));
                    } else {
                        let old = occupied.remove();
                        let bytes = old.bytes;
                        closed = old
                            .close(reason, now_ms, &due.device_id)
                            .map(|c| (c, bytes));
                    }
                } else {
                    rescheduled = Some((session.id, session.deadline_ms(&self.limits)));
                }
            }

            if let Some((closed, bytes)) = closed {
                closed_count += 1;
                self.hand_off(closed, bytes);
            }
            if let Some((session_id, at_ms)) = rescheduled {
                self.schedule(Deadline {
                    at_ms,
                    session_id,
                    device_id: due.device_id,
                });
            }
        }
        closed_count
    }

    /// Stops taking batches and closes every session with `reason`; returns how many closed.
    ///
    /// A batch racing with this call is either in a closed session or rejected with
    /// [`RecordError::ShuttingDown`], never lost.
    pub fn close_all(&self, reason: CloseReason, now_ms: i64) -> usize {
        self.closing.store(true, Ordering::SeqCst);

        let device_ids: Vec<Box<str>> = self
            .sessions
            .iter()
            .map(|entry| entry.key().clone())
            .collect();
        let mut closed_count = 0;
        for device_id in device_ids {
            let Some((device_id, session)) = self.sessions.remove(&device_id) else {
                continue;
            };
            let bytes = session.bytes;
            if let Some(closed) = session.close(reason, now_ms, &device_id) {
                closed_count += 1;
                self.hand_off(closed, bytes);
            }
        }
        self.lock_deadlines().clear();
        closed_count
    }

    /// Returns the number of active sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Returns whether no session is active.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Returns whether [`close_all`](Self::close_all) was called.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    fn schedule(&self, deadline: Deadline) {
        self.lock_deadlines().push(Reverse(deadline));
    }

    fn lock_deadlines(&self) -> std::sync::MutexGuard<'_, BinaryHeap<Reverse<Deadline>>> {
        // The heap stays consistent even if a holder panicked: every operation on it is one call.
        self.deadlines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

// === impl Session ===

impl Session {
    fn new(now_ms: i64) -> Self {
        Self {
            id: Uuid::now_v7(),
            previous_id: None,
            session_key: None,
            start_ms: now_ms,
            last_active_ms: now_ms,
            requests: 0,
            bytes: 0,
            ip_address: None,
            context: Context::default(),
            args: StringMap::default(),
            impressions: Impressions::default(),
            events: Events::default(),
            impression_index: IdIndex::default(),
            event_index: IdIndex::default(),
        }
    }

    /// Creates the session that continues `previous` after a cut by duration.
    fn continuing(previous: &Session, now_ms: i64) -> Self {
        Self {
            previous_id: Some(previous.id),
            session_key: previous.session_key.clone(),
            // The continuation inherits the inactivity clock, so a device that went quiet does
            // not keep an empty session alive.
            last_active_ms: previous.last_active_ms,
            ..Self::new(now_ms)
        }
    }

    /// Returns why this session must close before `batch` can be recorded, if it must.
    fn close_reason_before(
        &self,
        batch: &Batch<'_>,
        now_ms: i64,
        limits: &SessionLimits,
    ) -> Option<CloseReason> {
        if now_ms.saturating_sub(self.last_active_ms) >= millis(limits.timeout) {
            return Some(CloseReason::Inactivity);
        }
        if self.requests > 0 && now_ms.saturating_sub(self.start_ms) >= millis(limits.max_duration)
        {
            return Some(CloseReason::MaxDuration);
        }
        // A full session is cut before the batch, so the batch starts the continuation.
        if self.impressions.len() + self.events.len() >= limits.max_items {
            return Some(CloseReason::MaxSize);
        }
        match &batch.session_key {
            Some(key) if self.session_key.as_deref() != Some(&**key) => {
                Some(CloseReason::SessionKeyChanged)
            }
            _ => None,
        }
    }

    /// Returns why the session has expired by `now_ms`, if it has.
    fn expiry(&self, now_ms: i64, limits: &SessionLimits) -> Option<CloseReason> {
        let inactive_at = self.last_active_ms.saturating_add(millis(limits.timeout));
        let too_long_at = self.start_ms.saturating_add(millis(limits.max_duration));
        if self.requests > 0 && too_long_at <= now_ms && too_long_at < inactive_at {
            return Some(CloseReason::MaxDuration);
        }
        if inactive_at <= now_ms {
            return Some(CloseReason::Inactivity);
        }
        None
    }

    fn deadline_ms(&self, limits: &SessionLimits) -> i64 {
        let inactive_at = self.last_active_ms.saturating_add(millis(limits.timeout));
        if self.requests == 0 {
            return inactive_at;
        }
        inactive_at.min(self.start_ms.saturating_add(millis(limits.max_duration)))
    }

    /// Adds a batch; returns the result and the device id, moved out of the batch.
    fn apply(
        &mut self,
        batch: Batch<'_>,
        client: ClientInfo<'_>,
        hasher: &RandomState,
    ) -> (Recorded, Box<str>) {
        let now_ms = batch.received_ms;
        if self.requests == 0 {
            self.start_ms = now_ms;
            self.session_key = batch.session_key.map(|key| key.into());
            self.ip_address = client
                .ip_address
                .map(|address| address.to_string().into_boxed_str());
        }
        self.requests = self.requests.saturating_add(1);
        self.last_active_ms = self.last_active_ms.max(now_ms);

        let context = batch.context;
        let user_agent = context.user_agent.or(client.user_agent.map(Text::Borrowed));
        fill(&mut self.context.entry_url, context.entry_url);
        fill(&mut self.context.referrer, context.referrer);
        fill(&mut self.context.user_agent, user_agent);
        fill(&mut self.context.client_type, context.client_type);
        merge(&mut self.args, batch.args);

        let mut recorded = Recorded {
            session_id: self.id,
            opened: self.requests == 1,
            impressions: 0,
            events: 0,
            duplicate_impressions: 0,
            duplicate_events: 0,
        };
        self.impressions.reserve_for(&batch.impressions);
        self.impression_index
            .prepare(&self.impressions, batch.impressions.len(), hasher);
        for impression in &batch.impressions {
            let id = impression.impression_id.as_bytes();
            let tag = self.impression_index.tag(id, hasher);
            if self
                .impression_index
                .find(&self.impressions, id, tag)
                .is_some()
            {
                recorded.duplicate_impressions += 1;
                continue;
            }
            let at = self.impressions.push(impression);
            self.impression_index.added(at, tag);
            recorded.impressions += 1;
        }

        // An event that names no feature takes the feature of its impression.
        let impressions = &self.impressions;
        let impression_index = &self.impression_index;
        let feature = |event: &Event<'_>| match (&event.feature, event.impression_id.as_deref()) {
            (None, Some(impression_id)) => {
                let impression_id = impression_id.as_bytes();
                let tag = impression_index.tag(impression_id, hasher);
                impression_index
                    .find(impressions, impression_id, tag)
                    .and_then(|at| impressions.feature_at(at))
            }
            _ => None,
        };
        self.events.reserve_for(&batch.events, feature);
        self.event_index
            .prepare(&self.events, batch.events.len(), hasher);
        for event in &batch.events {
            let id = event.event_id.as_bytes();
            let tag = self.event_index.tag(id, hasher);
            if self.event_index.find(&self.events, id, tag).is_some() {
                recorded.duplicate_events += 1;
                continue;
            }
            let at = self.events.push(event, feature(event));
            self.event_index.added(at, tag);
            recorded.events += 1;
        }

        self.bytes = self.heap_bytes();
        (recorded, batch.device_id)
    }

    /// Returns the estimated heap bytes of this session, its own struct included.
    fn heap_bytes(&self) -> usize {
        let text = |text: Option<&str>| text.map_or(0, str::len);
        let context = &self.context;
        std::mem::size_of::<Session>()
            + text(self.session_key.as_deref())
            + text(self.ip_address.as_deref())
            + text(context.entry_url.as_deref())
            + text(context.referrer.as_deref())
            + text(context.user_agent.as_deref())
            + text(context.client_type.as_deref())
            + self.args.heap_bytes()
            + self.impressions.heap_bytes()
            + self.events.heap_bytes()
            + (self.impression_index.0.capacity() + self.event_index.0.capacity())
                * INDEX_BUCKET_BYTES
    }

    /// Turns this session into its record; `None` for a continuation that never heard from the
    /// device, which has nothing to write.
    fn close(
        self,
        reason: CloseReason,
        closed_at_ms: i64,
        device_id: &str,
    ) -> Option<ClosedSession> {
        if self.requests == 0 {
            return None;
        }
        Some(ClosedSession {
            session_id: self.id,
            device_id: device_id.into(),
            session_key: self.session_key,
            previous_session_id: self.previous_id,
            start_time_ms: self.start_ms,
            end_time_ms: self.last_active_ms,
            closed_at_ms: closed_at_ms.max(self.last_active_ms),
            close_reason: reason,
            ip_address: self.ip_address,
            context: self.context,
            args: self.args,
            impressions: self.impressions,
            events: self.events,
        })
    }
}

// === impl IdIndex ===

impl IdIndex {
    /// Builds the table before a batch of `incoming` items takes the session to
    /// `INDEX_FROM_ITEMS`, and reserves room for the whole batch, so that inserting the batch
    /// never grows the table.
    fn prepare<K: ItemKind>(&mut self, items: &Items<K>, incoming: usize, hasher: &RandomState) {
        if self.0.capacity() > 0 {
            self.0.reserve(incoming, IndexEntry::table_hash);
        } else if items.len() + incoming >= INDEX_FROM_ITEMS {
            self.0
                .reserve(items.len() + incoming, IndexEntry::table_hash);
            for at in items.offsets() {
                let tag = IdTag::of(items.id_at(at).unwrap_or_default(), hasher);
                self.added(at, tag);
            }
        }
    }

    /// Returns the tag of `id` for [`find`](Self::find) and [`added`](Self::added). Without a
    /// table both ignore it, so it is not computed.
    fn tag(&self, id: &[u8], hasher: &RandomState) -> IdTag {
        if self.0.capacity() == 0 {
            IdTag(0)
        } else {
            IdTag::of(id, hasher)
        }
    }

    /// Returns the offset of the item with `id` in `items`, if there is one.
    fn find<K: ItemKind>(&self, items: &Items<K>, id: &[u8], tag: IdTag) -> Option<usize> {
        if self.0.capacity() == 0 {
            // No table: the session has fewer than `INDEX_FROM_ITEMS` items of this kind.
            return items.offsets().find(|&at| items.id_at(at) == Some(id));
        }
        self.0
            .find(tag.table_hash(), |entry| {
                entry.tag() == tag && items.id_at(entry.offset()) == Some(id)
            })
            .map(|entry| entry.offset())
    }

    /// Notes the item just added at `offset`, when the table exists. An offset beyond
    /// [`OFFSET_BITS`] is left out, so a repeat of that item would be stored again, not lost.
    fn added(&mut self, offset: usize, tag: IdTag) {
        if self.0.capacity() == 0 {
            return;
        }
        if let Some(entry) = IndexEntry::new(offset, tag) {
            self.0
                .insert_unique(tag.table_hash(), entry, IndexEntry::table_hash);
        }
    }
}

impl IndexEntry {
    fn new(offset: usize, tag: IdTag) -> Option<Self> {
        let offset = u64::try_from(offset).ok()?;
        (offset >> OFFSET_BITS == 0).then(|| Self(offset | (u64::from(tag.0) << OFFSET_BITS)))
    }

    fn offset(self) -> usize {
        // The offset came from a `usize`, so it fits one.
        (self.0 & ((1 << OFFSET_BITS) - 1)) as usize
    }

    fn tag(self) -> IdTag {
        IdTag((self.0 >> OFFSET_BITS) as u32)
    }

    fn table_hash(&self) -> u64 {
        self.tag().table_hash()
    }
}

impl IdTag {
    fn of(id: &[u8], hasher: &RandomState) -> Self {
        Self((hasher.hash_one(id) >> OFFSET_BITS) as u32)
    }

    /// Spreads the tag over 64 bits: the table picks a bucket from the low bits and keeps the top
    /// seven in its control bytes, and both must vary with the tag.
    fn table_hash(self) -> u64 {
        u64::from(self.0).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

/// Sets `slot` to `value` unless it already has one: the first request's context wins.
fn fill(slot: &mut Option<Text<'static>>, value: Option<Text<'_>>) {
    if slot.is_none() {
        *slot = value.map(owned);
    }
}

/// Merges `update` into `args`, later values replacing earlier ones; both are sorted by key.
fn merge(args: &mut StringMap<'static>, update: StringMap<'_>) {
    for (key, value) in update.0 {
        match args.0.binary_search_by(|(existing, _)| existing.cmp(&key)) {
            Ok(at) => args.0[at].1 = owned(value),
            Err(at) => args.0.insert(at, (owned(key), owned(value))),
        }
    }
}

fn bytes_i64(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{DeviceIdSources, Impression};

    const T0: i64 = 1_733_310_000_000;
    const MINUTE_MS: i64 = 60_000;

    fn store() -> (SessionStore, Arc<Mutex<Vec<ClosedSession>>>) {
        store_with_max_items(10)
    }

    fn store_with_max_items(max_items: usize) -> (SessionStore, Arc<Mutex<Vec<ClosedSession>>>) {
        let closed = Arc::new(Mutex::new(Vec::new()));
        let limits = SessionLimits {
            timeout: Duration::from_secs(30 * 60),
            max_duration: Duration::from_secs(24 * 3600),
            max_items,
        };
        (SessionStore::new(limits, Box::new(closed.clone())), closed)
    }

    fn batch(json: &str, received_ms: i64) -> Batch<'_> {
        Batch::parse(json.as_bytes(), DeviceIdSources::default(), received_ms).unwrap()
    }

    fn impressions(device: &str, ids: &[&str]) -> String {
        let items: Vec<String> = ids
            .iter()
            .map(|id| format!(r#"{{"impressionId": "{id}", "feature": "f-{id}"}}"#))
            .collect();
        format!(
            r#"{{"deviceId": "{device}", "impressions": [{}]}}"#,
            items.join(",")
        )
    }

    /// Returns the ids of a closed session's impressions, in stored order.
    fn impression_ids(session: &ClosedSession) -> Vec<&str> {
        let impressions = session.impressions.iter();
        impressions
            .map(|item| item.unwrap().impression_id)
            .collect()
    }

    #[test]
    fn duplicates_are_stored_once() {
        let (store, closed) = store();
        let first = store
            .record(
                batch(&impressions("d", &["a", "b"]), T0),
                ClientInfo::default(),
            )
            .unwrap();
        let retry = store
            .record(
                batch(&impressions("d", &["b", "c", "c"]), T0 + 1),
                ClientInfo::default(),
            )
            .unwrap();
        assert_eq!((first.impressions, first.duplicates()), (2, 0));
        assert_eq!((retry.impressions, retry.duplicates()), (1, 2));
        assert_eq!(first.session_id, retry.session_id);

        store.close_all(CloseReason::Shutdown, T0 + 2);
        let closed = closed.lock().unwrap();
        assert_eq!(impression_ids(&closed[0]), ["a", "b", "c"]);
    }

    #[test]
    fn duplicates_found_by_scan_and_index() {
        let (store, closed) = store_with_max_items(100);
        let ids = |range: std::ops::Range<usize>| -> Vec<String> {
            range.map(|n| format!("i-{n}")).collect()
        };
        let send = |ids: &[String]| {
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            store
                .record(batch(&impressions("d", &ids), T0), ClientInfo::default())
                .unwrap()
        };

        // Below the index threshold, duplicates are found by a scan.
        let first = send(&ids(0..5));
        assert_eq!((first.impressions, first.duplicates()), (5, 0));
        // This batch takes the session past the threshold, so the index is built before it.
        let second = send(&ids(3..12));
        assert_eq!((second.impressions, second.duplicates()), (7, 2));
        let mut third_ids = ids(11..14);
        third_ids.push("i-0".to_owned());
        let third = send(&third_ids);
        assert_eq!((third.impressions, third.duplicates()), (2, 2));

        let event = r#"{"deviceId": "d", "events": [{"eventId": "e", "name": "n", "impressionId": "i-9"}]}"#;
        store
            .record(batch(event, T0), ClientInfo::default())
            .unwrap();

        store.close_all(CloseReason::Shutdown, T0);
        let closed = closed.lock().unwrap();
        assert_eq!(impression_ids(&closed[0]), ids(0..14));
        let feature = closed[0].events.iter().next().unwrap().unwrap().feature;
        assert_eq!(feature, Some("f-i-9"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Batches store each id once, in the order first seen, by scan and by index alike. The
        /// ids come from a small set, so repeats within and across batches are common.
        #[test]
        fn every_id_is_stored_once(
            batches in proptest::collection::vec(proptest::collection::vec(0..40u8, 0..25), 1..12)
        ) {
            let (store, closed) = store_with_max_items(100);
            let mut expected: Vec<String> = Vec::new();
            for ids in &batches {
                let ids: Vec<String> = ids.iter().map(|n| format!("i-{n}")).collect();
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                let recorded = store
                    .record(batch(&impressions("d", &ids), T0), ClientInfo::default())
                    .unwrap();
                let before = expected.len();
                for id in ids {
                    if !expected.iter().any(|seen| seen == id) {
                        expected.push(id.to_owned());
                    }
                }
                proptest::prop_assert_eq!(recorded.impressions, expected.len() - before);
            }
            store.close_all(CloseReason::Shutdown, T0);
            let closed = closed.lock().unwrap();
            proptest::prop_assert_eq!(closed.len(), 1);
            proptest::prop_assert_eq!(impression_ids(&closed[0]), expected);
        }
    }

    #[test]
    fn index_entry_keeps_offset_and_tag() {
        let tag = IdTag(0xab_cdef);
        let entry = IndexEntry::new((1 << OFFSET_BITS) - 1, tag).unwrap();
        assert_eq!((entry.offset(), entry.tag()), ((1 << OFFSET_BITS) - 1, tag));
        assert!(IndexEntry::new(1 << OFFSET_BITS, tag).is_none());
    }

    #[test]
    fn index_compares_ids_when_tags_agree() {
        let hasher = RandomState::default();
        let items: Impressions = ["a", "b"]
            .into_iter()
            .map(|id| Impression {
                impression_id: id.into(),
                feature: "f".into(),
                time_ms: T0,
                client_time_ms: None,
                args: StringMap::default(),
                outputs: StringMap::default(),
                variants: Vec::new(),
            })
            .collect();
        let mut index = IdIndex::default();
        index.prepare(&items, INDEX_FROM_ITEMS, &hasher);
        let offsets: Vec<usize> = items.offsets().collect();
        assert_eq!(
            index.find(&items, b"b", IdTag::of(b"b", &hasher)),
            Some(offsets[1])
        );
        // Another id with the same tag is not a match.
        assert_eq!(index.find(&items, b"c", IdTag::of(b"a", &hasher)), None);
    }

    #[test]
    fn event_takes_feature_of_its_impression() {
        let (store, closed) = store();
        let json = r#"{"deviceId": "d", "impressions": [{"impressionId": "i", "feature": "Box"}],
                       "events": [{"eventId": "e", "name": "click", "impressionId": "i"},
                                  {"eventId": "e", "name": "click"},
                                  {"eventId": "e2", "name": "other", "impressionId": "unknown"}]}"#;
        let recorded = store
            .record(batch(json, T0), ClientInfo::default())
            .unwrap();
        assert_eq!((recorded.events, recorded.duplicates()), (2, 1));

        store.close_all(CloseReason::Shutdown, T0);
        let closed = closed.lock().unwrap();
        let features: Vec<Option<&str>> = closed[0]
            .events
            .iter()
            .map(|event| event.unwrap().feature)
            .collect();
        assert_eq!(features, [Some("Box"), None]);
    }

    #[test]
    fn inactive_session_expires_at_timeout() {
        let (store, closed) = store();
        store
            .record(batch(&impressions("d", &["a"]), T0), ClientInfo::default())
            .unwrap();
        store
            .record(
                batch(r#"{"deviceId": "d"}"#, T0 + 10 * MINUTE_MS),
                ClientInfo::default(),
            )
            .unwrap();

        assert_eq!(
            store.close_expired(T0 + 30 * MINUTE_MS),
            0,
            "the keep-alive extended it"
        );
        assert_eq!(store.close_expired(T0 + 40 * MINUTE_MS - 1), 0);
        assert_eq!(store.close_expired(T0 + 40 * MINUTE_MS), 1);
        assert!(store.is_empty());

        let closed = closed.lock().unwrap();
        assert_eq!(closed[0].close_reason, CloseReason::Inactivity);
        assert_eq!(closed[0].start_time_ms, T0);
        assert_eq!(closed[0].end_time_ms, T0 + 10 * MINUTE_MS);
        assert_eq!(closed[0].closed_at_ms, T0 + 40 * MINUTE_MS);
    }

    #[test]
    fn expiry_pops_only_due_sessions() {
        let (store, _closed) = store();
        for device in 0..1000 {
            let json = format!(r#"{{"deviceId": "d{device}"}}"#);
            store
                .record(batch(&json, T0 + device), ClientInfo::default())
                .unwrap();
        }
        assert_eq!(store.close_expired(T0 + 30 * MINUTE_MS + 99), 100);
        assert_eq!(store.len(), 900);
        assert_eq!(store.lock_deadlines().len(), 900);
    }

    #[test]
    fn late_request_after_timeout_opens_new_session() {
        let (store, closed) = store();
        let first = store
            .record(batch(&impressions("d", &["a"]), T0), ClientInfo::default())
            .unwrap();
        // The sweeper has not run yet; the request itself notices the expired session.
        let second = store
            .record(
                batch(&impressions("d", &["a"]), T0 + 31 * MINUTE_MS),
                ClientInfo::default(),
            )
            .unwrap();
        assert_ne!(first.session_id, second.session_id);
        assert_eq!(
            second.impressions, 1,
            "a new session has no duplicates from the old one"
        );
        assert_eq!(
            closed.lock().unwrap()[0].close_reason,
            CloseReason::Inactivity
        );

        // The stale queue entry of the first session closes nothing.
        assert_eq!(store.close_expired(T0 + 31 * MINUTE_MS), 0);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn session_key_change_closes_session() {
        let (store, closed) = store();
        let first = store
            .record(
                batch(r#"{"deviceId": "d", "sessionKey": "tab-1"}"#, T0),
                ClientInfo::default(),
            )
            .unwrap();
        let same = store
            .record(batch(r#"{"deviceId": "d"}"#, T0 + 1), ClientInfo::default())
            .unwrap();
        let second = store
            .record(
                batch(r#"{"deviceId": "d", "sessionKey": "tab-2"}"#, T0 + 2),
                ClientInfo::default(),
            )
            .unwrap();
        assert_eq!(
            first.session_id, same.session_id,
            "a batch without a key continues the session"
        );
        assert_ne!(first.session_id, second.session_id);

        let closed = closed.lock().unwrap();
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].close_reason, CloseReason::SessionKeyChanged);
        assert_eq!(closed[0].session_key.as_deref(), Some("tab-1"));
        assert_eq!(closed[0].previous_session_id, None);
    }

    /// Sends a keep-alive for `device` every 20 minutes after `from` up to `until`, sweeping
    /// before each; returns the time of the last one.
    fn keep_active(store: &SessionStore, json: &str, from: i64, until: i64) -> i64 {
        let mut at = from;
        while at + 20 * MINUTE_MS <= until {
            at += 20 * MINUTE_MS;
            store.close_expired(at);
            store
                .record(batch(json, at), ClientInfo::default())
                .unwrap();
        }
        at
    }

    #[test]
    fn max_duration_continues_as_linked_session() {
        let (store, closed) = store();
        let hour_ms = 60 * MINUTE_MS;
        let json = r#"{"deviceId": "d", "sessionKey": "k"}"#;
        let opening = r#"{"deviceId": "d", "sessionKey": "k", "impressions": [{"impressionId": "a", "feature": "f"}]}"#;
        let first = store
            .record(batch(opening, T0), ClientInfo::default())
            .unwrap();
        let last = keep_active(&store, json, T0, T0 + 23 * hour_ms + 50 * MINUTE_MS);
        assert!(closed.lock().unwrap().is_empty());

        store.close_expired(T0 + 24 * hour_ms);
        {
            let closed = closed.lock().unwrap();
            assert_eq!(closed.len(), 1);
            assert_eq!(closed[0].session_id, first.session_id);
            assert_eq!(closed[0].close_reason, CloseReason::MaxDuration);
            assert_eq!(closed[0].closed_at_ms, T0 + 24 * hour_ms);
            assert_eq!(closed[0].end_time_ms, last);
            assert_eq!(closed[0].impressions.len(), 1);
        }

        let next = store
            .record(batch(json, T0 + 24 * hour_ms + 1), ClientInfo::default())
            .unwrap();
        store.close_all(CloseReason::Shutdown, T0 + 24 * hour_ms + 2);
        let closed = closed.lock().unwrap();
        assert_eq!(closed.len(), 2);
        assert_eq!(closed[1].session_id, next.session_id);
        assert_eq!(closed[1].previous_session_id, Some(first.session_id));
        assert_eq!(closed[1].session_key.as_deref(), Some("k"));
        assert_eq!(closed[1].start_time_ms, T0 + 24 * hour_ms + 1);
        assert_eq!(closed[1].close_reason, CloseReason::Shutdown);
    }

    #[test]
    fn request_past_max_duration_links_sessions() {
        let (store, closed) = store();
        let json = r#"{"deviceId": "d"}"#;
        let first = store
            .record(batch(json, T0), ClientInfo::default())
            .unwrap();
        // No sweep runs; the request itself cuts the session.
        let mut at = T0;
        while at < T0 + 24 * 60 * MINUTE_MS {
            at += 20 * MINUTE_MS;
            store
                .record(batch(json, at), ClientInfo::default())
                .unwrap();
        }
        {
            let closed = closed.lock().unwrap();
            assert_eq!(closed.len(), 1);
            assert_eq!(closed[0].session_id, first.session_id);
            assert_eq!(closed[0].close_reason, CloseReason::MaxDuration);
        }
        store.close_all(CloseReason::Shutdown, at);
        let closed = closed.lock().unwrap();
        assert_eq!(closed[1].previous_session_id, Some(first.session_id));
    }

    #[test]
    fn quiet_continuation_is_not_written() {
        let (store, closed) = store();
        let hour_ms = 60 * MINUTE_MS;
        let json = r#"{"deviceId": "d"}"#;
        store
            .record(batch(json, T0), ClientInfo::default())
            .unwrap();
        keep_active(&store, json, T0, T0 + 23 * hour_ms + 50 * MINUTE_MS);

        store.close_expired(T0 + 24 * hour_ms);
        assert_eq!(store.len(), 1, "the continuation waits for the device");
        store.close_expired(T0 + 25 * hour_ms);
        assert!(store.is_empty());
        assert_eq!(closed.lock().unwrap().len(), 1);
    }

    #[test]
    fn full_session_continues_as_linked_session() {
        let (store, closed) = store();
        let ids: Vec<String> = (0..8).map(|n| n.to_string()).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let first = store
            .record(batch(&impressions("d", &ids), T0), ClientInfo::default())
            .unwrap();
        let second = store
            .record(
                batch(&impressions("d", &["8", "9"]), T0 + 1),
                ClientInfo::default(),
            )
            .unwrap();
        assert_eq!(first.session_id, second.session_id, "10 items fit");
        let third = store
            .record(
                batch(&impressions("d", &["10"]), T0 + 2),
                ClientInfo::default(),
            )
            .unwrap();
        assert_ne!(third.session_id, first.session_id);
        assert!(third.opened);

        store.close_all(CloseReason::Shutdown, T0 + 3);
        let closed = closed.lock().unwrap();
        assert_eq!(closed[0].close_reason, CloseReason::MaxSize);
        assert_eq!(closed[0].impressions.len(), 10);
        assert_eq!(closed[1].previous_session_id, Some(first.session_id));
        assert_eq!(closed[1].impressions.len(), 1);
    }

    #[test]
    fn close_all_rejects_later_batches() {
        let (store, closed) = store();
        store
            .record(batch(r#"{"deviceId": "a"}"#, T0), ClientInfo::default())
            .unwrap();
        store
            .record(batch(r#"{"deviceId": "b"}"#, T0), ClientInfo::default())
            .unwrap();
        assert_eq!(store.close_all(CloseReason::Shutdown, T0 + 5), 2);
        let err = store
            .record(batch(r#"{"deviceId": "c"}"#, T0), ClientInfo::default())
            .unwrap_err();
        assert_eq!(err, RecordError::ShuttingDown);
        assert!(
            closed
                .lock()
                .unwrap()
                .iter()
                .all(|s| s.close_reason == CloseReason::Shutdown)
        );
    }

    #[test]
    fn first_context_wins_and_args_merge() {
        let (store, closed) = store();
        let client = ClientInfo {
            ip_address: Some([127, 0, 0, 1].into()),
            user_agent: Some("header-agent"),
        };
        let first = r#"{"deviceId": "d", "context": {"entryUrl": "https://a.example/"}, "args": {"a": "1", "b": "1"}}"#;
        let second = r#"{"deviceId": "d", "context": {"entryUrl": "https://b.example/", "referrer": "r"}, "args": {"b": "2", "c": "2"}}"#;
        store.record(batch(first, T0), client).unwrap();
        store
            .record(batch(second, T0 + 1), ClientInfo::default())
            .unwrap();
        store.close_all(CloseReason::Shutdown, T0 + 2);

        let closed = closed.lock().unwrap();
        let session = &closed[0];
        assert_eq!(
            session.context.entry_url.as_deref(),
            Some("https://a.example/")
        );
        assert_eq!(session.context.referrer.as_deref(), Some("r"));
        assert_eq!(session.context.user_agent.as_deref(), Some("header-agent"));
        assert_eq!(session.ip_address.as_deref(), Some("127.0.0.1"));
        assert_eq!(session.args.get("a"), Some("1"));
        assert_eq!(session.args.get("b"), Some("2"));
        assert_eq!(session.args.get("c"), Some("2"));
    }
}
