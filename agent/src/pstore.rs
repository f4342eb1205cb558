//! Linux pstore/ramoops records, as a 6.1 kernel shows them in `/sys/fs/pstore`, parsed
//! without std.
//!
//! ```text
//! dmesg-ramoops-0        the kernel log at an oops/panic (kmsg_dump, syslog format):
//!   Panic#1 Part1                                   header: reason#count Part<n>
//!   <6>[   11.998001] sysrq: Trigger a crash        <prio>[sec.usec] text, one line each
//!   <0>[   12.345678] Kernel panic - not syncing: sysrq triggered crash
//!
//!   ECC: No errors detected                         only with ECC enabled (not log text)
//! dmesg-ramoops-0.enc.z  the same, still compressed (the kernel could not inflate it)
//! console-ramoops-0      the previous boot's console ring: `[    1.234567] text`
//! pmsg-ramoops-0         raw bytes user space wrote to /dev/pmsg0
//! ```
//!
//! The console and pmsg files are rings that may have wrapped, and a dump that did not fit is
//! cut at its start, so the first line can be partial: lines before the first one carrying a
//! record prefix are dropped and counted in [`Dump::partial_dropped`]. A physical line without
//! a prefix after a prefixed one is a continuation line (older kernels, or text with embedded
//! newlines): it becomes its own [`PstoreLine`] with the timestamp and level of the record it
//! continues. Nothing here panics or indexes out of bounds on any input.
use alloc::string::String;
use alloc::vec::Vec;

/// One log line from a pstore file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PstoreLine {
    /// Monotonic timestamp, µs since boot (of the boot that wrote the record), if printed.
    pub mono_us: Option<u64>,
    /// Severity 0..=7, when the line carried a `<prio>` prefix (dmesg dumps).
    pub level: Option<u8>,
    /// Facility (0 kernel, 1 user, ...): from `<prio>` when present, else 0 for kernel
    /// records (dmesg, console) and 1 for pmsg.
    pub facility: u8,
    /// The text, without the prefix and without the trailing newline.
    pub text: Vec<u8>,
}

/// Which kind of pstore record a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PstoreKind {
    /// `dmesg-ramoops-N`: the kernel log dumped at an oops or panic.
    Dmesg,
    /// `console-ramoops-N`: the previous boot's console output.
    Console,
    /// `pmsg-ramoops-N`: what user space wrote to `/dev/pmsg0`.
    Pmsg,
}

impl PstoreKind {
    /// Recognises a ramoops file name (`dmesg-ramoops-N`, `console-ramoops-N`,
    /// `pmsg-ramoops-N`, each optionally ending in `.enc.z`); the flag is true for `.enc.z`
    /// (still compressed). Other backends (`efi`, `blk`, ...) and types are not recognised.
    pub fn from_file_name(name: &str) -> Option<(PstoreKind, bool)> {
        PstoreName::parse(name).map(|n| (n.kind, n.compressed))
    }

    /// The kernel's name for the type (`dmesg`, `console`, `pmsg`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dmesg => "dmesg",
            Self::Console => "console",
            Self::Pmsg => "pmsg",
        }
    }
}

impl core::fmt::Display for PstoreKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A ramoops file name taken apart: `<kind>-ramoops-<id>[.enc.z]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PstoreName {
    /// The record type.
    pub kind: PstoreKind,
    /// The record id: for dmesg the ramoops slot (0..max_dump_cnt), else 0.
    pub id: u64,
    /// Ends in `.enc.z`: the content is still compressed.
    pub compressed: bool,
}

impl PstoreName {
    /// Parses a file name; `None` unless it is exactly a ramoops dmesg/console/pmsg name.
    pub fn parse(name: &str) -> Option<Self> {
        let (stem, compressed) = match name.strip_suffix(".enc.z") {
            Some(s) => (s, true),
            None => (name, false),
        };
        let (kind, id) = [
            (PstoreKind::Dmesg, "dmesg-ramoops-"),
            (PstoreKind::Console, "console-ramoops-"),
            (PstoreKind::Pmsg, "pmsg-ramoops-"),
        ]
        .into_iter()
        .find_map(|(k, p)| stem.strip_prefix(p).map(|id| (k, id)))?;
        let id = number(id.as_bytes(), 20)?;
        Some(Self {
            kind,
            id,
            compressed,
        })
    }
}

/// The parsed content of one pstore file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dump {
    /// The dmesg header line, e.g. `Panic#1 Part1` (see [`Dump::header`]); `None` for console
    /// and pmsg, or when the first line is not a header.
    pub reason: Option<String>,
    /// The log lines, oldest first.
    pub lines: Vec<PstoreLine>,
    /// Physical lines dropped because they came before the first line with a record prefix
    /// (the ring wrapped, or the dump was cut, mid-line).
    pub partial_dropped: usize,
    /// The ECC notice ramoops appends to the file when ECC is on, as one line without its
    /// surrounding newlines (`ECC: No errors detected`,
    /// `ECC: 3 Corrected bytes, 0 unrecoverable blocks`); `None` when ECC is off.
    pub ecc: Option<String>,
}

