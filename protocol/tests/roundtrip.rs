//! Encode → decode is the identity; hostile bytes give typed errors, never panics.
// The helpers (strategies, `sample`, `with_header`) are test code outside `#[test]` functions,
// which `allow-unwrap-in-tests` does not cover.
#![allow(clippy::unwrap_used)]
use blackbox_protocol::chunk::walk_members;
use blackbox_protocol::{
    BootId, Chunk, ChunkHeader, DecodeError, DeviceId, Limits, Origin, Record, SyncPoint,
};
use proptest::prelude::*;

fn origin() -> impl Strategy<Value = Origin> {
    prop_oneof![
        Just(Origin::Kmsg),
        Just(Origin::Pstore),
        Just(Origin::Agent)
    ]
}

fn record_parts() -> impl Strategy<Value = (u64, u64, u8, u8, Origin, Vec<u8>)> {
    (
        1u64..1000,
        any::<u64>(),
        0u8..=7,
        any::<u8>(),
        origin(),
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            "[ -~]{0,200}".prop_map(String::into_bytes),
            ".{0,50}".prop_map(String::into_bytes),
        ],
    )
}

fn chunk() -> impl Strategy<Value = Chunk> {
    (
        "[A-Za-z0-9._:-]{1,64}",
        any::<[u8; 16]>(),
        any::<u64>(),
        any::<i64>(),
        any::<bool>(),
        0u64..u64::MAX / 2,
        proptest::collection::vec(record_parts(), 1..40),
    )
        .prop_map(|(dev, boot, mono, wall, synced, start, parts)| {
            let mut seq = start;
            let records = parts
                .into_iter()
                .map(|(step, mono_us, level, facility, origin, msg)| {
                    seq += step;
                    Record {
                        seq,
                        mono_us,
                        level,
                        facility,
                        origin,
                        msg,
                    }
                })
                .collect();
            let sync = SyncPoint {
                mono_us: mono,
                wall_us: wall,
                synced,
            };
            Chunk::new(DeviceId::new(&dev).unwrap(), BootId(boot), sync, records).unwrap()
        })
}

proptest! {
    #[test]
    fn encode_decode_is_identity(c in chunk(), level in 0u8..=10) {
        let bytes = c.encode(level, &Limits::DEFAULT).unwrap();
        let back = Chunk::decode(&bytes, &Limits::DEFAULT).unwrap();
        prop_assert_eq!(back, c);
    }

    #[test]
    fn any_single_byte_change_is_rejected_or_harmless(c in chunk(), pos in any::<prop::sample::Index>(), x in 1u8..=255) {
        let mut bytes = c.encode(6, &Limits::DEFAULT).unwrap();
        let i = pos.index(bytes.len());
        bytes[i] ^= x;
        // Every byte is covered by a CRC (header CRC32, payload CRC32) or checked against the
        // header. Deflate has bits that do not change the inflated bytes (padding after the last
        // block, code lengths of symbols never used): such a change may decode, but only to the
        // very same chunk, since the CRC32 covers what was inflated.
        match Chunk::decode(&bytes, &Limits::DEFAULT) {
            Err(_) => {}
            Ok(back) => prop_assert_eq!(back, c, "byte {} changed and decoded to another chunk", i),
        }
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = Chunk::decode(&bytes, &Limits::DEFAULT);
    }

    #[test]
    fn every_truncation_is_rejected(c in chunk(), cut in any::<prop::sample::Index>()) {
        let bytes = c.encode(6, &Limits::DEFAULT).unwrap();
        let n = cut.index(bytes.len());
        prop_assert!(Chunk::decode(&bytes[..n], &Limits::DEFAULT).is_err());
    }
}

fn sample(n: u64) -> Chunk {
    let records = (0..n)
        .map(|i| Record {
            seq: 100 + i,
            mono_us: 1_000_000 + i,
            level: 6,
            facility: 1,
            origin: Origin::Kmsg,
            msg: format!("line {i}").into_bytes(),
        })
        .collect();
    let sync = SyncPoint {
        mono_us: 1_000_000,
        wall_us: 1_795_269_785_000_000,
        synced: true,
    };
    Chunk::new(
        DeviceId::new("dev-1").unwrap(),
        BootId([7; 16]),
        sync,
        records,
    )
    .unwrap()
}

#[test]
fn zcat_sees_json_lines() {
    let c = sample(2);
    let bytes = c.encode(6, &Limits::DEFAULT).unwrap();
    let mut raw = Vec::new();
    let h = ChunkHeader::parse(&bytes).unwrap();
    let deflated = &bytes[h.header_len as usize..(h.header_len + h.deflate_len) as usize];
    raw.extend(miniz_oxide::inflate::decompress_to_vec(deflated).unwrap());
    let text = String::from_utf8(raw).unwrap();
    assert_eq!(
        text.lines().next().unwrap(),
        r#"{"ts":"2026-11-21T14:03:05.000000Z","device":"dev-1","boot":"07070707-0707-0707-0707-070707070707","seq":100,"mono_us":1000000,"level":6,"facility":1,"origin":"kmsg","msg":"line 0"}"#
    );
}

#[test]
fn wrong_magic() {
    let mut b = sample(3).encode(6, &Limits::DEFAULT).unwrap();
    b[0] = b'P';
    assert_eq!(
        Chunk::decode(&b, &Limits::DEFAULT),
        Err(DecodeError::BadMagic)
    );
}

