//! The `/dev/kmsg` record format, parsed without std.
//!
//! ```text
//! 6,1234,5012345,-;eth0: link up\n          prio,seq,usec,flags[,...];text
//!  SUBSYSTEM=net\n                          optional continuation (dictionary) lines
//! ```
//! `prio` is `facility << 3 | level`. The kernel escapes non-printable bytes (and `\`) in `text`
//! as `\xNN`; [`parse`] turns them back into the original bytes.
use alloc::vec::Vec;

/// One record as read from kmsg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsgRecord {
    /// Severity 0..=7.
    pub level: u8,
    /// Facility (0 kernel, 1 user, ...).
    pub facility: u8,
    /// The kernel's sequence number (per boot).
    pub seq: u64,
    /// Monotonic timestamp, µs since boot.
    pub usec: u64,
    /// Message bytes, unescaped.
    pub msg: Vec<u8>,
}

/// Why a kmsg line did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KmsgError {
    /// No `;` separating the prefix from the text.
    NoSeparator,
    /// A prefix field is missing or not a number.
    BadPrefix(&'static str),
}

impl core::fmt::Display for KmsgError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoSeparator => f.write_str("kmsg record has no ';'"),
            Self::BadPrefix(what) => write!(f, "kmsg record prefix: bad {what}"),
        }
    }
}

impl core::error::Error for KmsgError {}

/// Parses one record: the first line of what one `read()` of /dev/kmsg returns (continuation
/// lines, if present after a `\n`, are ignored).
pub fn parse(buf: &[u8]) -> Result<KmsgRecord, KmsgError> {
    let first = buf.split(|b| *b == b'\n').next().unwrap_or(buf);
    let semi = first
        .iter()
        .position(|b| *b == b';')
        .ok_or(KmsgError::NoSeparator)?;
    let (prefix, text) = (&first[..semi], &first[semi + 1..]);
    let mut fields = prefix.split(|b| *b == b',');
    let prio = num(fields.next(), "priority")?;
    let seq = num(fields.next(), "sequence")?;
    let usec = num(fields.next(), "timestamp")?;
    let prio = u8::try_from(prio.min(255)).unwrap_or(u8::MAX);
    Ok(KmsgRecord {
        level: prio & 7,
        facility: prio >> 3,
        seq,
        usec,
        msg: unescape(text),
    })
}

fn num(f: Option<&[u8]>, what: &'static str) -> Result<u64, KmsgError> {
    let f = f.ok_or(KmsgError::BadPrefix(what))?;
    if f.is_empty() || f.len() > 20 {
        return Err(KmsgError::BadPrefix(what));
    }
    f.iter().try_fold(0u64, |acc, b| {
        let d = (*b as char)
            .to_digit(10)
            .ok_or(KmsgError::BadPrefix(what))?;
        acc.checked_mul(10)
            .and_then(|a| a.checked_add(u64::from(d)))
            .ok_or(KmsgError::BadPrefix(what))
    })
}

/// Reverses the kernel's `\xNN` escaping. A `\x` not followed by two hex digits stays as is.
pub fn unescape(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'\\'
            && text.get(i + 1) == Some(&b'x')
            && let (Some(h), Some(l)) =
                (text.get(i + 2).and_then(hex), text.get(i + 3).and_then(hex))
        {
            out.push(h << 4 | l);
            i += 4;
            continue;
        }
        out.push(text[i]);
        i += 1;
    }
    out
}

fn hex(b: &u8) -> Option<u8> {
    (*b as char).to_digit(16).map(|d| d as u8)
}

