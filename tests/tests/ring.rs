//! The persistent ring end to end: outages longer than the ring, agent crashes, a reboot with
//! records of the previous boot still unacknowledged, pstore dumps and a kernel that replays
//! the previous boot's log (PRINTK_PERSIST). Real server and agent processes on loopback.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use blackbox_tests::harness::{Agent, BOOT, KmsgFile, Server, StoredLine, read_store, wait_until};

const BOOT_B: &str = "0badc0de-0000-4000-8000-0000000000b2";

/// A temporary directory, a local-directory store and a server on it.
struct Rig {
    tmp: tempfile::TempDir,
    store: String,
    server: Server,
}

impl Rig {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let store = format!("file://{}", tmp.path().join("store").display());
        let server = Server::start(&store, vec![], &["--segment-max-age-ms", "100"], tmp.path());
        Self { tmp, store, server }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn kmsg(&self, name: &str) -> KmsgFile {
        KmsgFile::new(self.path(name))
    }

    /// An agent of `device` and `boot` with its state in `state/`, uploading every 0.3 s.
    fn agent(&self, kmsg: &KmsgFile, device: &str, boot: &str, extra: &[&str]) -> Agent {
        let mut args = vec!["--interval", "0.3"];
        args.extend_from_slice(extra);
        Agent::start_boot(
            &self.server.url(),
            &self.path("state"),
            &kmsg.path,
            device,
            boot,
            &args,
        )
    }
}

/// Stored lines of `device`, grouped by boot, in stored order.
fn by_boot(lines: &[StoredLine], device: &str) -> HashMap<String, Vec<StoredLine>> {
    let mut m: HashMap<String, Vec<StoredLine>> = HashMap::new();
    for l in lines.iter().filter(|l| l.device == device) {
        m.entry(l.boot.clone()).or_default().push(l.clone());
    }
    m
}

/// Waits until `n` lines are stored, lets stragglers land, and reads the store.
fn settled(store: &str, n: usize, agent: &Agent) -> Vec<StoredLine> {
    assert!(
        wait_until(Duration::from_secs(30), || read_store(store, &[]).len()
            >= n),
        "fewer than {n} lines stored; agent log:\n{}",
        agent.log_text()
    );
    std::thread::sleep(Duration::from_millis(800));
    read_store(store, &[])
}

fn seqs(lines: &[StoredLine]) -> Vec<u64> {
    lines.iter().map(|l| l.seq).collect()
}