#[test]
fn header_and_payload_crc() {
    let good = sample(3).encode(6, &Limits::DEFAULT).unwrap();
    let h = ChunkHeader::parse(&good).unwrap();
    let mut b = good.clone();
    b[20] ^= 1; // inside the extra field
    assert_eq!(
        Chunk::decode(&b, &Limits::DEFAULT),
        Err(DecodeError::HeaderCrcMismatch)
    );
    let mut b = good.clone();
    let n = b.len();
    b[n - 6] ^= 1; // CRC32 in the trailer
    assert_eq!(
        Chunk::decode(&b, &Limits::DEFAULT),
        Err(DecodeError::PayloadCrcMismatch)
    );
    assert!(h.member_len() == good.len() as u64);
}

#[test]
fn truncated_and_trailing() {
    let b = sample(3).encode(6, &Limits::DEFAULT).unwrap();
    assert!(matches!(
        Chunk::decode(&b[..b.len() - 1], &Limits::DEFAULT),
        Err(DecodeError::Truncated { .. })
    ));
    let mut long = b.clone();
    long.push(0);
    assert_eq!(
        Chunk::decode(&long, &Limits::DEFAULT),
        Err(DecodeError::TrailingBytes(1))
    );
}

/// Re-emits a header with some fields changed and the CRC fixed, keeping the payload.
fn with_header(bytes: &[u8], f: impl FnOnce(&mut ChunkHeader)) -> Vec<u8> {
    let mut h = ChunkHeader::parse(bytes).unwrap();
    let rest = bytes[h.header_len as usize..].to_vec();
    f(&mut h);
    let mut out = Vec::new();
    h.emit(&mut out);
    out.extend(rest);
    out
}

#[test]
fn declared_sizes_that_lie() {
    let b = sample(50).encode(6, &Limits::DEFAULT).unwrap();
    let lie = with_header(&b, |h| h.raw_len -= 1);
    assert!(matches!(
        Chunk::decode(&lie, &Limits::DEFAULT),
        Err(DecodeError::SizeMismatch { .. })
    ));
    let lie = with_header(&b, |h| h.raw_len += 1);
    assert!(matches!(
        Chunk::decode(&lie, &Limits::DEFAULT),
        Err(DecodeError::SizeMismatch { .. })
    ));
    let lie = with_header(&b, |h| h.record_count += 1);
    assert!(matches!(
        Chunk::decode(&lie, &Limits::DEFAULT),
        Err(DecodeError::BadHeader(_))
    ));
    let lie = with_header(&b, |h| h.record_count -= 1);
    assert!(matches!(
        Chunk::decode(&lie, &Limits::DEFAULT),
        Err(DecodeError::SizeMismatch {
            what: "record count",
            ..
        })
    ));
    let lie = with_header(&b, |h| h.deflate_len -= 1);
    assert!(Chunk::decode(&lie, &Limits::DEFAULT).is_err());
    let lie = with_header(&b, |h| h.id.last_seq = h.id.first_seq + 10);
    assert!(matches!(
        Chunk::decode(&lie, &Limits::DEFAULT),
        Err(DecodeError::BadHeader(_))
    ));
}

#[test]
fn decompression_bomb_is_stopped_by_the_declared_size() {
    // 64 MiB of zeros deflates to ~64 KiB. Declaring the truth trips the limit before inflating;
    // declaring a small size stops inflation at that size.
    let big = vec![b'a'; 64 << 20];
    let deflated = miniz_oxide::deflate::compress_to_vec(&big, 6);
    assert!(deflated.len() < 200_000);
    let b = sample(1).encode(6, &Limits::DEFAULT).unwrap();
    let h = ChunkHeader::parse(&b).unwrap();
    let forged = |raw_len: u32| {
        let mut h2 = h.clone();
        h2.raw_len = raw_len;
        h2.deflate_len = deflated.len() as u32;
        let mut out = Vec::new();
        h2.emit(&mut out);
        out.extend(&deflated);
        out.extend(crc32fast::hash(&big).to_le_bytes());
        out.extend((big.len() as u32).to_le_bytes());
        out
    };
    let honest = forged(big.len() as u32);
    assert!(matches!(
        Chunk::decode(&honest, &Limits::DEFAULT),
        Err(DecodeError::LimitExceeded {
            what: "declared inflated size",
            ..
        })
    ));
    let liar = forged(1 << 20);
    assert!(matches!(
        Chunk::decode(&liar, &Limits::DEFAULT),
        Err(DecodeError::SizeMismatch { .. })
    ));
}

#[test]
fn line_limits_and_foreign_lines() {
    let mut c = sample(1);
    c.records[0].msg = vec![b'x'; 20_000];
    assert!(c.encode(6, &Limits::DEFAULT).is_err());
    let small = Limits {
        max_msg: 100,
        ..Limits::DEFAULT
    };
    c.records[0].msg = vec![b'x'; 200];
    let b = c.encode(6, &Limits::DEFAULT).unwrap();
    assert!(Chunk::decode(&b, &small).is_err());
}

#[test]
fn walk_segment_without_inflating() {
    let mut seg = Vec::new();
    let a = sample(3).encode(6, &Limits::DEFAULT).unwrap();
    let b = sample(5).encode(1, &Limits::DEFAULT).unwrap();
    seg.extend(&a);
    seg.extend(&b);
    let members: Vec<_> = walk_members(&seg).map(Result::unwrap).collect();
    assert_eq!(members.len(), 2);
    assert_eq!(members[1].0, a.len() as u64);
    assert_eq!(members[1].1.record_count, 5);
    seg.truncate(seg.len() - 3);
    assert!(walk_members(&seg).nth(1).unwrap().is_err());
}

#[test]
fn non_utf8_and_control_bytes_survive() {
    let mut c = sample(1);
    c.records[0].msg = b"caf\xe9 \x1b[0m \"q\" \\ \n\r\t\x7f".to_vec();
    let b = c.encode(6, &Limits::DEFAULT).unwrap();
    assert_eq!(Chunk::decode(&b, &Limits::DEFAULT).unwrap(), c);
}
