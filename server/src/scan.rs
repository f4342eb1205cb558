//! A hand-written scanner for the record line the protocol writes
//! (`blackbox_protocol::line::emit`):
//!
//! ```text
//! {"ts":"…","device":"…","boot":"…","seq":N,"mono_us":N,"level":N,"facility":N,"origin":"…","msg":"…"[,"msg_b64":"…"]}
//! ```
//!
//! Parsing every line with a general JSON parser costs more than inflating it; this scanner
//! walks the fixed field order once, borrows the message, and unescapes it only when it holds a
//! backslash. A line in any other shape (another field order, extra whitespace) falls back to
//! the protocol's own serde parser, so the scanner never rejects a line the protocol accepts.
//! Lines come from stored objects, so they are outside data: nothing here can panic.
use std::borrow::Cow;

use blackbox_protocol::line;

/// The fields of one record line that readers use.
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    /// The `device` field.
    pub device: Cow<'a, str>,
    /// Sequence number.
    pub seq: u64,
    /// Monotonic µs since boot.
    pub mono_us: u64,
    /// Syslog severity.
    pub level: u8,
    /// The message as text (invalid UTF-8 was replaced by U+FFFD when the line was written).
    pub msg: Cow<'a, str>,
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn lit(&mut self, s: &[u8]) -> Option<()> {
        let end = self.at.checked_add(s.len())?;
        (self.b.get(self.at..end)? == s).then(|| self.at = end)
    }

    /// A string without escapes (ts, device, boot, origin): up to the next quote.
    fn plain_str(&mut self) -> Option<&'a [u8]> {
        let rest = self.b.get(self.at..)?;
        let n = memchr::memchr(b'"', rest)?;
        let s = &rest[..n];
        if s.contains(&b'\\') {
            return None;
        }
        self.at += n + 1;
        Some(s)
    }

    /// A decimal `u64`: one pass, no overflow check for the first 19 digits (they always fit).
    fn uint(&mut self) -> Option<u64> {
        let rest = self.b.get(self.at..)?;
        let mut v: u64 = 0;
        let mut n = 0;
        for &c in rest {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            v = if n < 19 {
                v * 10 + u64::from(d)
            } else {
                v.checked_mul(10)?.checked_add(u64::from(d))?
            };
            n += 1;
        }
        if n == 0 {
            return None;
        }
        self.at += n;
        Some(v)
    }

    /// A JSON string body with escapes, up to its closing quote (consumed). Returns the body and
    /// whether it held a backslash.
    fn escaped_str(&mut self) -> Option<(&'a [u8], bool)> {
        let start = self.at;
        let mut i = start;
        let mut escaped = false;
        loop {
            let rest = self.b.get(i..)?;
            let n = memchr::memchr2(b'"', b'\\', rest)?;
            if rest[n] == b'"' {
                self.at = i + n + 1;
                return Some((self.b.get(start..i + n)?, escaped));
            }
            escaped = true;
            i += n + 2;
        }
    }
}

/// Scans one line (without its `\n`). `None` when the line is neither in the protocol's layout
/// nor a record line the protocol's parser accepts.
pub fn scan(l: &[u8]) -> Option<Fields<'_>> {
    fast(l).or_else(|| slow(l))
}

fn fast(l: &[u8]) -> Option<Fields<'_>> {
    let mut c = Cursor { b: l, at: 0 };
    c.lit(b"{\"ts\":\"")?;
    c.plain_str()?;
    c.lit(b",\"device\":\"")?;
    let device = std::str::from_utf8(c.plain_str()?).ok()?;
    c.lit(b",\"boot\":\"")?;
    c.plain_str()?;
    c.lit(b",\"seq\":")?;
    let seq = c.uint()?;
    c.lit(b",\"mono_us\":")?;
    let mono_us = c.uint()?;
    c.lit(b",\"level\":")?;
    let level = u8::try_from(c.uint()?).ok()?;
    c.lit(b",\"facility\":")?;
    c.uint()?;
    c.lit(b",\"origin\":\"")?;
    c.plain_str()?;
    c.lit(b",\"msg\":\"")?;
    let quote = c.at - 1;
    let (body, escaped) = c.escaped_str()?;
    let end = c.at;
    match l.get(end..)? {
        b"}" => {}
        rest if rest.starts_with(b",\"msg_b64\":\"") && rest.ends_with(b"\"}") => {}
        _ => return None,
    }
    let msg = if escaped {
        Cow::Owned(serde_json::from_slice::<String>(l.get(quote..end)?).ok()?)
    } else {
        Cow::Borrowed(std::str::from_utf8(body).ok()?)
    };
    Some(Fields {
        device: Cow::Borrowed(device),
        seq,
        mono_us,
        level,
        msg,
    })
}

