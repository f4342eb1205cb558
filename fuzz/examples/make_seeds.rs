//! Writes the seed corpus of the `chunk_decode` fuzz target: a handful of small valid chunks
//! (and one two-chunk segment for `walk_members`). Deterministic, so re-running it reproduces
//! the committed files byte for byte.
//!
//! ```text
//! cd fuzz && cargo run --example make_seeds            # writes corpus/chunk_decode/seed-*
//! cd fuzz && cargo run --example make_seeds -- DIR     # writes DIR/seed-*
//! ```

use std::path::PathBuf;

use blackbox_protocol::{BootId, Chunk, DeviceId, Limits, Origin, Record, SyncPoint};

fn rec(seq: u64, mono_us: u64, level: u8, origin: Origin, msg: &[u8]) -> Record {
    Record {
        seq,
        mono_us,
        level,
        facility: if origin == Origin::Kmsg { 0 } else { 1 },
        origin,
        msg: msg.to_vec(),
    }
}

fn chunk(device: &str, boot: u8, sync: SyncPoint, records: Vec<Record>) -> Chunk {
    let device = DeviceId::new(device).expect("valid device id");
    Chunk::new(device, BootId([boot; 16]), sync, records).expect("valid chunk")
}

fn main() {
    let dir = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/chunk_decode"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).expect("create the seed directory");

    let synced = SyncPoint {
        mono_us: 5_000_000,
        wall_us: 1_795_269_785_000_000,
        synced: true,
    };
    let unsynced = SyncPoint {
        mono_us: 0,
        wall_us: 0,
        synced: false,
    };

    // Real-looking kernel and daemon lines (loghub style).
    let kmsg: Vec<Record> = [
        &b"Linux version 2.6.5-1.358 (bhcompile@bugs.build.redhat.com) (gcc version 3.3.3)"[..],
        b"BIOS-provided physical RAM map:",
        b"eth0: link up, 100Mbps, full-duplex, lpa 0x41E1",
        b"sshd(pam_unix)[19939]: authentication failure; logname= uid=0 euid=0 tty=NODEVssh",
        b"audit(1122475266.4294965305:0): initialized",
    ]
    .iter()
    .enumerate()
    .map(|(i, m)| {
        rec(
            100 + i as u64,
            5_000_000 + 1_700 * i as u64,
            6,
            Origin::Kmsg,
            m,
        )
    })
    .collect();

    let seeds: Vec<(&str, Chunk, u8)> = vec![
        (
            "one-record",
            chunk(
                "dev-1",
                7,
                synced,
                vec![rec(1, 5_000_001, 6, Origin::Kmsg, b"hello")],
            ),
            6,
        ),
        (
            "kmsg-lines-l1",
            chunk("router-1", 0xb6, synced, kmsg.clone()),
            1,
        ),
        ("kmsg-lines-l9", chunk("router-1", 0xb6, synced, kmsg), 9),
        (
            "escapes-and-binary",
            chunk(
                "a.b_c:d-e",
                0x00,
                unsynced,
                vec![
                    rec(
                        0,
                        0,
                        0,
                        Origin::Pstore,
                        b"Kernel panic - not syncing: \"oops\"\\",
                    ),
                    rec(1, 1, 3, Origin::Pstore, b"\x1b[0mcaf\xe9 \n\r\t\x7f\x00"),
                    rec(5, 2, 7, Origin::Kmsg, "ünïcødé ✓".as_bytes()),
                    rec(6, 3, 4, Origin::Kmsg, b""),
                ],
            ),
            6,
        ),
        (
            "gap-record",
            chunk(
                "x",
                0xff,
                SyncPoint {
                    mono_us: u64::MAX,
                    wall_us: i64::MIN,
                    synced: true,
                },
                vec![
                    Record::gap(10, 19, 10, 42, "ring buffer overrun"),
                    rec(20, u64::MAX, 2, Origin::Agent, b"blackbox: agent restarted"),
                ],
            ),
            6,
        ),
        (
            "stored-level0",
            chunk(
                "sensor-0042",
                0x11,
                synced,
                (0..8u64)
                    .map(|i| {
                        let m = format!("temp={} C", 40 + i);
                        rec(1000 + 3 * i, 5_000_000 + i, 5, Origin::Kmsg, m.as_bytes())
                    })
                    .collect(),
            ),
            0,
        ),
    ];

    let limits = Limits::DEFAULT;
    let mut segment = Vec::new();
    let mut total = 0usize;
    for (name, c, level) in &seeds {
        let bytes = c.encode(*level, &limits).expect("seed encodes");
        assert_eq!(&Chunk::decode(&bytes, &limits).expect("seed decodes"), c);
        if segment.len() < 2 && matches!(*name, "one-record" | "gap-record") {
            segment.push(bytes.clone());
        }
        total += bytes.len();
        std::fs::write(dir.join(format!("seed-{name}")), &bytes).expect("write seed");
    }
    let segment = segment.concat();
    total += segment.len();
    std::fs::write(dir.join("seed-segment-two-members"), &segment).expect("write seed");
    println!(
        "wrote {} seeds ({total} bytes) to {}",
        seeds.len() + 1,
        dir.display()
    );
}
