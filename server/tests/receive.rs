//! Bad input gets a clear 4xx and nothing is stored; good input is stored once.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use blackbox_protocol::{BootId, Chunk, ChunkHeader, DeviceId, Limits, Origin, Record, SyncPoint};
use blackbox_server::{AppState, Committer, ReceiveConfig, SegmentConfig, Store, app};
use http_body_util::BodyExt;
use tower::ServiceExt;

async fn setup(rcfg: ReceiveConfig) -> (axum::Router, Store) {
    let (state, store) = setup_with(rcfg, Duration::from_millis(20)).await;
    (app(state), store)
}

async fn setup_with(rcfg: ReceiveConfig, max_age: Duration) -> (AppState, Store) {
    let store = Store::open("memory://").unwrap();
    let cfg = SegmentConfig {
        max_age,
        ..Default::default()
    };
    let (committer, _task) = Committer::start(store.clone(), cfg).await.unwrap();
    (AppState::new(committer, rcfg), store)
}

fn good(n: u64) -> Vec<u8> {
    good_from(0, n)
}

fn good_from(first: u64, n: u64) -> Vec<u8> {
    let records = (first..first + n)
        .map(|s| Record {
            seq: s,
            mono_us: s,
            level: 6,
            facility: 1,
            origin: Origin::Kmsg,
            msg: format!("line {s}").into_bytes(),
        })
        .collect();
    Chunk::new(
        DeviceId::new("dev").unwrap(),
        BootId([1; 16]),
        SyncPoint::default(),
        records,
    )
    .unwrap()
    .encode(6, &Limits::DEFAULT)
    .unwrap()
}

async fn post(app: &axum::Router, body: Vec<u8>) -> (StatusCode, String, Option<String>) {
    let req = Request::post("/v1/chunks")
        .header("x-blackbox-device", "dev")
        .header("content-length", body.len())
        .body(Body::from(body))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    (status, body, retry)
}

async fn assert_nothing_stored(store: &Store) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.list("raw/").await.unwrap(), Vec::<String>::new());
}

fn reheader(bytes: &[u8], f: impl FnOnce(&mut ChunkHeader)) -> Vec<u8> {
    let mut h = ChunkHeader::parse(bytes).unwrap();
    let rest = bytes[h.header_len as usize..].to_vec();
    f(&mut h);
    let mut out = Vec::new();
    h.emit(&mut out);
    out.extend(rest);
    out
}

#[tokio::test]
async fn each_bad_input_is_rejected_with_its_reason_and_nothing_is_stored() {
    let (app, store) = setup(ReceiveConfig {
        max_body: 64 * 1024,
        ..Default::default()
    })
    .await;
    let g = good(20);
    let mut cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = Vec::new();
    let mut wrong_magic = g.clone();
    wrong_magic[1] = 0;
    cases.push((
        "wrong magic",
        wrong_magic,
        StatusCode::BAD_REQUEST,
        "not a blackbox chunk",
    ));
    let mut bad_crc = g.clone();
    let n = bad_crc.len();
    bad_crc[n - 7] ^= 0x40;
    cases.push((
        "bad CRC",
        bad_crc,
        StatusCode::BAD_REQUEST,
        "CRC32 mismatch",
    ));
    let mut bad_hcrc = g.clone();
    bad_hcrc[30] ^= 1;
    cases.push((
        "bad header CRC",
        bad_hcrc,
        StatusCode::BAD_REQUEST,
        "header CRC mismatch",
    ));
    cases.push((
        "truncated body",
        g[..g.len() / 2].to_vec(),
        StatusCode::BAD_REQUEST,
        "truncated",
    ));
    cases.push((
        "empty body",
        Vec::new(),
        StatusCode::BAD_REQUEST,
        "truncated",
    ));
    cases.push((
        "inflated size lies",
        reheader(&g, |h| h.raw_len += 7),
        StatusCode::BAD_REQUEST,
        "does not match",
    ));
    cases.push((
        "record count lies",
        reheader(&g, |h| h.record_count -= 1),
        StatusCode::BAD_REQUEST,
        "record count",
    ));
    // Decompression bomb: 64 MiB of one byte deflates to ~64 KiB; honest or lying header.
    let big = vec![b'A'; 64 << 20];
    let deflated = miniz_oxide_bomb(&big);
    let bomb = |raw_len: u32| {
        let mut h = ChunkHeader::parse(&g).unwrap();
        h.raw_len = raw_len;
        h.deflate_len = deflated.len() as u32;
        let mut out = Vec::new();
        h.emit(&mut out);
        out.extend(&deflated);
        out.extend(crc32(&big).to_le_bytes());
        out.extend((big.len() as u32).to_le_bytes());
        out
    };
    cases.push((
        "bomb, declared",
        bomb(64 << 20),
        StatusCode::PAYLOAD_TOO_LARGE,
        "exceeds limit",
    ));
    cases.push((
        "bomb, understated",
        bomb(1 << 20),
        StatusCode::BAD_REQUEST,
        "does not match",
    ));
    cases.push((
        "oversize body",
        vec![0u8; 65 * 1024],
        StatusCode::PAYLOAD_TOO_LARGE,
        // The limit, for a client that sends several chunks a request to send fewer.
        r#""max_body":65536"#,
    ));
    for (name, body, want, reason) in cases {
        let (status, text, _) = post(&app, body).await;
        assert_eq!(status, want, "{name}: {text}");
        assert!(
            text.contains(reason),
            "{name}: reason {text:?} should mention {reason:?}"
        );
    }
    assert_nothing_stored(&store).await;
}