/// The server is down while ten times the ring's size is logged: the ring keeps the start of
/// the outage and the newest records, one gap record counts exactly what was dropped in
/// between, and once the server is back everything kept arrives, once.
#[test]
fn outage_longer_than_the_ring_keeps_head_and_tail() {
    let mut rig = Rig::new();
    rig.server.kill9();
    let mut kmsg = rig.kmsg("kmsg");
    let ring = format!("file:{}:64K", rig.path("ring").display());
    let agent = rig.agent(
        &kmsg,
        "outage",
        BOOT,
        &["--ring", &ring, "--block-size", "1024"],
    );
    let pad = "x".repeat(100);
    // About 140 bytes per record in the ring: 4,800 records are ten 64 KiB rings.
    let n = 4800u64;
    for _ in 0..(n / 400) {
        kmsg.append(400, &format!("outage {pad}"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        wait_until(Duration::from_secs(20), || agent
            .log_text()
            .contains("dropped from the middle")),
        "the ring never overflowed: {}",
        agent.log_text()
    );
    std::thread::sleep(Duration::from_secs(1));
    rig.server.restart();
    let done = wait_until(Duration::from_secs(60), || {
        read_store(&rig.store, &[]).iter().any(|l| l.seq == n - 1)
    });
    let lines = read_store(&rig.store, &[]);
    assert!(
        done,
        "the newest record never arrived: {}",
        agent.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    let lines = if lines.len() < read_store(&rig.store, &[]).len() {
        read_store(&rig.store, &[])
    } else {
        lines
    };
    let gaps: Vec<&StoredLine> = lines.iter().filter(|l| l.origin == "agent").collect();
    assert_eq!(gaps.len(), 1, "one gap record: {gaps:?}");
    let data: Vec<u64> = lines
        .iter()
        .filter(|l| l.origin == "kmsg")
        .map(|l| l.seq)
        .collect();
    let mut sorted = data.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), data.len(), "no record twice");
    // Head: 0..a, tail: b..n, nothing else.
    let a = sorted
        .iter()
        .zip(0..)
        .take_while(|(s, i)| **s == *i)
        .count() as u64;
    let b = n - (sorted.len() as u64 - a);
    assert_eq!(sorted, (0..a).chain(b..n).collect::<Vec<_>>());
    assert!(a > 100, "the start of the outage was kept ({a} records)");
    assert!(
        n - b > 100,
        "the newest records were kept ({} records)",
        n - b
    );
    let g = gaps[0];
    assert_eq!(g.seq, a);
    assert!(
        g.msg.starts_with(&format!(
            "blackbox: {} records lost (seq {a}..{})",
            b - a,
            b - 1
        )),
        "exact count and range: {}",
        g.msg
    );
}

/// `kill -9` of the agent with records only in its file ring (the kernel log moved on): after
/// the restart nothing is lost and nothing is sent twice.
#[test]
fn agent_kill9_with_a_file_ring_loses_and_duplicates_nothing() {
    let mut rig = Rig::new();
    rig.server.kill9();
    let mut kmsg = rig.kmsg("kmsg");
    let mut agent = rig.agent(&kmsg, "crashy", BOOT, &["--block-size", "4096"]);
    kmsg.append(300, "early");
    assert!(wait_until(Duration::from_secs(10), || agent
        .log_text()
        .contains("failed")));
    std::thread::sleep(Duration::from_millis(500));
    agent.kill9();
    // The kernel's buffer wrapped meanwhile: records 0..299 exist only in the ring now.
    let next = kmsg.next;
    let mut kmsg = rig.kmsg("kmsg");
    kmsg.next = next;
    kmsg.append(100, "late");
    agent.restart();
    rig.server.restart();
    let lines = settled(&rig.store, 400, &agent);
    assert_eq!(
        seqs(&lines),
        (0..400).collect::<Vec<_>>(),
        "{}",
        agent.log_text()
    );
}

/// A panic reboot while a chunk was stored but not acknowledged, with more records of the old
/// boot not sent at all: after the reboot the old boot's records go up under the old boot's
/// id, the chunk keeps its identity (so the server recognises the retry), the new boot's
/// records under the new id.
#[test]
fn previous_boot_is_uploaded_under_its_own_id_without_duplicates() {
    let mut rig = Rig::new();
    rig.server.kill9();
    rig.server.restart_with(&["--fault", "after-segment-put"]);
    let mut kmsg = rig.kmsg("kmsg");
    let mut agent = rig.agent(&kmsg, "rebooter", BOOT, &[]);
    kmsg.append(200, "boot-a");
    // The server stores the first chunk and dies before answering.
    assert!(
        rig.server.wait_exit(Duration::from_secs(20)),
        "{}",
        agent.log_text()
    );
    kmsg.append(50, "boot-a");
    std::thread::sleep(Duration::from_millis(800));
    agent.kill9(); // the panic
    rig.server.restart();
    let mut kmsg_b = rig.kmsg("kmsg-b");
    kmsg_b.append_at(100, "boot-b", |s| 200_000 + s * 1000);
    let agent_b = rig.agent(&kmsg_b, "rebooter", BOOT_B, &[]);
    let lines = settled(&rig.store, 350, &agent_b);
    let m = by_boot(&lines, "rebooter");
    assert_eq!(seqs(&m[BOOT]), (0..250).collect::<Vec<_>>());
    assert!(m[BOOT].iter().all(|l| l.msg.starts_with("boot-a")));
    assert_eq!(seqs(&m[BOOT_B]), (0..100).collect::<Vec<_>>());
    assert!(
        agent_b.log_text().contains("already stored"),
        "the retried chunk kept its identity: {}",
        agent_b.log_text()
    );
}

fn dmesg_line(level: u8, usec: u64, text: &str) -> String {
    format!(
        "<{level}>[{:>5}.{:06}] {text}\n",
        usec / 1_000_000,
        usec % 1_000_000
    )
}

/// After a panic reboot the pstore dump holds the panic itself: its lines the ring does not
/// hold are uploaded under the previous boot (origin pstore), the overlap is not, and the
/// pstore files are unlinked only after the server acknowledged them.
#[test]
fn pstore_adds_the_panic_and_is_unlinked_after_the_ack() {
    let mut rig = Rig::new();
    let mut kmsg = rig.kmsg("kmsg");
    let ts = |s: u64| 1_000_000 + s * 10_000;
    kmsg.append_at(100, "app", ts);
    let mut agent = rig.agent(&kmsg, "panicky", BOOT, &[]);
    assert!(wait_until(Duration::from_secs(20), || read_store(
        &rig.store,
        &[]
    )
    .len()
        >= 100));
    agent.kill9();
    rig.server.kill9();
    // The dump: the last records the ring also holds, then the panic the agent never saw.
    let pstore = rig.path("pstore");
    std::fs::create_dir_all(&pstore).unwrap();
    let mut dmesg = String::from("Panic#1 Part1\n");
    for s in 90..100 {
        dmesg.push_str(&dmesg_line(14, ts(s), &format!("app: line {s}")));
    }
    let panic_lines = [
        "sysrq: Trigger a crash",
        "Kernel panic - not syncing: sysrq triggered crash",
        "CPU: 0 PID: 1 Comm: sh Not tainted 6.1.0-27-amd64 #1 Debian 6.1.115-1",
    ];
    for (k, l) in panic_lines.iter().enumerate() {
        dmesg.push_str(&dmesg_line(0, 2_500_000 + k as u64, l));
    }
    std::fs::write(pstore.join("dmesg-ramoops-0"), &dmesg).unwrap();
    // The console copy overlaps the dmesg dump entirely.
    let console: String = dmesg
        .lines()
        .skip(1)
        .map(|l| format!("{}\n", &l[l.find('[').unwrap()..]))
        .collect();
    std::fs::write(pstore.join("console-ramoops-0"), console).unwrap();

    let kmsg_b = rig.kmsg("kmsg-b");
    let pstore_arg = pstore.display().to_string();
    let agent_b = rig.agent(&kmsg_b, "panicky", BOOT_B, &["--pstore-dir", &pstore_arg]);
    assert!(wait_until(Duration::from_secs(10), || agent_b
        .log_text()
        .contains("pstore:")));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        pstore.join("dmesg-ramoops-0").exists(),
        "unlinked before the server acknowledged: {}",
        agent_b.log_text()
    );
    rig.server.restart();
    assert!(
        wait_until(Duration::from_secs(30), || !pstore
            .join("dmesg-ramoops-0")
            .exists()),
        "pstore never unlinked: {}",
        agent_b.log_text()
    );
    assert!(!pstore.join("console-ramoops-0").exists());
    let lines = read_store(&rig.store, &[]);
    let m = by_boot(&lines, "panicky");
    let a = &m[BOOT];
    let kmsg_seqs: Vec<u64> = a
        .iter()
        .filter(|l| l.origin == "kmsg")
        .map(|l| l.seq)
        .collect();
    assert_eq!(kmsg_seqs, (0..100).collect::<Vec<_>>());
    let from_pstore: Vec<&StoredLine> = a.iter().filter(|l| l.origin == "pstore").collect();
    let texts: Vec<&str> = from_pstore.iter().map(|l| l.msg.as_str()).collect();
    assert_eq!(texts, panic_lines, "only the panic, once: {from_pstore:?}");
    assert_eq!(
        from_pstore.iter().map(|l| l.seq).collect::<Vec<_>>(),
        vec![100, 101, 102]
    );
    assert_eq!(from_pstore[1].mono_us, 2_500_001);
    assert!(!m.contains_key(BOOT_B), "the new boot logged nothing");
}

