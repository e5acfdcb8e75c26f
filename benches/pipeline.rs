//! Micro-benchmarks of each step a batch takes: parse and validate, record into a session,
//! close the session, encode it as Avro, and write it into a partition file. One more sends
//! whole requests through the router, to measure what the HTTP layer adds to the steps.
//!
//! Batches have the shape that `load-tests/lib/traffic.js` sends: a first page of 1, 5 or 20
//! impressions, then a reply impression with events on some of them. A session is what one k6
//! visit leaves: 6 impressions and 3 events.
//!
//! ```text
//! cargo bench --bench pipeline
//! ```

use std::hint::black_box;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apache_avro::{Codec, Writer};
use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use clap::Parser;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use impression_server::api::{AppState, app};
use impression_server::avro::{SCHEMA, SessionRecord};
use impression_server::batch::{Batch, DeviceIdSources};
use impression_server::clock::ManualClock;
use impression_server::config::{Cli, Command};
use impression_server::intake::Intake;
use impression_server::log_limit::LogLimiter;
use impression_server::metrics::Metrics;
use impression_server::session::{
    ClientInfo, CloseReason, ClosedSession, DEFAULT_MAX_SESSION_ITEMS, SessionLimits, SessionSink,
    SessionStore,
};
use impression_server::writer::{PartitionWriter, WriterSettings};
use tower::ServiceExt;

const T0_MS: i64 = 1_733_310_000_000;
/// Sessions per iteration of the close and file benchmarks.
const SESSIONS_PER_FILE: usize = 1000;
/// Pages of the returning-visitor benchmark, about what one device of the macro benchmark sends.
const RETURNING_PAGES: usize = 24;
/// Devices of the growing-sessions benchmark.
const GROWING_DEVICES: usize = 1000;
/// Items at which a session of the growing-sessions benchmark is cut. With 1,000 devices this
/// keeps its memory to a few hundred MB (an estimate: about 110 B per stored impression).
const GROWING_MAX_ITEMS: usize = 2000;

/// Drops closed sessions, so recording is measured without the writer.
struct DiscardSink;

impl SessionSink for DiscardSink {
    fn closed(&self, session: ClosedSession) {
        drop(black_box(session));
    }
}

fn limits() -> SessionLimits {
    SessionLimits {
        timeout: Duration::from_secs(30 * 60),
        max_duration: Duration::from_secs(24 * 3600),
        max_items: DEFAULT_MAX_SESSION_ITEMS,
    }
}

/// Returns a first-page body with `impressions` impressions, like a k6 visit's first request.
fn page_body(device: usize, impressions: usize) -> String {
    nth_page_body(device, 0, impressions)
}

/// Returns the body of page `page` of a visit. Its impression ids differ from other pages' ids.
fn nth_page_body(device: usize, page: usize, impressions: usize) -> String {
    let items: Vec<String> = (0..impressions)
        .map(|i| {
            let i = page * impressions + i;
            format!(
                r#"{{"impressionId":"i-bench-{device}-{i}","feature":"Recommendations","time":{time},
                "args":{{"slot":"page-{i}","product":"p-{i}","position":{i}}},
                "outputs":{{"callToAction":"Rate it","score":0.42}},"variants":["cta-test:B"]}}"#,
                time = T0_MS + i as i64
            )
        })
        .collect();
    format!(
        r#"{{"deviceId":"d-bench-{device}","sessionKey":"tab-1","sentAt":{T0_MS},
        "context":{{"entryUrl":"https://shop.example/p/42","referrer":"https://search.example/",
        "userAgent":"k6 load test","clientType":"web"}},
        "args":{{"userId":"u-1","plan":"pro"}},"impressions":[{}],"events":[]}}"#,
        items.join(",")
    )
}

/// Returns the second request of a visit: one more impression and events on two of the first.
fn reply_body(device: usize) -> String {
    format!(
        r#"{{"deviceId":"d-bench-{device}","sessionKey":"tab-1","sentAt":{T0_MS},
        "impressions":[{{"impressionId":"i-bench-{device}-reply","feature":"Banner","time":{T0_MS},
        "args":{{"slot":"reply"}},"outputs":{{"callToAction":"Buy"}},"variants":["cta-test:A"]}}],
        "events":[
        {{"eventId":"e-bench-{device}-0","name":"Click","time":{T0_MS},"impressionId":"i-bench-{device}-0",
        "fields":{{"stars":4,"source":"k6"}}}},
        {{"eventId":"e-bench-{device}-1","name":"Rating","time":{T0_MS},"impressionId":"i-bench-{device}-3",
        "fields":{{"stars":5,"source":"k6"}}}},
        {{"eventId":"e-bench-{device}-2","name":"PageHidden","time":{T0_MS},"fields":{{"source":"k6"}}}}]}}"#
    )
}