fn miniz_oxide_bomb(data: &[u8]) -> Vec<u8> {
    use flate2::Compression;
    use flate2::write::DeflateEncoder;
    use std::io::Write;
    let mut e = DeflateEncoder::new(Vec::new(), Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn crc32(data: &[u8]) -> u32 {
    let mut h = flate2::Crc::new();
    h.update(data);
    h.sum()
}

#[tokio::test]
async fn identity_is_checked_and_retries_are_recognised() {
    let (app, store) = setup(ReceiveConfig::default()).await;
    let g = good(5);
    // no device header
    let req = Request::post("/v1/chunks")
        .body(Body::from(g.clone()))
        .unwrap();
    assert_eq!(
        app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    // another device's chunk
    let req = Request::post("/v1/chunks")
        .header("x-blackbox-device", "other")
        .body(Body::from(g.clone()))
        .unwrap();
    assert_eq!(
        app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_nothing_stored(&store).await;
    let (s1, b1, _) = post(&app, g.clone()).await;
    let (s2, b2, _) = post(&app, g.clone()).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::OK), "{b1} {b2}");
    let keys = store.list("raw/").await.unwrap();
    assert_eq!(keys.len(), 2, "one segment and its index: {keys:?}");
}

#[tokio::test]
async fn concurrent_copies_of_one_chunk_are_stored_once() {
    let (app, store) = setup(ReceiveConfig::default()).await;
    let g = good(5);
    let results = futures::future::join_all((0..8).map(|_| post(&app, g.clone()))).await;
    let created = results
        .iter()
        .filter(|r| r.0 == StatusCode::CREATED)
        .count();
    let dup = results.iter().filter(|r| r.0 == StatusCode::OK).count();
    assert_eq!((created, dup), (1, 7));
    let seg = store
        .list("raw/")
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.ends_with(".seg.gz"))
        .unwrap();
    assert_eq!(store.get(&seg).await.unwrap().len(), g.len());
}

#[tokio::test]
async fn over_the_concurrency_limit_sheds_at_once_with_retry_after() {
    let (app, _store) = setup(ReceiveConfig {
        max_inflight: 0,
        retry_after_secs: 7,
        ..Default::default()
    })
    .await;
    let (status, text, retry) = post(&app, good(1)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert_eq!(retry.as_deref(), Some("7"));
    let req = Request::get("/healthz").body(Body::empty()).unwrap();
    assert_eq!(
        app.oneshot(req).await.unwrap().status(),
        StatusCode::OK,
        "health is not shed"
    );
}

async fn get_text(app: &axum::Router, path: &str) -> (StatusCode, String) {
    let req = Request::get(path).body(Body::empty()).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// A body that does not fit the byte budget is refused before it is read, and the budget a
/// stored chunk held is given back.
#[tokio::test]
async fn the_body_budget_sheds_before_reading_and_is_given_back() {
    let g = good(50);
    let (state, store) = setup_with(
        ReceiveConfig {
            body_budget: g.len() + 10,
            retry_after_secs: 3,
            ..Default::default()
        },
        Duration::from_millis(20),
    )
    .await;
    let app = app(state.clone());
    let (s, text, retry) = post(&app, good_from(0, 400)).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("body budget"), "{text}");
    assert_eq!(retry.as_deref(), Some("3"));
    assert_nothing_stored(&store).await;
    // One that fits, twice in a row: the first one's reservation came back.
    assert_eq!(post(&app, g.clone()).await.0, StatusCode::CREATED);
    assert_eq!(post(&app, good_from(100, 50)).await.0, StatusCode::CREATED);
    let m = state.render_metrics();
    assert!(
        m.contains("blackbox_shed_total{reason=\"memory\"} 1\n"),
        "{m}"
    );
    assert!(m.contains("\nblackbox_body_bytes_reserved 0\n"), "{m}");
}

/// A chunk waiting for its segment does not hold an in-flight place: with one place, a second
/// upload is served while the first waits for the group commit.
#[tokio::test]
async fn a_chunk_waiting_for_its_segment_does_not_hold_an_inflight_place() {
    let (state, _store) = setup_with(
        ReceiveConfig {
            max_inflight: 1,
            ..Default::default()
        },
        Duration::from_millis(400),
    )
    .await;
    let app = app(state);
    let first = tokio::spawn({
        let app = app.clone();
        async move { post(&app, good_from(0, 5)).await.0 }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (second, text, _) = post(&app, good_from(5, 5)).await;
    assert_eq!(second, StatusCode::CREATED, "{text}");
    assert_eq!(first.await.unwrap(), StatusCode::CREATED);
}

/// A body trickling in slower than the minimum rate is answered 408 at its deadline
/// (grace + declared length / rate), and its place is free again.
#[tokio::test(start_paused = true)]
async fn a_slow_body_is_cut_off_at_its_deadline() {
    let (state, store) = setup_with(
        ReceiveConfig {
            max_inflight: 1,
            min_body_rate: 100,
            body_grace: Duration::from_secs(2),
            ..Default::default()
        },
        Duration::from_millis(20),
    )
    .await;
    let app = app(state);
    let g = good(20);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    tx.send(Ok(bytes::Bytes::copy_from_slice(&g[..10])))
        .await
        .unwrap();
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|x| (x, rx))
    }));
    let req = Request::post("/v1/chunks")
        .header("x-blackbox-device", "dev")
        .header("content-length", g.len())
        .body(body)
        .unwrap();
    let started = tokio::time::Instant::now();
    let resp = app.clone().oneshot(req).await.unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    let allowed = Duration::from_secs(2) + Duration::from_secs_f64(g.len() as f64 / 100.0);
    assert!(
        took >= allowed && took < allowed + Duration::from_secs(1),
        "cut off after {took:?}, allowed {allowed:?}"
    );
    drop(tx);
    assert_eq!(
        post(&app, g).await.0,
        StatusCode::CREATED,
        "the place is free"
    );
    assert_eq!(store.list("raw/").await.unwrap().len(), 2);
}

