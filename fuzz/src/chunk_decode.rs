//! `Chunk::decode` on arbitrary bytes.
//!
//! - decoding must never panic, whatever the bytes;
//! - a chunk that decodes must survive a round trip: `decode(encode(chunk)) == chunk`;
//! - `walk_members` over the same bytes must never panic and must stay inside them.
//!
//! Every input is checked twice: as it is (the CRC and size checks see it), and with its
//! checksums repaired (header CRC32, declared inflated size, trailer CRC32 and ISIZE), so that
//! mutations of the header fields and of the payload (a stored, level-0 deflate block holds the
//! JSON lines verbatim) reach the checks behind the CRCs: header sanity, inflating, line parsing.
use blackbox_protocol::chunk::walk_members;
use blackbox_protocol::{Chunk, Limits};

/// Byte offsets in a chunk's gzip header (the layout documented in `blackbox_protocol::header`):
/// gzip's XLEN, then the `BB` subfield's data after the fixed header (10), XLEN (2), subfield
/// id and length (4). The header's CRC32 is the last 4 bytes of the extra field.
const XLEN: usize = 10;
const DATA: usize = 16;
const RAW_LEN: usize = DATA + 54;
const DEFLATE_LEN: usize = DATA + 58;

/// Inflating more than this while repairing is not worth the time (the decoder's limit is 8 MiB).
const REPAIR_INFLATE_LIMIT: usize = 1 << 20;

/// The checks on one input (what the fuzz target runs); panics on a failure.
pub fn run(data: &[u8]) {
    let valid = check(data);
    let repaired = repair_checksums(data);
    if valid {
        // Keeps the repair honest: should the header layout change, this fails on the seeds at
        // once instead of silently fuzzing nothing but CRC mismatches.
        assert_eq!(
            repaired.as_deref(),
            Some(data),
            "repair_checksums changed a valid chunk: update it to the header layout"
        );
    } else if let Some(fixed) = repaired
        && fixed != data
    {
        check(&fixed);
    }
}

/// The checks on one input; true when it decoded.
fn check(data: &[u8]) -> bool {
    let limits = Limits::DEFAULT;

    let decoded = Chunk::decode(data, &limits);
    if let Ok(chunk) = &decoded {
        // Re-encoding may legitimately exceed the inflated-size limit: the input's JSON can be
        // more compact than what the encoder writes (an empty `ts`, raw DEL bytes the encoder
        // escapes as `\u007f`). Lift only that limit for the round trip; the others (record
        // count, message length) the decoder already enforced.
        let relaxed = Limits {
            max_decompressed: u32::MAX,
            ..limits
        };
        // Any level 0..=10; the choice is a function of the input, so a crash reproduces.
        let level = data.last().map_or(6, |b| b % 11);
        let bytes = chunk
            .encode(level, &relaxed)
            .expect("a decoded chunk must re-encode");
        let back = Chunk::decode(&bytes, &relaxed).expect("a re-encoded chunk must decode");
        assert_eq!(&back, chunk, "decode(encode(chunk)) != chunk");
    }

    // Walking the bytes as a segment never panics, and every member lies inside them.
    let mut end = 0u64;
    let mut members = 0usize;
    for member in walk_members(data) {
        let Ok((at, header)) = member else { break };
        assert_eq!(at, end, "members are back to back");
        end = at + header.member_len();
        assert!(end <= data.len() as u64, "member runs past the segment");
        members += 1;
    }
    // Bytes that decode as one chunk are one member that covers them all.
    if decoded.is_ok() {
        assert_eq!(members, 1, "a decoded chunk walks as one member");
        assert_eq!(
            end,
            data.len() as u64,
            "a decoded chunk's member covers all its bytes"
        );
    }
    decoded.is_ok()
}

/// A copy of `data` with the checksums a mutation breaks made right again: the trailer's CRC32
/// and ISIZE and the header's declared inflated size (when the deflate stream inflates), then
/// the header's CRC32. `None` when there is no header-shaped prefix to repair.
fn repair_checksums(data: &[u8]) -> Option<Vec<u8>> {
    let xlen = usize::from(u16::from_le_bytes([*data.get(XLEN)?, *data.get(XLEN + 1)?]));
    let header_end = XLEN + 2 + xlen;
    if xlen < 8 || data.len() < header_end {
        return None;
    }
    let mut b = data.to_vec();
    if header_end >= DEFLATE_LEN + 4 + 4 {
        let deflate_len = u32::from_le_bytes(b[DEFLATE_LEN..DEFLATE_LEN + 4].try_into().ok()?);
        let end = header_end.checked_add(usize::try_from(deflate_len).ok()?)?;
        if end.checked_add(8)? <= b.len()
            && let Ok(raw) = miniz_oxide::inflate::decompress_to_vec_with_limit(
                &b[header_end..end],
                REPAIR_INFLATE_LIMIT,
            )
        {
            let raw_len = (raw.len() as u32).to_le_bytes();
            b[RAW_LEN..RAW_LEN + 4].copy_from_slice(&raw_len);
            b[end..end + 4].copy_from_slice(&crc32fast::hash(&raw).to_le_bytes());
            b[end + 4..end + 8].copy_from_slice(&raw_len);
        }
    }
    let crc_at = header_end - 4;
    let crc = crc32fast::hash(&b[..crc_at]);
    b[crc_at..header_end].copy_from_slice(&crc.to_le_bytes());
    Some(b)
}