fn parse(body: &str) -> Batch<'_> {
    Batch::parse(body.as_bytes(), DeviceIdSources::default(), T0_MS + 1000)
        .expect("benchmark bodies are valid")
}

fn client() -> ClientInfo<'static> {
    ClientInfo {
        ip_address: Some([127, 0, 0, 1].into()),
        user_agent: None,
    }
}

/// Returns `count` closed sessions of one k6 visit each (5 + 1 impressions, 3 events).
fn closed_sessions(count: usize) -> Vec<ClosedSession> {
    let closed = Arc::new(Mutex::new(Vec::new()));
    let store = SessionStore::new(limits(), Box::new(SharedSink(closed.clone())));
    for device in 0..count {
        store
            .record(parse(&page_body(device, 5)), client())
            .expect("store is open");
        store
            .record(parse(&reply_body(device)), client())
            .expect("store is open");
    }
    store.close_all(CloseReason::Shutdown, T0_MS + 2000);
    std::mem::take(&mut *closed.lock().expect("not poisoned"))
}

/// Collects closed sessions where the benchmark can take them back.
struct SharedSink(Arc<Mutex<Vec<ClosedSession>>>);

impl SessionSink for SharedSink {
    fn closed(&self, session: ClosedSession) {
        self.0.closed(session);
    }
}

fn bench_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for impressions in [1, 5, 20] {
        let body = page_body(0, impressions);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("page_{impressions}_impressions"), |b| {
            b.iter(|| {
                Batch::parse(
                    black_box(body.as_bytes()),
                    DeviceIdSources::default(),
                    T0_MS,
                )
            })
        });
    }
    let reply = reply_body(0);
    group.throughput(Throughput::Bytes(reply.len() as u64));
    group.bench_function("reply_1_impression_3_events", |b| {
        b.iter(|| {
            Batch::parse(
                black_box(reply.as_bytes()),
                DeviceIdSources::default(),
                T0_MS,
            )
        })
    });
    group.finish();
}

