//! Writes the seed corpus of the `ring_recover` fuzz target: a handful of small inputs in its
//! format (see the docs of `src/ring_recover.rs`): real ring images for the raw,
//! blocks and whole modes (trailing zeros cut, the target pads them back), and control bytes
//! alone for the xor mode (an empty payload leaves the target's lived-in ring as it is).
//! Deterministic, so re-running it reproduces the committed files byte for byte.
//!
//! ```text
//! cd fuzz && cargo run --example make_ring_seeds          # writes corpus/ring_recover/seed-*
//! cd fuzz && cargo run --example make_ring_seeds -- DIR   # writes DIR/seed-*
//! ```

use std::path::PathBuf;

use blackbox_agent::ring::{HEADER_LEN, Ring, RingConfig};
use blackbox_protocol::SyncPoint;
use blackbox_protocol_fuzz::ring_recover::{
    OTHER_BOOT, REGION, REPAIR, WITH_GAP, WRITER, log_entry, overrun_gap,
};

// The target's input format (the rest is the target's own: `REGION`, `REPAIR`, ...).
const BS_256: u8 = 0;
const BS_512: u8 = 1;
const BS_1024: u8 = 2;
const BS_4096: u8 = 3;
const MODE_RAW: u8 = 0 << 2;
const MODE_BLOCKS: u8 = 1 << 2;
const MODE_WHOLE: u8 = 2 << 2;
const MODE_XOR: u8 = 3 << 2;
/// Byte 2: acknowledge everything, append `n` records.
const fn ops(acks: u8, appends: u8) -> u8 {
    (acks & 15) | (((appends - 1) & 7) << 4)
}

fn sync(mono_us: u64) -> SyncPoint {
    SyncPoint {
        mono_us,
        wall_us: 1_795_269_785_000_000 + mono_us as i64,
        synced: true,
    }
}

/// A small ring of `WRITER`: a few sealed blocks, one gap record, an unsealed last block.
fn image(bs: u32, records: u64) -> Vec<u8> {
    let cfg = RingConfig {
        keep_oldest_pct: 50,
        block_size: Some(bs),
    };
    let mut r = match Ring::format(vec![0u8; REGION], WRITER, cfg) {
        Ok(r) => r,
        Err((_, e)) => panic!("format: {e}"),
    };
    let lines: [&[u8]; 4] = [
        b"eth0: link up, 100Mbps, full-duplex",
        b"dropbear[412]: Child connection from 192.0.2.17:50122",
        b"EXT4-fs (mmcblk0p2): mounted filesystem with ordered data mode",
        b"watchdog: watchdog0: nowayout prevents watchdog being stopped!",
    ];
    let mut seq = 10;
    for k in 0..records {
        let t = 1_000_000 + 1_700 * k;
        let e = if k == 2 {
            overrun_gap(seq, seq + 3, 4, t)
        } else {
            log_entry(seq, t, 6, 0, lines[k as usize % lines.len()])
        };
        r.append(&WRITER, &e, &sync(t)).expect("append");
        seq = e.last_seq() + 1;
        if k % 4 == 3 && k + 1 < records {
            r.seal(&sync(t));
        }
    }
    r.into_inner()
}

fn trim(b: &[u8]) -> &[u8] {
    let end = b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
    &b[..end]
}

fn seed(ctrl: u8, pct: u8, ops: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![ctrl, pct, ops];
    v.extend_from_slice(payload);
    v
}

fn main() {
    let dir = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/ring_recover"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).expect("create the seed directory");

    let img256 = image(256, 7);
    let img512 = image(512, 9);
    let img1024 = image(1024, 6);
    // A torn last record: its length word is there, its message is cut (zeros from the
    // formatted ring the target copies the payload over).
    let torn = {
        let b = trim(&img1024[HEADER_LEN..]);
        b[..b.len() - 10].to_vec()
    };
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "raw-image-256",
            seed(MODE_RAW | BS_256, 50, ops(15, 3), trim(&img256)),
        ),
        (
            "blocks-256",
            seed(
                MODE_BLOCKS | BS_256 | WITH_GAP,
                50,
                ops(1, 4),
                trim(&img256[HEADER_LEN..]),
            ),
        ),
        (
            "blocks-1024-torn-other-boot",
            seed(MODE_BLOCKS | BS_1024 | OTHER_BOOT, 0, ops(0, 2), &torn),
        ),
        (
            "whole-512-repair",
            seed(MODE_WHOLE | BS_512 | REPAIR, 100, ops(2, 8), trim(&img512)),
        ),
        ("xor-256", seed(MODE_XOR | BS_256, 50, ops(0, 3), &[])),
        (
            "xor-4096-other-boot-gap",
            seed(
                MODE_XOR | BS_4096 | OTHER_BOOT | WITH_GAP,
                20,
                ops(15, 6),
                &[],
            ),
        ),
        (
            "xor-512-repair-flips",
            // Flips the low byte of slot A's acknowledged generation and a byte in the
            // second block's records; the repair makes their checksums right.
            seed(MODE_XOR | BS_512 | REPAIR, 75, ops(3, 2), &{
                let mut p = vec![0u8; HEADER_LEN + 512 + 120];
                p[48] = 1;
                p[HEADER_LEN + 512 + 119] = 0x20;
                p
            }),
        ),
    ];
    let mut total = 0;
    for (name, bytes) in &seeds {
        total += bytes.len();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
    }
    println!(
        "wrote {} seeds ({total} bytes) to {}",
        seeds.len(),
        dir.display()
    );
}