/// A PRINTK_PERSIST kernel shows the previous boot's records in /dev/kmsg again before the new
/// boot's. Records already acknowledged or already in the ring are not sent again; those the
/// agent never read (logged after it died) are added to the previous boot.
#[test]
fn printk_persist_replay_never_uploads_a_record_twice() {
    let mut rig = Rig::new();
    let mut kmsg = rig.kmsg("kmsg");
    let ts_a = |s: u64| 1_000_000 + s * 10_000;
    kmsg.append_at(40, "a", ts_a);
    let mut agent = rig.agent(&kmsg, "persist", BOOT, &[]);
    assert!(wait_until(Duration::from_secs(20), || read_store(
        &rig.store,
        &[]
    )
    .len()
        >= 40));
    rig.server.kill9();
    kmsg.append_at(20, "a", ts_a); // 40..59: in the ring, not acknowledged
    std::thread::sleep(Duration::from_millis(800));
    agent.kill9(); // the panic; 60..79 were logged after the agent stopped reading
    rig.server.restart();

    // The next boot's /dev/kmsg: boot A's 0..79 again, then boot B from 0 s.
    let mut replay = rig.kmsg("kmsg-b");
    replay.append_at(80, "a", ts_a);
    // This boot starts with the kernel's banner (seq 80), as every boot does.
    replay.append_raw(b"6,80,0,-;Linux version 6.1.0-test (blackbox@example) #1 SMP\n");
    replay.next = 81;
    replay.append_at(50, "b", |s| 300_000 + s * 1_000);
    let agent_b = rig.agent(&replay, "persist", BOOT_B, &[]);
    let lines = settled(&rig.store, 131, &agent_b);
    let m = by_boot(&lines, "persist");
    let mut a = seqs(&m[BOOT]);
    a.sort_unstable();
    assert_eq!(a, (0..80).collect::<Vec<_>>(), "{}", agent_b.log_text());
    assert_eq!(seqs(&m[BOOT_B]), (80..131).collect::<Vec<_>>());
    assert!(m[BOOT_B][0].msg.starts_with("Linux version"));
    assert!(m[BOOT_B][1..].iter().all(|l| l.msg.starts_with("b:")));
}