/// After shutdown begins every new request is refused with 503, and health says so.
#[tokio::test]
async fn draining_refuses_new_requests_and_health_says_so() {
    let (state, store) = setup_with(ReceiveConfig::default(), Duration::from_millis(20)).await;
    let devices = app(state.clone());
    let ops = blackbox_server::ops_app(state.clone());
    assert_eq!(get_text(&ops, "/healthz").await.0, StatusCode::OK);
    state.begin_drain();
    let (s, text, retry) = post(&devices, good(3)).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(retry.is_some());
    assert_eq!(
        get_text(&ops, "/healthz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_nothing_stored(&store).await;
}

/// /metrics counts answers by status, bytes in, chunks stored and duplicates.
#[tokio::test]
async fn metrics_count_answers_bytes_chunks_and_duplicates() {
    let (state, _store) = setup_with(ReceiveConfig::default(), Duration::from_millis(20)).await;
    let devices = app(state.clone());
    let ops = blackbox_server::ops_app(state);
    let g = good(5);
    assert_eq!(post(&devices, g.clone()).await.0, StatusCode::CREATED);
    assert_eq!(post(&devices, g.clone()).await.0, StatusCode::OK);
    assert_eq!(
        post(&devices, vec![1, 2, 3]).await.0,
        StatusCode::BAD_REQUEST
    );
    let (s, text) = get_text(&ops, "/metrics").await;
    assert_eq!(s, StatusCode::OK);
    for want in [
        "blackbox_http_requests_total{status=\"201\"} 1".to_owned(),
        "blackbox_http_requests_total{status=\"200\"} 1".to_owned(),
        "blackbox_http_requests_total{status=\"400\"} 1".to_owned(),
        format!("blackbox_received_bytes_total {}", 2 * g.len() + 3),
        "blackbox_chunks_stored_total 1".to_owned(),
        "blackbox_chunks_duplicate_total 1".to_owned(),
        "blackbox_segments_stored_total 1".to_owned(),
        "blackbox_store_put_seconds_count 1".to_owned(),
        "blackbox_requests_in_flight 0".to_owned(),
    ] {
        assert!(text.lines().any(|l| l == want), "{want:?} missing:\n{text}");
    }
}

/// An agent sends its backlog as several chunks back to back in one body (as they lie in a
/// segment): each is checked and stored once, and the answer covers all of them.
#[tokio::test]
async fn a_batch_of_chunks_is_stored_whole_and_recognised_on_retry() {
    let (app, store) = setup(ReceiveConfig::default()).await;
    let chunks = [good_from(0, 5), good_from(5, 5), good_from(10, 5)];
    let body = chunks.concat();
    let (s1, b1, _) = post(&app, body.clone()).await;
    assert_eq!(s1, StatusCode::CREATED, "{b1}");
    let v: serde_json::Value = serde_json::from_str(&b1).unwrap();
    let answers = v["chunks"].as_array().unwrap();
    assert_eq!(answers.len(), 3, "{b1}");
    assert!(answers.iter().all(|a| a["status"] == "stored"), "{b1}");
    // The retry of a batch whose answer was lost: every chunk is a duplicate.
    let (s2, b2, _) = post(&app, body.clone()).await;
    assert_eq!(s2, StatusCode::OK, "{b2}");
    // A batch overlapping a stored one: only the new chunk is stored.
    let (s3, b3, _) = post(&app, [chunks[2].clone(), good_from(15, 5)].concat()).await;
    assert_eq!(s3, StatusCode::CREATED, "{b3}");
    assert!(b3.contains("duplicate") && b3.contains("stored"), "{b3}");
    let mut stored = 0;
    for key in store.list("raw/").await.unwrap() {
        if key.ends_with(".seg.gz") {
            let seg = store.get(&key).await.unwrap();
            stored += blackbox_protocol::chunk::walk_members(&seg).count();
        }
    }
    assert_eq!(stored, 4, "each chunk stored once");
}

/// One bad chunk refuses the whole batch, naming it, and nothing of the batch is stored (the
/// agent then sends one at a time, so that only the bad one is set aside).
#[tokio::test]
async fn a_batch_with_a_bad_or_foreign_chunk_is_refused_whole() {
    let (app, store) = setup(ReceiveConfig::default()).await;
    let mut bad = good_from(5, 5);
    let n = bad.len();
    bad[n - 7] ^= 0x40;
    let (status, text, _) = post(&app, [good_from(0, 5), bad, good_from(10, 5)].concat()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(
        text.contains("chunk 2 of 3") && text.contains("CRC32"),
        "{text}"
    );
    // Garbage after two good chunks.
    let (status, text, _) = post(
        &app,
        [good_from(0, 5), good_from(5, 5), b"junk".to_vec()].concat(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("chunk 3 of 3"), "{text}");
    // Another device's chunk in the batch.
    let other = Chunk::new(
        DeviceId::new("other").unwrap(),
        BootId([1; 16]),
        SyncPoint::default(),
        vec![Record {
            seq: 9,
            mono_us: 9,
            level: 6,
            facility: 1,
            origin: Origin::Kmsg,
            msg: b"x".to_vec(),
        }],
    )
    .unwrap()
    .encode(6, &Limits::DEFAULT)
    .unwrap();
    let (status, text, _) = post(&app, [good_from(0, 5), other].concat()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert_nothing_stored(&store).await;
}
