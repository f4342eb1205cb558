//! One record as one JSON line. Field names are what DuckDB, `jq` and `grep` see:
//!
//! ```text
//! {"ts":"2026-11-21T14:03:05.123456Z","device":"router-1","boot":"b6a4e944-…","seq":42,
//!  "mono_us":5012345,"level":6,"facility":0,"origin":"kmsg","msg":"eth0: link up"}
//! ```
//!
//! `ts` is derived from the chunk's sync point and is informative only. `msg` is always valid
//! UTF-8 (invalid bytes replaced by U+FFFD); when the original bytes were not UTF-8 the exact
//! bytes travel in `msg_b64` too, so nothing is lost and the text stays greppable.
use alloc::borrow::Cow;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;

use base64::Engine as _;
use serde::Deserialize;

use crate::error::DecodeError;
use crate::header::{BootId, DeviceId, SyncPoint};
use crate::record::{Origin, Record};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Appends `rec` as one JSON line (with its trailing `\n`) to `out`.
pub fn emit(out: &mut Vec<u8>, rec: &Record, device: &DeviceId, boot: &BootId, sync: &SyncPoint) {
    let mut s = String::with_capacity(160 + rec.msg.len());
    // Writing into a String cannot fail.
    let _ = s.write_str("{\"ts\":\"");
    let _ = crate::time::write_rfc3339(&mut s, sync.wall_of(rec.mono_us));
    let _ = write!(
        s,
        "\",\"device\":\"{device}\",\"boot\":\"{boot}\",\"seq\":{},\"mono_us\":{},\"level\":{},\"facility\":{},\"origin\":\"{}\",\"msg\":\"",
        rec.seq,
        rec.mono_us,
        rec.level,
        rec.facility,
        rec.origin.as_str()
    );
    match core::str::from_utf8(&rec.msg) {
        Ok(text) => {
            escape_into(&mut s, text);
            s.push('"');
        }
        Err(_) => {
            escape_into(&mut s, &String::from_utf8_lossy(&rec.msg));
            s.push_str("\",\"msg_b64\":\"");
            B64.encode_string(&rec.msg, &mut s);
            s.push('"');
        }
    }
    s.push_str("}\n");
    out.extend_from_slice(s.as_bytes());
}

fn escape_into(s: &mut String, text: &str) {
    let mut start = 0;
    for (i, c) in text.char_indices() {
        let esc: Option<&str> = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => None,
            _ => continue,
        };
        s.push_str(&text[start..i]);
        match esc {
            Some(e) => s.push_str(e),
            None => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
        }
        start = i + c.len_utf8();
    }
    s.push_str(&text[start..]);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineRepr<'a> {
    #[allow(dead_code)]
    ts: &'a str,
    device: &'a str,
    boot: &'a str,
    seq: u64,
    mono_us: u64,
    level: u8,
    facility: u8,
    origin: &'a str,
    #[serde(borrow)]
    msg: Cow<'a, str>,
    #[serde(default)]
    msg_b64: Option<&'a str>,
}

/// A line that parsed: the record plus the identity fields the caller must check.
#[derive(Debug)]
pub struct ParsedLine<'a> {
    /// The record.
    pub record: Record,
    /// The `device` field as written.
    pub device: &'a str,
    /// The `boot` field as written.
    pub boot: &'a str,
}

/// Parses one line (without its `\n`). `max_msg` bounds the message length in bytes.
pub fn parse(line: &[u8], index: u32, max_msg: usize) -> Result<ParsedLine<'_>, DecodeError> {
    let bad = |reason| DecodeError::BadRecord { index, reason };
    let repr: LineRepr<'_> =
        serde_json::from_slice(line).map_err(|_| bad("not a JSON record line"))?;
    let origin = Origin::from_name(repr.origin).ok_or(bad("unknown origin"))?;
    if repr.level > Record::MAX_LEVEL {
        return Err(bad("level above 7"));
    }
    let msg = match repr.msg_b64 {
        Some(b) => {
            if b.len() > max_msg.saturating_mul(4) / 3 + 4 {
                return Err(bad("message longer than the line limit"));
            }
            B64.decode(b).map_err(|_| bad("msg_b64 is not base64"))?
        }
        None => repr.msg.into_owned().into_bytes(),
    };
    if msg.len() > max_msg {
        return Err(bad("message longer than the line limit"));
    }
    Ok(ParsedLine {
        record: Record {
            seq: repr.seq,
            mono_us: repr.mono_us,
            level: repr.level,
            facility: repr.facility,
            origin,
            msg,
        },
        device: repr.device,
        boot: repr.boot,
    })
}