/// Formats a record the way the kernel does (used by tests and the replay tools).
pub fn format(level: u8, facility: u8, seq: u64, usec: u64, msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 32);
    let prio = u32::from(facility) << 3 | u32::from(level & 7);
    out.extend_from_slice(alloc::format!("{prio},{seq},{usec},-;").as_bytes());
    for &b in msg {
        if b < 0x20 && b != b'\t' || b >= 0x7f || b == b'\\' {
            out.extend_from_slice(alloc::format!("\\x{b:02x}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_records() {
        let r = parse(b"6,1,0,-;Command line: console=ttyS0\n").unwrap();
        assert_eq!((r.level, r.facility, r.seq, r.usec), (6, 0, 1, 0));
        assert_eq!(r.msg, b"Command line: console=ttyS0");
        let r =
            parse(b"14,2045,1234567,c,more;app: hi \\x1b[0m \\x5c\n SUBSYSTEM=net\n DEVICE=n2\n")
                .unwrap();
        assert_eq!(
            (r.level, r.facility, r.seq, r.usec),
            (6, 1, 2045, 1_234_567)
        );
        assert_eq!(r.msg, b"app: hi \x1b[0m \\");
    }

    #[test]
    fn bad_records() {
        assert_eq!(parse(b"no separator"), Err(KmsgError::NoSeparator));
        assert_eq!(parse(b"6,x,0,-;t"), Err(KmsgError::BadPrefix("sequence")));
        assert_eq!(parse(b"6,1;t"), Err(KmsgError::BadPrefix("timestamp")));
        assert_eq!(
            parse(b"6,99999999999999999999999,0,-;t"),
            Err(KmsgError::BadPrefix("sequence"))
        );
        assert_eq!(unescape(b"\\x4"), b"\\x4");
    }

    proptest::proptest! {
        #[test]
        fn format_parse_roundtrip(level in 0u8..8, fac in 0u8..24, seq: u64, usec: u64, msg: Vec<u8>) {
            let msg: Vec<u8> = msg.into_iter().filter(|b| *b != b'\n').collect();
            let r = parse(&format(level, fac, seq, usec, &msg)).unwrap();
            proptest::prop_assert_eq!(r, KmsgRecord { level, facility: fac, seq, usec, msg });
        }
    }
}

/// Where a new boot starts in a stream of kmsg records: a kernel that keeps its log buffer
/// across reboots (PRINTK_PERSIST) shows the previous boot's records first, then the current
/// boot's, which begin with the kernel's banner (`Linux version …`, facility kernel, at a
/// timestamp under a second). ARM kernels print a line before it at the same time (`Booting
/// Linux on physical CPU 0x0`): the boot begins at the first of the kernel records right before
/// the banner that are no later than the banner. Timestamps alone are not enough: on x86 they
/// restart once more early in every boot, when the TSC is calibrated.
/// Returns the indices (never 0) of the records where boots after the start of the stream begin.
pub fn boot_starts<'a>(
    records: impl IntoIterator<Item = (u8, u64, &'a [u8])>,
) -> alloc::vec::Vec<usize> {
    let records: alloc::vec::Vec<(u8, u64, &[u8])> = records.into_iter().collect();
    let mut starts = alloc::vec::Vec::new();
    for (i, &(facility, usec, msg)) in records.iter().enumerate() {
        if facility != 0 || usec >= 1_000_000 || !msg.starts_with(b"Linux version ") {
            continue;
        }
        let mut start = i;
        while start > 0 && records[start - 1].0 == 0 && records[start - 1].1 <= usec {
            start -= 1;
        }
        if start > 0 {
            starts.push(start);
        }
    }
    starts
}

#[cfg(test)]
mod boot_tests {
    use super::boot_starts;

    #[test]
    fn banners_mark_boots() {
        let banner: &[u8] = b"Linux version 6.1.0-48-amd64 (debian-kernel@lists.debian.org)";
        // One boot, with the x86 timestamp restart after TSC calibration: no split.
        let one = [
            (0, 0, banner),
            (0, 2_000, &b"tsc: Detected 2593.843 MHz processor"[..]),
            (0, 10, &b"e820: update [mem 0x00000000-0x00000fff]"[..]),
        ];
        assert!(boot_starts(one).is_empty());
        // A replayed boot, then this one.
        let two = [
            (0, 0, banner),
            (1, 5_000_000, &b"app: hello"[..]),
            (0, 0, banner),
            (0, 10, &b"x"[..]),
        ];
        assert_eq!(boot_starts(two), vec![2]);
        // A user-space line that looks like the banner is not one.
        let fake = [(0, 0, banner), (1, 10, banner)];
        assert!(boot_starts(fake).is_empty());
        // ARM: a line before the banner, at the same time, belongs to the same boot.
        let cpu: &[u8] = b"Booting Linux on physical CPU 0x0000000000 [0x411fd070]";
        let arm = [(0, 0, cpu), (0, 0, banner), (0, 10, &b"x"[..])];
        assert!(boot_starts(arm).is_empty());
        let arm_two = [
            (0, 0, cpu),
            (0, 0, banner),
            (1, 5_000_000, &b"app: hello"[..]),
            (0, 0, cpu),
            (0, 0, banner),
        ];
        assert_eq!(boot_starts(arm_two), vec![3]);
    }
}