/// A dmesg dump header taken apart: `<reason>#<count> Part<part>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpHeader<'a> {
    /// `Panic`, `Oops`, `Emergency`, `Shutdown`, `Unknown` (6.1), or older kernels'
    /// `Restart`, `Halt`, `Poweroff`: any ASCII word is accepted.
    pub reason: &'a str,
    /// The dump counter of the boot that wrote it (1 for its first dump).
    pub count: u32,
    /// The part: 1 holds the newest log text, 2 the text just before it, and so on.
    pub part: u32,
}

impl Dump {
    /// The header taken apart, if [`Dump::reason`] is a well-formed dmesg header.
    pub fn header(&self) -> Option<DumpHeader<'_>> {
        self.reason.as_deref().and_then(parse_header)
    }
}

/// Why a compressed record could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PstoreError {
    /// Inflating would produce more than the limit (bytes).
    TooLarge(usize),
    /// The compressed stream ends before its final block.
    Truncated,
    /// Not a deflate stream, or a damaged one (or another compressor: lzo, lz4, zstd, ...).
    Corrupt,
}

impl core::fmt::Display for PstoreError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooLarge(limit) => write!(f, "pstore record inflates to more than {limit} bytes"),
            Self::Truncated => f.write_str("pstore record: compressed stream is truncated"),
            Self::Corrupt => f.write_str("pstore record: not a valid deflate stream"),
        }
    }
}

impl core::error::Error for PstoreError {}

/// Parses a file's content by kind: splits off the ECC notice, inflates it when `compressed`
/// (at most `max_out` bytes), and parses the text with [`parse_dmesg`], [`parse_console`] or
/// [`parse_pmsg`].
pub fn parse_file(
    kind: PstoreKind,
    compressed: bool,
    content: &[u8],
    max_out: usize,
) -> Result<Dump, PstoreError> {
    if !compressed {
        return Ok(parse(kind, content));
    }
    // The kernel appends the ECC notice after the compressed bytes.
    let (data, ecc) = split_ecc(content);
    let text = decompress(data, max_out)?;
    let mut dump = parse(kind, &text);
    if dump.ecc.is_none() {
        dump.ecc = ecc;
    }
    Ok(dump)
}

/// Parses uncompressed content by kind.
pub fn parse(kind: PstoreKind, content: &[u8]) -> Dump {
    match kind {
        PstoreKind::Dmesg => parse_dmesg(content),
        PstoreKind::Console => parse_console(content),
        PstoreKind::Pmsg => parse_pmsg(content),
    }
}

/// Parses a `dmesg-ramoops-N` record: a `Panic#1 Part1` header line, then kmsg_dump lines
/// `<prio>[sec.usec] text` (the timestamp is absent with `printk.time=0`; a
/// `CONFIG_PRINTK_CALLER` field `[  T123]` after it is dropped). A line is a record start
/// when it has a valid `<prio>` or timestamp prefix.
pub fn parse_dmesg(content: &[u8]) -> Dump {
    let (body, ecc) = split_ecc(content);
    let (first, rest) = match body.iter().position(|b| *b == b'\n') {
        Some(i) => (&body[..i], body.get(i + 1..).unwrap_or_default()),
        None => (body, &[][..]),
    };
    let header = core::str::from_utf8(first)
        .ok()
        .filter(|s| parse_header(s).is_some());
    let (reason, body) = match header {
        Some(h) => (Some(String::from(h)), rest),
        None => (None, body),
    };
    let (lines, partial_dropped) = parse_lines(body, 0, false);
    Dump {
        reason,
        lines,
        partial_dropped,
        ecc,
    }
}