fn slow(l: &[u8]) -> Option<Fields<'_>> {
    let p = line::parse(l, 0, usize::MAX / 8).ok()?;
    Some(Fields {
        device: Cow::Owned(p.device.to_owned()),
        seq: p.record.seq,
        mono_us: p.record.mono_us,
        level: p.record.level,
        msg: Cow::Owned(String::from_utf8_lossy(&p.record.msg).into_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use blackbox_protocol::{BootId, DeviceId, Origin, Record, SyncPoint};

    fn emit(msg: &[u8]) -> Vec<u8> {
        let rec = Record {
            seq: 42,
            mono_us: 5_012_345,
            level: 3,
            facility: 0,
            origin: Origin::Kmsg,
            msg: msg.to_vec(),
        };
        let sync = SyncPoint {
            mono_us: 0,
            wall_us: 1_795_269_785_000_000,
            synced: true,
        };
        let mut out = Vec::new();
        line::emit(
            &mut out,
            &rec,
            &DeviceId::new("router-1").unwrap(),
            &BootId([7; 16]),
            &sync,
        );
        out.pop();
        out
    }

    #[test]
    fn scans_what_the_protocol_writes() {
        for msg in [
            &b"eth0: link up"[..],
            b"quote \" backslash \\ tab \t nl \n",
            b"\x1b[0m ctrl \x7f",
            b"not utf8 \xff\xfe end",
            "unicode \u{263a} \u{1F600}".as_bytes(),
            b"",
        ] {
            let l = emit(msg);
            let f =
                fast(&l).unwrap_or_else(|| panic!("fast path: {}", String::from_utf8_lossy(&l)));
            assert_eq!((f.seq, f.mono_us, f.level), (42, 5_012_345, 3));
            assert_eq!(f.device, "router-1");
            assert_eq!(f.msg, String::from_utf8_lossy(msg));
        }
    }

    #[test]
    fn numbers_parse_to_the_last_u64_and_no_further() {
        let parse = |t: &str| {
            let mut c = Cursor {
                b: t.as_bytes(),
                at: 0,
            };
            c.uint().map(|v| (v, c.at))
        };
        assert_eq!(parse("0,"), Some((0, 1)));
        assert_eq!(parse("42}"), Some((42, 2)));
        assert_eq!(parse("18446744073709551615"), Some((u64::MAX, 20)));
        assert_eq!(
            parse("9999999999999999999,"),
            Some((9_999_999_999_999_999_999, 19))
        );
        assert_eq!(parse("18446744073709551616"), None);
        assert_eq!(parse("99999999999999999999"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("-1"), None);
        assert_eq!(parse(",1"), None);
    }

    #[test]
    fn other_layouts_fall_back_and_garbage_is_refused() {
        let l = br#"{ "device":"d","boot":"07070707-0707-0707-0707-070707070707","seq":1,"mono_us":2,"level":6,"facility":1,"origin":"kmsg","msg":"hi","ts":"x"}"#;
        let f = scan(l).unwrap();
        assert_eq!((f.seq, f.msg.as_ref()), (1, "hi"));
        for bad in [
            &b""[..],
            b"{",
            b"{\"ts\":\"",
            b"not json",
            &emit(b"x")[..40],
        ] {
            assert!(scan(bad).is_none());
        }
        // Every prefix of a good line is refused without panicking.
        let good = emit(b"a \\ b");
        for n in 0..good.len() {
            assert!(scan(&good[..n]).is_none());
        }
    }
}
