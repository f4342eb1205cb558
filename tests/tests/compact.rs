//! `blackbox-server compact`: killed at every step, every line stays readable exactly once;
//! finished, an hour is one object per device, deduplicated and in sequence order.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Read;

use blackbox_protocol::SyncPoint;
use blackbox_tests::downstream::{Rec, boot_text, encode, post, server_cmd, server_ok};
use blackbox_tests::harness::{Server, list_store};
use blackbox_tests::s3::Weed;

const S: u64 = 1_000_000;

/// (device, boot) → the sequence numbers stored, in the order a device logged them.
type Expected = BTreeMap<(String, String), Vec<u64>>;

/// Three devices (one with two boots) through two receivers: some chunks stored twice, one
/// rebuilt chunk overlapping two others. Wall times are an hour ago.
fn fill(r0: &Server, r1: &Server, expected: &mut Expected, round: u64) {
    let w0 = blackbox_server::timespec::now_us() - 3600 * S as i64;
    for (d, device) in ["cam-1", "cam-2", "rtr-1"].iter().enumerate() {
        let boots: &[u8] = if d == 2 { &[1, 2] } else { &[1] };
        for (b, &boot) in boots.iter().enumerate() {
            let sync = SyncPoint {
                mono_us: 0,
                wall_us: w0 + (b as i64) * 100 * S as i64,
                synced: true,
            };
            let base = round * 1000;
            let chunk = |lo: u64, hi: u64| {
                let recs: Vec<Rec> = (lo..hi)
                    .map(|s| (s, s * 10_000, format!("{device} boot {boot} line {s}")))
                    .collect();
                encode(device, boot, sync, &recs)
            };
            for c in 0..5 {
                let (lo, hi) = (base + c * 20, base + c * 20 + 20);
                let body = chunk(lo, hi);
                let url = if c % 2 == 0 { r0.url() } else { r1.url() };
                assert_eq!(post(&url, device, &body), Ok(201));
                if c == 1 {
                    assert_eq!(post(&r0.url(), device, &body), Ok(201), "stored twice");
                }
            }
            assert_eq!(
                post(&r1.url(), device, &chunk(base + 10, base + 30)),
                Ok(201),
                "overlap"
            );
            expected
                .entry((device.to_string(), boot_text(boot)))
                .or_default()
                .extend(base..base + 100);
        }
    }
}

/// JSON lines → (device, boot) → sequence numbers, in the order given.
fn by_boot(text: &str) -> Expected {
    let mut got: Expected = BTreeMap::new();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let id = (
            v["device"].as_str().unwrap().into(),
            v["boot"].as_str().unwrap().into(),
        );
        got.entry(id).or_default().push(v["seq"].as_u64().unwrap());
    }
    got
}

/// Every line through `grep` (all devices, all time): each exactly once, as expected.
fn check_grep(store: &str, env: &[(String, String)], expected: &Expected, when: &str) {
    let out = server_ok(
        &[
            "grep",
            "",
            "--store",
            store,
            "--since",
            "-3d",
            "--until",
            "2100-01-01",
        ],
        env,
    );
    let mut got = by_boot(&out);
    for seqs in got.values_mut() {
        seqs.sort();
    }
    assert_eq!(&got, expected, "grep {when}");
}

/// rtr-1's narrative: both boots, each in sequence order, each line once.
fn check_narrative(store: &str, env: &[(String, String)], expected: &Expected, when: &str) {
    let out = server_ok(
        &[
            "narrative",
            "--store",
            store,
            "--device",
            "rtr-1",
            "--since",
            "-3d",
            "--until",
            "now",
        ],
        env,
    );
    let got: Vec<(String, u64)> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["boot"].as_str().unwrap().into(),
                v["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut want = Vec::new();
    for b in [1u8, 2] {
        want.extend(
            expected[&("rtr-1".to_string(), boot_text(b))]
                .iter()
                .map(|s| (boot_text(b), *s)),
        );
    }
    assert_eq!(got, want, "narrative {when}");
}

fn compact_case(
    store: &str,
    env: Vec<(String, String)>,
    dir: &std::path::Path,
    fault: Option<&str>,
) {
    let r0 = Server::start(store, env.clone(), &["--segment-max-age-ms", "30"], dir);
    let r1 = Server::start(
        store,
        env.clone(),
        &["--segment-max-age-ms", "30", "--receiver-id", "r1"],
        dir,
    );
    let mut expected = Expected::new();
    fill(&r0, &r1, &mut expected, 0);
    check_grep(store, &env, &expected, "before compaction");
    let compact = ["compact", "--store", store, "--hour", "now", "--allow-open"];
    if let Some(point) = fault {
        let out = server_cmd(&[&compact[..], &["--fault", point]].concat(), &env);
        assert!(!out.status.success(), "fault {point} should abort");
        check_grep(store, &env, &expected, &format!("after a crash {point}"));
        check_narrative(store, &env, &expected, &format!("after a crash {point}"));
    }
    server_ok(&compact, &env);
    check_grep(store, &env, &expected, "after compaction");
    check_narrative(store, &env, &expected, "after compaction");
    let keys = list_store(store, &env, "");
    assert!(
        !keys.iter().any(|k| k.starts_with("raw/")),
        "inputs deleted: {keys:?}"
    );
    let outputs: Vec<&String> = keys.iter().filter(|k| k.ends_with(".seg.gz")).collect();
    assert_eq!(outputs.len(), 3, "one object per device: {keys:?}");
    assert_eq!(
        keys.iter().filter(|k| k.ends_with(".idx")).count(),
        3,
        "{keys:?}"
    );
    // Each output, read as zcat would: one device, in sequence order, no duplicates.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let st = blackbox_server::Store::open_with(store, &env).unwrap();
    for k in &outputs {
        let bytes = rt.block_on(st.get(k)).unwrap();
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .unwrap();
        let got = by_boot(&text);
        for (id, seqs) in &got {
            assert!(k.contains(&format!("d-{}.g1.", id.0)), "{k} holds {id:?}");
            assert_eq!(seqs, &expected[id], "{k}: in order, each once");
        }
    }

    // Late segments after a compaction stay readable, and the next compaction takes them in.
    fill(&r0, &r1, &mut expected, 1);
    check_grep(store, &env, &expected, "with late segments");
    server_ok(&compact, &env);
    check_grep(store, &env, &expected, "after the second generation");
    check_narrative(store, &env, &expected, "after the second generation");
    let keys = list_store(store, &env, "");
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with("raw/") || k.contains(".g1.")),
        "{keys:?}"
    );
    assert_eq!(
        keys.iter().filter(|k| k.contains(".g2.seg.gz")).count(),
        3,
        "{keys:?}"
    );
}

fn local_case(fault: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("s").display());
    compact_case(&store, vec![], tmp.path(), Some(fault));
}

#[test]
fn compaction_killed_after_an_output_local_dir() {
    local_case("after-output");
}

#[test]
fn compaction_killed_after_the_manifest_local_dir() {
    local_case("after-manifest");
}

#[test]
fn compaction_killed_during_deletion_local_dir() {
    local_case("after-delete");
}

#[test]
fn compaction_killed_during_deletion_s3() {
    let weed = Weed::start().expect("SeaweedFS (run `cargo xtask test`, which installs it)");
    let tmp = tempfile::tempdir().unwrap();
    compact_case(
        &weed.store_url("compact"),
        weed.env(),
        tmp.path(),
        Some("after-delete"),
    );
}