/// Parses a `console-ramoops-N` record: console lines `[sec.usec] text` (with
/// `console_msg_format=syslog` also `<prio>`). If no line at all has a prefix (`printk.time=0`),
/// every line is kept with no timestamp, since a partial first line cannot be told apart.
pub fn parse_console(content: &[u8]) -> Dump {
    let (body, ecc) = split_ecc(content);
    let (lines, partial_dropped) = parse_lines(body, 0, true);
    Dump {
        reason: None,
        lines,
        partial_dropped,
        ecc,
    }
}

/// Parses a `pmsg-ramoops-N` record: raw user-space bytes split on `\n`, no timestamps,
/// facility 1 (user), the empty piece after a final `\n` dropped. The ring may have wrapped,
/// so the first line may be partial: that cannot be detected and it is kept. A final ECC
/// notice is split off as for the other kinds.
pub fn parse_pmsg(content: &[u8]) -> Dump {
    let (body, ecc) = split_ecc(content);
    let lines = split_lines(body)
        .map(|l| PstoreLine {
            mono_us: None,
            level: None,
            facility: 1,
            text: l.to_vec(),
        })
        .collect();
    Dump {
        reason: None,
        lines,
        partial_dropped: 0,
        ecc,
    }
}

/// Inflates a `.enc.z` record: raw deflate (what 6.x pstore and the crypto `deflate` compressor
/// write), else zlib-wrapped deflate. Never allocates or returns more than `max_out` bytes;
/// bytes after the end of the stream (the ECC notice) are ignored.
pub fn decompress(content: &[u8], max_out: usize) -> Result<Vec<u8>, PstoreError> {
    use miniz_oxide::inflate::{
        decompress_to_vec_with_limit as raw, decompress_to_vec_zlib_with_limit as zlib,
    };
    // One byte over the limit tells "exactly max_out" from "more than max_out".
    let limit = max_out.saturating_add(1);
    let check = |out: Vec<u8>| {
        if out.len() > max_out {
            Err(PstoreError::TooLarge(max_out))
        } else {
            Ok(out)
        }
    };
    let raw_err = match raw(content, limit) {
        Ok(out) => return check(out),
        Err(e) => inflate_error(e.status, max_out),
    };
    if raw_err == PstoreError::TooLarge(max_out) {
        return Err(raw_err);
    }
    match zlib(content, limit) {
        Ok(out) => check(out),
        // Only trust the zlib diagnosis when the zlib header is valid.
        Err(e) if zlib_header(content) => Err(inflate_error(e.status, max_out)),
        Err(_) => Err(raw_err),
    }
}

fn inflate_error(status: miniz_oxide::inflate::TINFLStatus, max_out: usize) -> PstoreError {
    use miniz_oxide::inflate::TINFLStatus as S;
    match status {
        S::HasMoreOutput => PstoreError::TooLarge(max_out),
        S::FailedCannotMakeProgress | S::NeedsMoreInput => PstoreError::Truncated,
        _ => PstoreError::Corrupt,
    }
}

fn zlib_header(b: &[u8]) -> bool {
    match b {
        [cmf, flg, ..] => {
            cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0
        }
        _ => false,
    }
}

/// Splits off the ECC notice ramoops appends when ECC is on (`\nECC: ...\n` at the very end),
/// returning the content before it and the notice text (starting at `ECC:`).
pub fn split_ecc(content: &[u8]) -> (&[u8], Option<String>) {
    let Some(body) = content.strip_suffix(b"\n") else {
        return (content, None);
    };
    let Some(nl) = body.iter().rposition(|b| *b == b'\n') else {
        return (content, None);
    };
    let line = body.get(nl + 1..).unwrap_or_default();
    let plausible = line.starts_with(b"ECC: ")
        && line.len() <= 128
        && line.iter().all(|b| (0x20..0x7f).contains(b));
    if !plausible {
        return (content, None);
    }
    (
        content.get(..nl).unwrap_or_default(),
        Some(String::from_utf8_lossy(line).into_owned()),
    )
}

