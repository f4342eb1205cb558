//! `blackbox-server compact`: killed at every step, every line stays readable exactly once;
//! finished, an hour (`--hour`) or a day (`--day`, `--auto`) is one object per device,
//! deduplicated and in sequence order.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use blackbox_protocol::SyncPoint;
use blackbox_tests::downstream::{
    Rec, boot_text, encode, post, put_segment, server_cmd, server_ok,
};
use blackbox_tests::harness::{Server, gunzip, list_store};
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

/// A wall-time range to read: `--since`, `--until`.
type Range<'a> = (&'a str, &'a str);

/// The range of [`compact_case`]'s lines (written an hour ago).
const RECENT: Range = ("-3d", "now");

/// Every line through `grep` (all devices, all time): each exactly once, as expected.
fn check_grep(store: &str, env: &[(String, String)], expected: &Expected, when: &str) {
    check_grep_in(store, env, RECENT, expected, when)
}

/// Every line of `range` through `grep` (all devices): each exactly once, as expected.
fn check_grep_in(
    store: &str,
    env: &[(String, String)],
    range: Range,
    expected: &Expected,
    when: &str,
) {
    let out = server_ok(
        &[
            "grep", "", "--store", store, "--since", range.0, "--until", range.1,
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
    check_narrative_in(store, env, RECENT, expected, when)
}

/// rtr-1's narrative over `range`: both boots, each in sequence order, each line once.
fn check_narrative_in(
    store: &str,
    env: &[(String, String)],
    range: Range,
    expected: &Expected,
    when: &str,
) {
    let out = server_ok(
        &[
            "narrative",
            "--store",
            store,
            "--device",
            "rtr-1",
            "--since",
            range.0,
            "--until",
            range.1,
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
    check_outputs(store, &env, &outputs, ".g1.", &expected);

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

/// Each output, read as zcat would: one device (named in the key with generation `gen`), in
/// sequence order, no duplicates; together, every line expected.
fn check_outputs(
    store: &str,
    env: &[(String, String)],
    outputs: &[&String],
    gen_: &str,
    expected: &Expected,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let st = blackbox_server::Store::open_with(store, env).unwrap();
    let mut all = Expected::new();
    for k in outputs {
        for (id, seqs) in by_boot(&gunzip(&rt.block_on(st.get(k)).unwrap())) {
            assert!(k.contains(&format!("d-{}{gen_}", id.0)), "{k} holds {id:?}");
            assert_eq!(seqs, expected[&id], "{k}: in order, each once");
            all.insert(id, seqs);
        }
    }
    assert_eq!(&all, expected, "the outputs hold every line");
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

/// Lines written straight into the ingest hours of a closed day (two days ago), as receivers
/// would have stored them then.
struct DayFill {
    store: String,
    env: Vec<(String, String)>,
    day: i64,
    /// Per (device, boot byte): the next sequence number.
    next: BTreeMap<(String, u8), u64>,
    expected: Expected,
    /// The first chunk written, stored again in every later hour (a retry that reached
    /// another receiver much later).
    first: Option<Vec<u8>>,
}

impl DayFill {
    fn new(store: &str, env: &[(String, String)]) -> Self {
        use blackbox_server::timespec::{day_of_hour, hour_of, now_us};
        Self {
            store: store.to_owned(),
            env: env.to_vec(),
            day: day_of_hour(hour_of(now_us())) - 2,
            next: BTreeMap::new(),
            expected: Expected::new(),
            first: None,
        }
    }

    /// `YYYY-MM-DD` of the day.
    fn date(&self) -> String {
        blackbox_server::timespec::day_path(self.day)
    }

    /// The day's wall-time range, for narrative and grep.
    fn range(&self) -> (String, String) {
        let d = blackbox_server::timespec::day_path;
        (d(self.day), d(self.day + 1))
    }

    /// One ingest hour's segments (`tag` makes their keys new): for each device, in the boot
    /// it is in at that hour (rtr-1 reboots at noon), five chunks of 20 records across two
    /// receivers' segments, one of them stored twice, and a rebuilt chunk overlapping two.
    fn hour(&mut self, hh: i64, tag: &str) {
        let start = (self.day * 24 + hh) * blackbox_server::timespec::HOUR_US;
        let sync = SyncPoint {
            mono_us: 0,
            wall_us: start + 60 * S as i64,
            synced: true,
        };
        let (mut r0, mut r1) = (Vec::new(), Vec::new());
        for device in ["cam-1", "cam-2", "rtr-1"] {
            let boot: u8 = if device == "rtr-1" && hh >= 12 { 2 } else { 1 };
            let next = self.next.entry((device.to_owned(), boot)).or_insert(0);
            let base = *next;
            let chunk = |lo: u64, hi: u64| {
                let recs: Vec<Rec> = (lo..hi)
                    .map(|s| {
                        let msg = format!("{device} boot {boot} line {s}");
                        (s, (s - base) * 10_000, msg)
                    })
                    .collect();
                encode(device, boot, sync, &recs)
            };
            for c in 0..5 {
                let body = chunk(base + c * 20, base + c * 20 + 20);
                if c % 2 == 0 {
                    r0.push(body);
                } else {
                    if c == 1 {
                        r0.push(body.clone());
                    }
                    r1.push(body);
                }
            }
            r1.push(chunk(base + 10, base + 30));
            *next = base + 100;
            self.expected
                .entry((device.to_owned(), boot_text(boot)))
                .or_default()
                .extend(base..base + 100);
        }
        match &self.first {
            Some(first) => r1.push(first.clone()),
            None => self.first = Some(r0[0].clone()),
        }
        let prefix = format!("raw/{}/{hh:02}", self.date());
        put_segment(
            &self.store,
            &self.env,
            &format!("{prefix}/r0-{tag}.seg.gz"),
            &r0,
        );
        put_segment(
            &self.store,
            &self.env,
            &format!("{prefix}/r1-{tag}.seg.gz"),
            &r1,
        );
    }

    /// Two chunks of cam-1 of about 6 MB of incompressible text each, in their own segment of
    /// ingest hour `hh`: an output larger than S3's smallest multipart part.
    fn bulk(&mut self, hh: i64) {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let start = (self.day * 24 + hh) * blackbox_server::timespec::HOUR_US;
        let sync = SyncPoint {
            mono_us: 0,
            wall_us: start + 120 * S as i64,
            synced: true,
        };
        let next = self.next.entry(("cam-1".to_owned(), 1)).or_insert(0);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut chunks = Vec::new();
        for _ in 0..2 {
            let base = *next;
            let recs: Vec<Rec> = (base..base + 4000)
                .map(|s| {
                    let msg: String = (0..1500)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            char::from(ALPHABET[(x % 64) as usize])
                        })
                        .collect();
                    (s, (s - base) * 1000, msg)
                })
                .collect();
            chunks.push(encode("cam-1", 1, sync, &recs));
            *next = base + 4000;
            self.expected
                .entry(("cam-1".to_owned(), boot_text(1)))
                .or_default()
                .extend(base..base + 4000);
        }
        let key = format!("raw/{}/{hh:02}/r2-bulk.seg.gz", self.date());
        put_segment(&self.store, &self.env, &key, &chunks);
    }

    /// grep and narrative over the day: every line exactly once.
    fn check(&self, when: &str) {
        let (since, until) = self.range();
        let range = (since.as_str(), until.as_str());
        check_grep_in(&self.store, &self.env, range, &self.expected, when);
        check_narrative_in(&self.store, &self.env, range, &self.expected, when);
    }

    fn keys(&self) -> Vec<String> {
        list_store(&self.store, &self.env, "")
    }
}

/// A day of four ingest hours (one compacted per device, one in two groups, two raw) rolled
/// up, killed at each of `faults` in turn and run again; then late segments in three hours
/// of the day (one compacted and rolled up before) are readable at once and `--auto` takes
/// them in as the day's second generation.
///
/// Outputs are uploaded in parts of `part_size` bytes; with `bulk`, cam-1's output is larger
/// than S3's smallest part.
fn day_case(
    store: &str,
    env: Vec<(String, String)>,
    faults: &[&str],
    part_size: usize,
    bulk: bool,
) {
    let mut f = DayFill::new(store, &env);
    for hh in [2, 7, 13, 23] {
        f.hour(hh, "a");
    }
    if bulk {
        f.bulk(2);
    }
    let date = f.date();
    server_ok(
        &["compact", "--store", store, "--hour", &format!("{date}T07")],
        &env,
    );
    server_ok(
        &[
            "compact",
            "--store",
            store,
            "--hour",
            &format!("{date}T13"),
            "--groups",
            "2",
        ],
        &env,
    );
    f.check("before the roll-up");

    let part_size = part_size.to_string();
    let roll = [
        "compact",
        "--store",
        store,
        "--day",
        &date,
        "--part-size",
        &part_size,
    ];
    for point in faults {
        let out = server_cmd(&[&roll[..], &["--fault", point]].concat(), &env);
        assert!(!out.status.success(), "fault {point} should abort");
        f.check(&format!("after a roll-up killed {point}"));
    }
    server_ok(&roll, &env);
    f.check("after the roll-up");
    let day_prefix = format!("compact/{date}/day/");
    let keys = f.keys();
    assert!(
        keys.iter().all(|k| k.starts_with(&day_prefix)),
        "only the day's objects are left: {keys:?}"
    );
    let outputs: Vec<&String> = keys.iter().filter(|k| k.ends_with(".seg.gz")).collect();
    assert_eq!(
        outputs.len(),
        3,
        "one object per device for the day: {keys:?}"
    );
    assert_eq!(
        keys.iter().filter(|k| k.ends_with(".idx")).count(),
        3,
        "{keys:?}"
    );
    check_outputs(store, &env, &outputs, ".g1.", &f.expected);

    // Late segments, also in an hour compacted and rolled up before.
    for hh in [5, 7, 23] {
        f.hour(hh, "late");
    }
    f.check("with late segments");
    let auto = [
        "compact",
        "--store",
        store,
        "--auto",
        "--part-size",
        &part_size,
    ];
    server_ok(&auto, &env);
    f.check("after --auto");
    let keys = f.keys();
    assert!(
        keys.iter().all(|k| k.starts_with(&day_prefix)),
        "only the day's objects are left: {keys:?}"
    );
    let outputs: Vec<&String> = keys.iter().filter(|k| k.ends_with(".seg.gz")).collect();
    assert_eq!(outputs.len(), 3, "{keys:?}");
    check_outputs(store, &env, &outputs, ".g2.", &f.expected);
    // The hours' generations the roll-ups took in: hour 07 was compacted again as its 2nd.
    let st = blackbox_server::Store::open_with(store, &env).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(
        &rt.block_on(st.get(&format!("{day_prefix}manifest.json")))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(m["generation"], 2, "{m}");
    assert_eq!(
        m["hours"],
        serde_json::json!({"05": 1, "07": 2, "13": 1, "23": 1}),
        "{m}"
    );
    // Nothing left to do.
    let out = server_ok(&auto, &env);
    assert_eq!(out, "", "a second --auto does nothing");
    assert_eq!(f.keys(), keys);
}

fn local_day_case(faults: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("s").display());
    // Small parts, so every output goes up as a multipart upload.
    day_case(&store, vec![], faults, 2048, false);
}

#[test]
fn day_rollup_local_dir() {
    local_day_case(&[]);
    // Today is not closed.
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("s").display());
    let out = server_cmd(&["compact", "--store", &store, "--day", "now"], &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not closed yet"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn day_rollup_killed_mid_output_local_dir() {
    local_day_case(&["mid-output"]);
}

#[test]
fn day_rollup_killed_after_an_output_local_dir() {
    local_day_case(&["after-output"]);
}

#[test]
fn day_rollup_killed_after_the_manifest_local_dir() {
    local_day_case(&["after-manifest"]);
}

#[test]
fn day_rollup_killed_during_deletion_local_dir() {
    local_day_case(&["after-delete"]);
}

#[test]
fn day_rollup_killed_at_every_step_in_turn_local_dir() {
    local_day_case(&[
        "mid-output",
        "after-output",
        "after-manifest",
        "after-delete",
    ]);
}

#[test]
fn day_rollup_killed_mid_output_and_during_deletion_s3() {
    let weed = Weed::start().expect("SeaweedFS (run `cargo xtask test`, which installs it)");
    day_case(
        &weed.store_url("day"),
        weed.env(),
        &["mid-output", "after-delete"],
        5 << 20,
        true,
    );
}

/// Grinds until nothing is left, then writes the checkpoint.
async fn settle(
    g: &mut blackbox_server::grind::Grinder,
    rules: &std::sync::Arc<blackbox_server::rules::Rules>,
) {
    while !g.step(rules).await.unwrap() {}
    g.save().await.unwrap();
}

/// Every event in the store: its key and (device, boot, seq).
async fn events(st: &blackbox_server::Store) -> Vec<(String, (String, String, u64))> {
    let mut out = Vec::new();
    for k in st.list("events/").await.unwrap() {
        for l in gunzip(&st.get(&k).await.unwrap()).lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let id = (
                v["device"].as_str().unwrap().to_owned(),
                v["boot"].as_str().unwrap().to_owned(),
                v["seq"].as_u64().unwrap(),
            );
            out.push((k.clone(), id));
        }
    }
    out
}

/// The grinder and a day roll-up: outputs whose inputs were all ground count as ground (not
/// read again); a roll-up that took in lines not ground yet has them ground, once.
#[test]
fn grind_counts_a_day_rollup_as_ground_when_its_inputs_were() {
    use blackbox_server::compact::{CompactConfig, compact_day, compact_hour};
    use blackbox_server::grind::{GrindConfig, Grinder};
    use blackbox_server::reducer::Reducer;
    use blackbox_server::rules::Rules;
    use std::sync::Arc;

    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", tmp.path().join("s").display());
    let mut f = DayFill::new(&url, &[]);
    f.hour(2, "a");
    f.hour(7, "a");
    let rules =
        Arc::new(Rules::parse("[[rule]]\nname = \"seven\"\nregex = 'line \\d*7$'\n").unwrap());
    // Every line whose sequence number ends in 7 is an event, exactly once.
    let want = |f: &DayFill| {
        let mut w: Vec<(String, String, u64)> = f
            .expected
            .iter()
            .flat_map(|((d, b), seqs)| {
                seqs.iter()
                    .filter(|s| *s % 10 == 7)
                    .map(|s| (d.clone(), b.clone(), *s))
            })
            .collect();
        w.sort();
        w
    };
    let got = |ev: &[(String, (String, String, u64))]| {
        let mut g: Vec<(String, String, u64)> = ev.iter().map(|(_, id)| id.clone()).collect();
        g.sort();
        g
    };
    let objects = |r: &Reducer| {
        r.render(0)
            .lines()
            .find_map(|l| l.strip_prefix("blackbox_grind_objects_total "))
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let st = blackbox_server::Store::open(&url).unwrap();
    let reducer = Arc::new(Reducer::default());
    let cfg = GrindConfig {
        from_hour: Some(f.day * 24),
        // No hour closes: the day's last hour stays open, where its roll-up's outputs belong.
        close_after_us: 30 * 24 * blackbox_server::timespec::HOUR_US,
        checkpoint_every: std::time::Duration::ZERO,
        parallel: 2,
        ..Default::default()
    };
    let compact = CompactConfig::default();
    let mut g = rt
        .block_on(Grinder::open(st.clone(), cfg, reducer.clone()))
        .unwrap();
    rt.block_on(settle(&mut g, &rules));
    let before = rt.block_on(events(&st));
    assert_eq!(got(&before), want(&f));
    let ground = objects(&reducer);

    // Hour 07 compacted, then the day rolled up: everything in them was ground.
    rt.block_on(compact_hour(&st, f.day * 24 + 7, &compact))
        .unwrap();
    rt.block_on(settle(&mut g, &rules));
    rt.block_on(compact_day(&st, f.day, &compact)).unwrap();
    rt.block_on(settle(&mut g, &rules));
    assert_eq!(objects(&reducer), ground, "no object ground again");
    assert_eq!(rt.block_on(events(&st)), before);

    // Late lines rolled up before the grinder saw them: ground from the day's outputs, once.
    f.hour(13, "late");
    rt.block_on(compact_day(&st, f.day, &compact)).unwrap();
    rt.block_on(settle(&mut g, &rules));
    let after = rt.block_on(events(&st));
    assert_eq!(got(&after), want(&f));
    let day_events = format!("events/{}/23/day-", f.date());
    assert!(
        after.iter().any(|(k, _)| k.starts_with(&day_events)),
        "{after:?}"
    );
    assert_eq!(objects(&reducer), ground + 3, "the day's three outputs");
}