fn bench_record(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    for impressions in [1, 5, 20] {
        let body = page_body(0, impressions);
        let page = parse(&body);
        group.bench_function(format!("new_session_{impressions}_impressions"), |b| {
            b.iter_batched(
                || {
                    (
                        SessionStore::new(limits(), Box::new(DiscardSink)),
                        page.clone(),
                    )
                },
                |(store, batch)| {
                    let recorded = store.record(batch, client());
                    (store, recorded)
                },
                BatchSize::SmallInput,
            )
        });
    }

    // A returning visitor: one session takes page after page, so its buffers and index grow.
    let pages_text: Vec<String> = (0..RETURNING_PAGES)
        .map(|page| nth_page_body(0, page, 20))
        .collect();
    let pages: Vec<Batch<'_>> = pages_text.iter().map(|body| parse(body)).collect();
    group.bench_function(
        format!("returning_visitor_{RETURNING_PAGES}_pages_of_20"),
        |b| {
            b.iter_batched(
                || {
                    (
                        SessionStore::new(limits(), Box::new(DiscardSink)),
                        pages.clone(),
                    )
                },
                |(store, pages)| {
                    for batch in pages {
                        black_box(store.record(batch, client()).expect("store is open"));
                    }
                    store
                },
                BatchSize::SmallInput,
            )
        },
    );

    // Pages of 20 into many sessions that keep growing, as in the macro benchmark, so that a
    // session's chunks and index are rarely in the cache when its next page comes. Each page is
    // parsed just before it is recorded, as in the server, and only recording is timed.
    let store = SessionStore::new(
        SessionLimits {
            max_items: GROWING_MAX_ITEMS,
            ..limits()
        },
        Box::new(DiscardSink),
    );
    let mut sent = 0;
    group.bench_function(
        format!("pages_of_20_into_{GROWING_DEVICES}_growing_sessions"),
        |b| {
            b.iter_custom(|iterations| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iterations {
                    sent += 1;
                    let body = nth_page_body(sent % GROWING_DEVICES, sent / GROWING_DEVICES, 20);
                    let batch = parse(&body);
                    let started = Instant::now();
                    black_box(store.record(batch, client()).expect("store is open"));
                    elapsed += started.elapsed();
                }
                elapsed
            })
        },
    );

    let page_text = page_body(0, 5);
    let reply_text = reply_body(0);
    let page = parse(&page_text);
    let reply = parse(&reply_text);
    group.bench_function("open_session_reply", |b| {
        b.iter_batched(
            || {
                let store = SessionStore::new(limits(), Box::new(DiscardSink));
                store.record(page.clone(), client()).expect("store is open");
                (store, reply.clone())
            },
            |(store, batch)| {
                let recorded = store.record(batch, client());
                (store, recorded)
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn bench_close(c: &mut Criterion) {
    let mut group = c.benchmark_group("close");
    group.throughput(Throughput::Elements(SESSIONS_PER_FILE as u64));
    group.sample_size(20);
    group.bench_function("close_all_1000_sessions", |b| {
        b.iter_batched(
            || {
                let store = SessionStore::new(limits(), Box::new(DiscardSink));
                for device in 0..SESSIONS_PER_FILE {
                    store
                        .record(parse(&page_body(device, 5)), client())
                        .expect("store is open");
                }
                store
            },
            |store| {
                store.close_all(CloseReason::Shutdown, T0_MS + 2000);
                store
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    let sessions = closed_sessions(SESSIONS_PER_FILE);
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    for (name, codec) in [("null", Codec::Null), ("snappy", Codec::Snappy)] {
        let mut writer =
            Writer::with_codec(&SCHEMA, std::io::sink(), codec).expect("writer starts");
        let mut next = sessions.iter().cycle();
        group.bench_function(format!("append_ser_{name}"), |b| {
            b.iter(|| {
                let session = next.next().expect("cycle never ends");
                writer
                    .append_ser(SessionRecord {
                        session,
                        server_id: "bench",
                    })
                    .expect("session encodes")
            })
        });
    }
    group.finish();
}

fn bench_file(c: &mut Criterion) {
    let sessions = closed_sessions(SESSIONS_PER_FILE);
    let staging = tempfile::tempdir().expect("temporary directory");
    let mut group = c.benchmark_group("file");
    group.throughput(Throughput::Elements(SESSIONS_PER_FILE as u64));
    group.sample_size(20);
    group.bench_function("write_1000_sessions_snappy", |b| {
        b.iter(|| {
            let mut writer = PartitionWriter::new(WriterSettings {
                staging_dir: staging.path().to_owned(),
                codec: Codec::Snappy,
                server_id: "bench".to_owned(),
                max_file_bytes: u64::MAX,
                upload_interval: Duration::from_secs(3600),
            });
            for session in &sessions {
                writer.write(session, T0_MS).expect("session is written");
            }
            for file in writer.finish_all() {
                let file = file.expect("file is finished");
                std::fs::remove_file(&file.path).expect("file is removed");
            }
        })
    });
    group.finish();
}

/// Returns the router with its middleware and the server's default intake rules, over a store
/// that drops closed sessions. As in the server, `IMPRESSION_SERVER_*` variables override them.
fn router(limits: SessionLimits) -> Router {
    let metrics = Arc::new(Metrics::new());
    let sessions = SessionStore::new(limits, Box::new(DiscardSink)).with_metrics(metrics.clone());
    let cli = Cli::try_parse_from(["impression-server", "--server-id", "bench"])
        .expect("the default flags parse");
    let Command::Serve(config) = cli.into_command() else {
        unreachable!("no subcommand means serve");
    };
    let settings = config.validate().expect("the default settings are valid");
    app(AppState {
        sessions: Arc::new(sessions),
        clock: Arc::new(ManualClock::new(T0_MS + 1000)),
        intake: Arc::new(Intake::from_settings(&settings)),
        metrics,
        draining: Arc::new(AtomicBool::new(false)),
        rejected_log: Arc::new(LogLimiter::new(Duration::from_secs(10))),
    })
}

fn bench_http(c: &mut Criterion) {
    let mut group = c.benchmark_group("http");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    // One device sends page after page with new ids, and its session is cut at
    // `GROWING_MAX_ITEMS`, so the session stays in the cache and memory stays bounded. Building
    // the body and the request is not timed.
    let limits = SessionLimits {
        max_items: GROWING_MAX_ITEMS,
        ..limits()
    };

    let router = router(limits);
    let mut sent = 0;
    group.bench_function("collect_page_20_through_router", |b| {
        b.iter_custom(|iterations| {
            runtime.block_on(async {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iterations {
                    sent += 1;
                    let request = Request::builder()
                        .method(Method::POST)
                        .uri("/v1/collect")
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Body::from(nth_page_body(0, sent, 20)))
                        .expect("the request is valid");
                    let started = Instant::now();
                    let response = router.clone().oneshot(request).await;
                    elapsed += started.elapsed();
                    let status = response.expect("the router never fails").status();
                    assert_eq!(status, StatusCode::OK);
                }
                elapsed
            })
        })
    });

    // The same pages parsed and recorded without the router. The difference from the benchmark
    // above is what the HTTP layer, the middleware and the response cost.
    let store = SessionStore::new(limits, Box::new(DiscardSink));
    let mut sent = 0;
    group.bench_function("parse_and_record_page_20", |b| {
        b.iter_custom(|iterations| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iterations {
                sent += 1;
                let body = nth_page_body(0, sent, 20);
                let started = Instant::now();
                black_box(store.record(parse(&body), client()).expect("store is open"));
                elapsed += started.elapsed();
            }
            elapsed
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_parse,
    bench_record,
    bench_http,
    bench_close,
    bench_encode,
    bench_file
);
criterion_main!(benches);