/// Parses a timestamp `[%5lu.%06lu]` at the start of `b`: `[`, spaces, 1..=20 digits, `.`,
/// exactly 6 digits, `]`. Returns µs and the bytes consumed.
pub fn parse_timestamp(b: &[u8]) -> Option<(u64, usize)> {
    let rest = b.strip_prefix(b"[")?;
    let spaces = rest.iter().take_while(|c| **c == b' ').count();
    let rest = rest.get(spaces..)?;
    let int_len = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    let secs = number(rest.get(..int_len)?, 20)?;
    let rest = rest.get(int_len..)?.strip_prefix(b".")?;
    let frac = rest.get(..6)?;
    let usec = number(frac, 6)?;
    if rest.get(6) != Some(&b']') {
        return None;
    }
    let mono_us = secs.checked_mul(1_000_000)?.checked_add(usec)?;
    Some((mono_us, 1 + spaces + int_len + 1 + 6 + 1))
}

/// The prefix of one physical line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prefix {
    prio: Option<u16>,
    mono_us: Option<u64>,
    text_start: usize,
}

impl Prefix {
    fn is_record(&self) -> bool {
        self.prio.is_some() || self.mono_us.is_some()
    }
}

/// `<prio>` (0..=2047), then `[sec.usec]`, then a caller id `[  T123]`/`[ C1]`, each optional,
/// then one space if a timestamp or caller id was there (as the kernel's info_print_prefix).
fn parse_prefix(line: &[u8]) -> Prefix {
    let mut i = 0;
    let prio = parse_prio(line);
    if let Some((_, n)) = prio {
        i += n;
    }
    let rest = line.get(i..).unwrap_or_default();
    let ts = parse_timestamp(rest);
    if let Some((_, n)) = ts {
        i += n;
    }
    let rest = line.get(i..).unwrap_or_default();
    let caller = parse_caller(rest);
    if let Some(n) = caller {
        i += n;
    }
    if (ts.is_some() || caller.is_some()) && line.get(i) == Some(&b' ') {
        i += 1;
    }
    Prefix {
        prio: prio.map(|(p, _)| p),
        mono_us: ts.map(|(t, _)| t),
        text_start: i,
    }
}

fn parse_prio(b: &[u8]) -> Option<(u16, usize)> {
    let rest = b.strip_prefix(b"<")?;
    let len = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    let prio = number(rest.get(..len)?, 4)?;
    if prio > 2047 || rest.get(len) != Some(&b'>') {
        return None;
    }
    Some((u16::try_from(prio).ok()?, len + 2))
}

fn parse_caller(b: &[u8]) -> Option<usize> {
    let rest = b.strip_prefix(b"[")?;
    let spaces = rest.iter().take_while(|c| **c == b' ').count();
    let rest = rest.get(spaces..)?;
    if !matches!(rest.first(), Some(b'T' | b'C')) {
        return None;
    }
    let digits = rest.get(1..)?;
    let len = digits.iter().take_while(|c| c.is_ascii_digit()).count();
    if !(1..=10).contains(&len) || digits.get(len) != Some(&b']') {
        return None;
    }
    Some(1 + spaces + 1 + len + 1)
}

/// `Reason#count Partpart`, nothing else.
fn parse_header(s: &str) -> Option<DumpHeader<'_>> {
    let (reason, rest) = s.split_once('#')?;
    if reason.is_empty() || reason.len() > 32 || !reason.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    let (count, part) = rest.split_once(" Part")?;
    let count = u32::try_from(number(count.as_bytes(), 10)?).ok()?;
    let part = u32::try_from(number(part.as_bytes(), 10)?).ok()?;
    Some(DumpHeader {
        reason,
        count,
        part,
    })
}

/// Lines split on `\n`; the empty piece after a final `\n` is omitted (so `""` has no lines
/// and `"\n"` one empty line).
fn split_lines(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    let empty = body.is_empty();
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    body.split(|b| *b == b'\n').filter(move |_| !empty)
}

fn parse_lines(body: &[u8], facility: u8, keep_unprefixed: bool) -> (Vec<PstoreLine>, usize) {
    let keep_all = keep_unprefixed && !split_lines(body).any(|l| parse_prefix(l).is_record());
    let mut lines: Vec<PstoreLine> = Vec::new();
    let mut dropped = 0;
    // The record the following unprefixed lines continue: (mono_us, level, facility).
    let mut current: Option<(Option<u64>, Option<u8>, u8)> =
        keep_all.then_some((None, None, facility));
    for line in split_lines(body) {
        let p = parse_prefix(line);
        if p.is_record() {
            let (level, fac) = match p.prio {
                Some(prio) => (
                    Some((prio & 7) as u8),
                    u8::try_from(prio >> 3).unwrap_or(u8::MAX),
                ),
                None => (None, facility),
            };
            current = Some((p.mono_us, level, fac));
        }
        let Some((mono_us, level, facility)) = current else {
            dropped += 1;
            continue;
        };
        let text = if p.is_record() {
            line.get(p.text_start..).unwrap_or_default()
        } else {
            line
        };
        lines.push(PstoreLine {
            mono_us,
            level,
            facility,
            text: text.to_vec(),
        });
    }
    (lines, dropped)
}

/// A decimal number of 1..=`max_digits` ASCII digits, without overflow.
fn number(b: &[u8], max_digits: usize) -> Option<u64> {
    if b.is_empty() || b.len() > max_digits {
        return None;
    }
    b.iter().try_fold(0u64, |acc, c| {
        let d = (*c as char).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn line(mono_us: Option<u64>, level: Option<u8>, facility: u8, text: &str) -> PstoreLine {
        PstoreLine {
            mono_us,
            level,
            facility,
            text: text.as_bytes().to_vec(),
        }
    }

    const PANIC: &str = "Panic#1 Part1\n\
<6>[   11.998001] sysrq: Trigger a crash\n\
<0>[   12.345678] Kernel panic - not syncing: sysrq triggered crash\n\
<4>[   12.345700] CPU: 0 PID: 1 Comm: sh Not tainted 6.1.0 #1\n\
<4>[   12.345710] Hardware name: Generic DT based system\n\
<4>[   12.345720] Call trace:\n\
<4>[   12.345721]  dump_backtrace+0xe4/0x140\n\
<4>[   12.345722]  panic+0x1a0/0x3a8\n\
<0>[   12.345800] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---\n";

    #[test]
    fn panic_dump() {
        let d = parse_dmesg(PANIC.as_bytes());
        assert_eq!(d.reason.as_deref(), Some("Panic#1 Part1"));
        assert_eq!(
            d.header(),
            Some(DumpHeader {
                reason: "Panic",
                count: 1,
                part: 1
            })
        );
        assert_eq!((d.partial_dropped, d.ecc.as_deref()), (0, None));
        assert_eq!(d.lines.len(), 8);
        assert_eq!(
            d.lines[0],
            line(Some(11_998_001), Some(6), 0, "sysrq: Trigger a crash")
        );
        assert_eq!(
            d.lines[1],
            line(
                Some(12_345_678),
                Some(0),
                0,
                "Kernel panic - not syncing: sysrq triggered crash"
            )
        );
        // The leading space of a backtrace line is text, not prefix.
        assert_eq!(d.lines[5].text, b" dump_backtrace+0xe4/0x140");
    }

    #[test]
    fn oops_with_partial_first_line_ecc_and_user_facility() {
        let s = "Oops#2 Part1\n\
ee (order: 3, 32768 bytes, linear)\n\
<6>[    0.010000] pid_max: default: 32768 minimum: 301\n\
<14>[    5.500000] init: starting pid 95, tty '': '/etc/init.d/rcS'\n\
<1>[  123.000001] Unable to handle kernel NULL pointer dereference at virtual address 0000000000000040\n\
<4>[  123.000100] Internal error: Oops: 96000005 [#1] PREEMPT SMP\n\
\n\
ECC: No errors detected\n";
        let d = parse_dmesg(s.as_bytes());
        assert_eq!(d.reason.as_deref(), Some("Oops#2 Part1"));
        assert_eq!(d.header().map(|h| (h.reason, h.count)), Some(("Oops", 2)));
        assert_eq!(d.partial_dropped, 1);
        assert_eq!(d.ecc.as_deref(), Some("ECC: No errors detected"));
        assert_eq!(d.lines.len(), 4);
        assert_eq!(
            d.lines[1],
            line(
                Some(5_500_000),
                Some(6),
                1,
                "init: starting pid 95, tty '': '/etc/init.d/rcS'"
            )
        );
        assert_eq!(
            d.lines[3].text,
            b"Internal error: Oops: 96000005 [#1] PREEMPT SMP"
        );
    }

    #[test]
    fn continuation_caller_and_untimed_lines() {
        let s = "Emergency#1 Part1\n\
<4>[   1.500000][    T1] first\n\
second line of the same record\n\
<3>[  T42] no time, caller only\n\
<5>no time at all\n\
<6>[    2.000000] \n\
<6>[ 3.000001] x";
        let d = parse_dmesg(s.as_bytes());
        assert_eq!(d.header().map(|h| h.reason), Some("Emergency"));
        assert_eq!(
            d.lines,
            vec![
                line(Some(1_500_000), Some(4), 0, "first"),
                line(
                    Some(1_500_000),
                    Some(4),
                    0,
                    "second line of the same record"
                ),
                line(None, Some(3), 0, "no time, caller only"),
                line(None, Some(5), 0, "no time at all"),
                line(Some(2_000_000), Some(6), 0, ""),
                line(Some(3_000_001), Some(6), 0, "x"),
            ]
        );
    }

    #[test]
    fn headers() {
        for (h, ok) in [
            ("Panic#1 Part1", true),
            ("Oops#12 Part3", true),
            ("Shutdown#1 Part1", true),
            ("Restart#1 Part1", true),
            ("Halt#1 Part1", true),
            ("Poweroff#1 Part1", true),
            ("Unknown#1 Part1", true),
            ("Panic#1", false),
            ("Panic#x Part1", false),
            ("Panic#1 Part1 ", false),
            ("#1 Part1", false),
            ("Pa nic#1 Part1", false),
            ("Panic#99999999999 Part1", false),
        ] {
            assert_eq!(parse_header(h).is_some(), ok, "{h}");
        }
        // No header: the first line is an ordinary line (or partial).
        let d = parse_dmesg(b"<6>[    1.000000] a\n");
        assert_eq!((d.reason, d.lines.len()), (None, 1));
        let d = parse_dmesg(b"Panic#1 Part1");
        assert_eq!(
            (d.reason.as_deref(), d.lines.len()),
            (Some("Panic#1 Part1"), 0)
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp(b"[    0.000000]"), Some((0, 14)));
        assert_eq!(
            parse_timestamp(b"[12345.678901] x"),
            Some((12_345_678_901, 14))
        );
        assert_eq!(
            parse_timestamp(b"[1234567.000001]"),
            Some((1_234_567_000_001, 16))
        );
        for bad in [
            &b"[    1.23456]"[..],
            b"[    1.2345678]",
            b"[     .123456]",
            b"[    1,123456]",
            b"[  -1.000000]",
            b"[    1.000000",
            b"    1.000000]",
            b"[ 1 .000000]",
            b"[99999999999999999999.000000]",
            b"[",
            b"",
        ] {
            assert_eq!(
                parse_timestamp(bad),
                None,
                "{:?}",
                core::str::from_utf8(bad)
            );
        }
        assert_eq!(parse_prio(b"<2047>"), Some((2047, 6)));
        assert_eq!(parse_prio(b"<2048>"), None);
        assert_eq!(parse_prio(b"<>"), None);
        assert_eq!(parse_prio(b"<6"), None);
    }

    #[test]
    fn console_wrapped() {
        let s = "ading: sda1 sda2\n\
[    3.100000] EXT4-fs (mmcblk0p2): mounted filesystem with ordered data mode\n\
[    3.516247] reboot: Restarting system\n\
\n\
ECC: 1 Corrected bytes, 0 unrecoverable blocks\n";
        let d = parse_console(s.as_bytes());
        assert_eq!(d.reason, None);
        assert_eq!(d.partial_dropped, 1);
        assert_eq!(
            d.ecc.as_deref(),
            Some("ECC: 1 Corrected bytes, 0 unrecoverable blocks")
        );
        assert_eq!(
            d.lines,
            vec![
                line(
                    Some(3_100_000),
                    None,
                    0,
                    "EXT4-fs (mmcblk0p2): mounted filesystem with ordered data mode"
                ),
                line(Some(3_516_247), None, 0, "reboot: Restarting system"),
            ]
        );
    }

    #[test]
    fn console_without_timestamps_keeps_everything() {
        let d = parse_console(b"Booting Linux on physical CPU 0x0\nMachine model: X\n");
        assert_eq!(d.partial_dropped, 0);
        assert_eq!(
            d.lines,
            vec![
                line(None, None, 0, "Booting Linux on physical CPU 0x0"),
                line(None, None, 0, "Machine model: X"),
            ]
        );
    }

    #[test]
    fn pmsg() {
        let d = parse_pmsg(b"app: started\n\napp: [1.000000] not a timestamp here\n");
        assert_eq!(
            d.lines,
            vec![
                line(None, None, 1, "app: started"),
                line(None, None, 1, ""),
                line(None, None, 1, "app: [1.000000] not a timestamp here"),
            ]
        );
        assert_eq!(parse_pmsg(b"").lines, vec![]);
        assert_eq!(parse_pmsg(b"\n").lines, vec![line(None, None, 1, "")]);
        assert_eq!(parse_pmsg(b"no newline").lines.len(), 1);
    }

    #[test]
    fn ecc_notice() {
        assert_eq!(
            split_ecc(b"a\n\nECC: No errors detected\n"),
            (&b"a\n"[..], Some("ECC: No errors detected".into()))
        );
        assert_eq!(
            split_ecc(b"\nECC: No errors detected\n"),
            (&b""[..], Some("ECC: No errors detected".into()))
        );
        // Not at the end, not after a newline, or missing the final newline: log text.
        for s in [
            &b"ECC: No errors detected\n"[..],
            b"a\nECC: No errors detected",
            b"a\nECC: x\nb\n",
        ] {
            assert_eq!(split_ecc(s), (s, None));
        }
    }

    #[test]
    fn file_names() {
        use PstoreKind::*;
        assert_eq!(
            PstoreKind::from_file_name("dmesg-ramoops-0"),
            Some((Dmesg, false))
        );
        assert_eq!(
            PstoreKind::from_file_name("dmesg-ramoops-12.enc.z"),
            Some((Dmesg, true))
        );
        assert_eq!(
            PstoreKind::from_file_name("console-ramoops-0"),
            Some((Console, false))
        );
        assert_eq!(
            PstoreKind::from_file_name("pmsg-ramoops-0"),
            Some((Pmsg, false))
        );
        assert_eq!(
            PstoreName::parse("dmesg-ramoops-3"),
            Some(PstoreName {
                kind: Dmesg,
                id: 3,
                compressed: false
            })
        );
        for bad in [
            "dmesg-efi-165234234001",
            "ftrace-ramoops-0",
            "dmesg-ramoops-",
            "dmesg-ramoops-x",
            "dmesg-ramoops--1",
            "dmesg-ramoops-0.enc",
            "dmesg-ramoops-0.enc.z.enc.z",
            "console-ramoops",
            "dmesg-ramoops-99999999999999999999999",
            "",
        ] {
            assert_eq!(PstoreKind::from_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn compressed() {
        use miniz_oxide::deflate::{compress_to_vec, compress_to_vec_zlib};
        let raw = compress_to_vec(PANIC.as_bytes(), 6);
        assert_eq!(decompress(&raw, 4096).unwrap(), PANIC.as_bytes());
        let wrapped = compress_to_vec_zlib(PANIC.as_bytes(), 6);
        assert_eq!(decompress(&wrapped, 4096).unwrap(), PANIC.as_bytes());
        // Exactly at the limit is fine, one byte more is not.
        assert_eq!(decompress(&raw, PANIC.len()).unwrap().len(), PANIC.len());
        assert_eq!(
            decompress(&raw, PANIC.len() - 1),
            Err(PstoreError::TooLarge(PANIC.len() - 1))
        );
        assert_eq!(decompress(&wrapped, 10), Err(PstoreError::TooLarge(10)));
        // A bomb: 64 MiB of zeros in a few KiB, limited to 1 MiB.
        let bomb = compress_to_vec(&vec![0u8; 64 << 20], 9);
        assert!(bomb.len() < 128 << 10);
        assert_eq!(
            decompress(&bomb, 1 << 20),
            Err(PstoreError::TooLarge(1 << 20))
        );
        assert_eq!(
            decompress(&raw[..raw.len() / 2], 4096),
            Err(PstoreError::Truncated)
        );
        assert_eq!(
            decompress(&wrapped[..wrapped.len() / 2], 4096),
            Err(PstoreError::Truncated)
        );
        assert_eq!(decompress(b"", 4096), Err(PstoreError::Truncated));
        assert!(decompress(b"\xff\xff\xff\xff garbage", 4096).is_err());

        // The kernel appends the ECC notice after the compressed bytes.
        let mut file = raw.clone();
        file.extend_from_slice(b"\nECC: No errors detected\n");
        let d = parse_file(PstoreKind::Dmesg, true, &file, 1 << 20).unwrap();
        assert_eq!(d.reason.as_deref(), Some("Panic#1 Part1"));
        assert_eq!(d.lines.len(), 8);
        assert_eq!(d.ecc.as_deref(), Some("ECC: No errors detected"));
        assert_eq!(
            parse_file(PstoreKind::Dmesg, true, &file, 16),
            Err(PstoreError::TooLarge(16))
        );
        assert_eq!(
            parse_file(PstoreKind::Dmesg, false, PANIC.as_bytes(), 0),
            Ok(parse_dmesg(PANIC.as_bytes()))
        );
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(b: Vec<u8>, max in 0usize..4096) {
            for kind in [PstoreKind::Dmesg, PstoreKind::Console, PstoreKind::Pmsg] {
                let d = parse(kind, &b);
                let physical = b.split(|c| *c == b'\n').count();
                proptest::prop_assert!(d.lines.len() + d.partial_dropped <= physical);
                let _ = parse_file(kind, true, &b, max);
            }
            let _ = decompress(&b, max);
        }

        #[test]
        fn prefixed_garbage_never_panics(
            pieces in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(&b"<"[..]), proptest::strategy::Just(&b">"[..]),
                    proptest::strategy::Just(&b"["[..]), proptest::strategy::Just(&b"]"[..]),
                    proptest::strategy::Just(&b" "[..]), proptest::strategy::Just(&b"."[..]),
                    proptest::strategy::Just(&b"\n"[..]), proptest::strategy::Just(&b"123456"[..]),
                    proptest::strategy::Just(&b"T"[..]), proptest::strategy::Just(&b"ECC: "[..]),
                    proptest::strategy::Just(&b"Panic#1 Part1"[..]),
                ],
                0..64,
            )
        ) {
            let b: Vec<u8> = pieces.concat();
            for kind in [PstoreKind::Dmesg, PstoreKind::Console, PstoreKind::Pmsg] {
                let _ = parse(kind, &b);
            }
        }

        #[test]
        fn names_never_panic(s in "\\PC{0,40}") {
            let _ = PstoreName::parse(&s);
        }

        #[test]
        fn timestamp_roundtrip(secs in 0u64..10_000_000_000, usec in 0u64..1_000_000, text in "[a-zA-Z0-9 :,.()-]{0,40}") {
            let l = alloc::format!("<6>[{secs:5}.{usec:06}] {text}\n");
            let d = parse_dmesg(l.as_bytes());
            proptest::prop_assert_eq!(d.lines, vec![line(Some(secs * 1_000_000 + usec), Some(6), 0, &text)]);
        }
    }
}
