//! An app's byte stream turned into `/dev/kmsg` records, one `write()` per line.
//!
//! Used by `blackbox-agent logos NAME -- CMD` (the app's stdout/stderr) and by the syslog
//! listener. The steps, each without allocation:
//!
//! 1. [`LineSplitter`] cuts the bytes read from a pipe into lines (`\n`, `\r\n` or a lone `\r`
//!    ends a line), holding at most one partial line of `MAX` bytes. A longer line comes out
//!    in [`Piece`]s of at most `MAX` bytes.
//! 2. [`parse_level`] takes an optional sd-daemon style `<N>` level prefix off a line.
//! 3. [`format_kmsg_line`] builds the bytes of one `write()` to `/dev/kmsg`:
//!    `<PRI>NAME[PID]: TEXT\n`, with `TEXT` escaped by the rules of [`escape_into`], the
//!    continuation marks of the [`Piece`], and never more than [`KMSG_MAX`] bytes in all.
//!    [`write_kmsg_lines`] loops over it when escaping made a piece too long for one record.
//!
//! # Marking split lines
//!
//! A line longer than the splitter's `MAX` (or one that escaping made too long for one record)
//! goes out as several records. Each record's text carries [`CONT_MARK`] (`[cont]`) on the side
//! where the line goes on:
//!
//! ```text
//! <14>app[42]: first part of a very long line [cont]
//! <14>app[42]: [cont] middle part [cont]
//! <14>app[42]: [cont] last part
//! ```
//!
//! The marks are not escaped in any way: an app that itself writes ` [cont]` at the end of a
//! line looks the same as a split line. The space next to the mark is ours; the text itself is
//! cut exactly, so removing `" [cont]"` and `"[cont] "` and joining the parts gives the line.
//!
//! # Escaping
//!
//! The text stored in the kernel is meant to be printable, valid UTF-8 (so the JSON record
//! carries it as `msg`, not `msg_b64`, and a console prints it safely), while losing nothing:
//!
//! - a control character (Unicode `Cc`: `0x00..=0x1f`, `0x7f`, and the C1 controls
//!   `U+0080..=U+009F`), except TAB, is written as `\xNN` per byte, lowercase hex, the
//!   kernel's own `\x%02x` (a C1 control is two escapes, e.g. `\xc2\x9b`);
//! - each byte of invalid UTF-8 is written as `\xNN`;
//! - a backslash is written as `\x5c` only when the next byte is `x` (where it could be read as
//!   the start of an escape); any other backslash stays as is, so paths and regexes read well;
//! - everything else, including valid multi-byte UTF-8 and TAB, passes through.
//!
//! So [`crate::kmsg::unescape`] applied to the escaped text gives back exactly the original
//! bytes. (The kernel escapes again when `/dev/kmsg` is read, every `\` and every byte
//! outside `0x20..0x7f`; [`crate::kmsg::parse`] undoes that layer and yields our text.) A NUL
//! byte must be escaped in any case: the kernel formats the written buffer with `%s`.
//!
//! Note for the writer: unless `printk.devkmsg=on` (or sysctl `kernel.printk_devkmsg=on`), the
//! kernel rate-limits each open `/dev/kmsg` file to 10 records per 5 s and silently drops the
//! rest (counting them only in a "suppressed due to ratelimiting" line on close).

/// The most bytes one `write()` to `/dev/kmsg` may carry, prefix and trailing `\n` included.
///
/// Linux 5.x rejects a longer write with `EINVAL` (`LOG_LINE_MAX` = 1024 - 32); 6.x accepts up
/// to 1024 (`PRINTKRB_RECORD_MAX`). 992 works on both.
pub const KMSG_MAX: usize = 992;

/// The most bytes of the app's name written into a record; a longer name is cut (at a
/// character boundary).
pub const NAME_MAX: usize = 32;

/// The continuation mark of a split line; see the [module docs](self#marking-split-lines).
pub const CONT_MARK: &str = "[cont]";

/// The facility apps log under by default: `LOG_USER`.
pub const LOG_USER: u8 = 1;

/// The longest `<PRI>NAME[PID]: ` prefix: `<191>` (5) + [`NAME_MAX`] (32) + `[4294967295]`
/// (12) + `": "` (2) = 51 bytes.
pub const PREFIX_MAX: usize = 5 + NAME_MAX + 12 + 2;

/// Room for the escaped text of a record in the worst case: [`KMSG_MAX`] (992) -
/// [`PREFIX_MAX`] (51) - both continuation marks (`"[cont] "` and `" [cont]"`, 7 each) - the
/// trailing `\n` (1) = 926 bytes.
pub const TEXT_MAX: usize = KMSG_MAX - PREFIX_MAX - 2 * (CONT_MARK.len() + 1) - 1;

/// The splitter's default line limit: [`TEXT_MAX`], so a piece of printable UTF-8 (nothing to
/// escape) always fits in one record, whatever the name, PID and marks. Escaping can make a
/// piece up to four times longer; [`write_kmsg_lines`] then continues it in further records.
pub const DEFAULT_MAX_LINE: usize = TEXT_MAX;

/// Which part of a line a piece is. A line no longer than the limit is one [`Piece::Whole`];
/// a longer one is a [`Piece::First`], any number of [`Piece::Middle`]s and a [`Piece::Last`].
///
/// Only the `Whole` or `First` piece can carry a `<N>` level prefix ([`parse_level`]); the
/// caller keeps that level for the rest of the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Piece {
    /// The complete line.
    Whole,
    /// The start of a split line; more follows.
    First,
    /// Neither start nor end of a split line.
    Middle,
    /// The end of a split line.
    Last,
}

impl Piece {
    /// Makes the piece from its two marks.
    pub const fn from_marks(continued: bool, continues: bool) -> Self {
        match (continued, continues) {
            (false, false) => Self::Whole,
            (false, true) => Self::First,
            (true, true) => Self::Middle,
            (true, false) => Self::Last,
        }
    }

    /// Whether this piece continues a line (`Middle`, `Last`): its text starts with `[cont] `.
    pub const fn continued(self) -> bool {
        matches!(self, Self::Middle | Self::Last)
    }

    /// Whether the line goes on after this piece (`First`, `Middle`): its text ends with
    /// ` [cont]`.
    pub const fn continues(self) -> bool {
        matches!(self, Self::First | Self::Middle)
    }
}

/// Cuts a byte stream into lines, fed with whatever slices a pipe delivers.
///
/// A line ends at `\n`, at `\r\n` (one line end, also when the `\r` ends one feed and the `\n`
/// starts the next) or at a lone `\r`. Every line end yields one line, empty lines included (a
/// caller writing to kmsg usually skips them); the line end itself is not part of the line.
///
/// At most one partial line is held, in `MAX` bytes inside the value (no allocation). A line
/// longer than `MAX` comes out in [`Piece`]s of at most `MAX` bytes as it arrives; a cut
/// falls before an incomplete UTF-8 sequence at the end of the buffer when there is one (so a
/// multi-byte character is not split in two), otherwise after exactly `MAX` bytes. A line of
/// exactly `MAX` bytes is one [`Piece::Whole`]; no piece is ever empty except a whole empty
/// line.
///
/// `MAX` must be at least 1 (checked at compile time).
#[derive(Debug, Clone)]
pub struct LineSplitter<const MAX: usize = DEFAULT_MAX_LINE> {
    buf: [u8; MAX],
    len: usize,
    /// Pieces of the current line have been emitted already.
    split: bool,
    /// The last byte seen was a `\r` that ended a line: a `\n` right after it is ignored.
    after_cr: bool,
}

impl<const MAX: usize> Default for LineSplitter<MAX> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const MAX: usize> LineSplitter<MAX> {
    /// An empty splitter.
    pub const fn new() -> Self {
        const { assert!(MAX > 0, "LineSplitter needs room for at least one byte") };
        Self {
            buf: [0; MAX],
            len: 0,
            split: false,
            after_cr: false,
        }
    }

    /// The longest piece this splitter emits.
    pub const fn max_line(&self) -> usize {
        MAX
    }

    /// Bytes of an unfinished line held now.
    pub const fn buffered(&self) -> usize {
        self.len
    }

    /// Feeds the next bytes of the stream; `emit` gets every line (or piece) completed by them.
    pub fn feed(&mut self, mut data: &[u8], mut emit: impl FnMut(&[u8], Piece)) {
        if self.after_cr {
            match data {
                [] => return,
                [b'\n', rest @ ..] => data = rest,
                _ => {}
            }
            self.after_cr = false;
        }
        while !data.is_empty() {
            let Some(end) = data.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.push(data, &mut emit);
                return;
            };
            let (content, rest) = data.split_at(end);
            self.push(content, &mut emit);
            self.end_line(&mut emit);
            data = match rest {
                [b'\r', b'\n', rest @ ..] => rest,
                [b'\r'] => {
                    self.after_cr = true;
                    &[]
                }
                [_, rest @ ..] => rest,
                [] => &[],
            };
        }
    }

    /// Ends the stream (EOF): emits the unfinished last line, if any, and resets the splitter.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8], Piece)) {
        if self.len > 0 || self.split {
            self.end_line(&mut emit);
        }
        self.after_cr = false;
    }

    fn push(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(&[u8], Piece)) {
        while !bytes.is_empty() {
            if self.len >= MAX {
                self.emit_piece(emit);
            }
            let room = MAX.saturating_sub(self.len);
            let (now, later) = bytes.split_at(room.min(bytes.len()));
            if let Some(dst) = self.buf.get_mut(self.len..self.len + now.len()) {
                dst.copy_from_slice(now);
                self.len += now.len();
            }
            bytes = later;
        }
    }

    /// Emits a full buffer as a `First`/`Middle` piece, keeping an incomplete UTF-8 tail.
    fn emit_piece(&mut self, emit: &mut impl FnMut(&[u8], Piece)) {
        let held = self.buf.get(..self.len).unwrap_or_default();
        let cut = utf8_cut(held);
        emit(
            held.get(..cut).unwrap_or_default(),
            Piece::from_marks(self.split, true),
        );
        self.buf.copy_within(cut..self.len, 0);
        self.len -= cut;
        self.split = true;
    }

    fn end_line(&mut self, emit: &mut impl FnMut(&[u8], Piece)) {
        let held = self.buf.get(..self.len).unwrap_or_default();
        emit(held, Piece::from_marks(self.split, false));
        self.len = 0;
        self.split = false;
    }
}

/// Where to cut a full buffer: before an incomplete UTF-8 sequence at its end, if there is one
/// and something is left before it; otherwise at the end.
fn utf8_cut(buf: &[u8]) -> usize {
    let len = buf.len();
    for back in 1..=len.min(3) {
        let start = len - back;
        let need = match buf.get(start).copied().unwrap_or(0) {
            0x80..=0xbf => continue,
            0xc2..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf4 => 4,
            _ => 0,
        };
        return if need > back && start > 0 { start } else { len };
    }
    len
}

/// Takes an sd-daemon style level prefix off a line: `<N>` with N a single digit `0..=7`
/// (`sd-daemon(3)`, as journald reads it from stdout). Anything else (`<8>`, a syslog PRI like
/// `<30>`, `<07>`, no `>`) is not a prefix: the line stays as it is and the level is `None`.
/// The app cannot choose its facility; the caller's facility is used.
pub fn parse_level(line: &[u8]) -> (Option<u8>, &[u8]) {
    match line {
        [b'<', d @ b'0'..=b'7', b'>', rest @ ..] => (Some(d - b'0'), rest),
        _ => (None, line),
    }
}

/// A run of text from [`Units`]: passed through, or escaped byte by byte.
enum Unit<'a> {
    Text(&'a str),
    Escape(&'a [u8]),
}

/// `src` cut into runs to pass through and bytes to escape.
struct Units<'a> {
    chunks: core::str::Utf8Chunks<'a>,
    valid: &'a str,
    invalid: &'a [u8],
}

impl<'a> Units<'a> {
    fn new(src: &'a [u8]) -> Self {
        Self {
            chunks: src.utf8_chunks(),
            valid: "",
            invalid: &[],
        }
    }
}

fn needs_escape(c: char, next: Option<u8>) -> bool {
    (c.is_control() && c != '\t') || (c == '\\' && next == Some(b'x'))
}

impl<'a> Iterator for Units<'a> {
    type Item = Unit<'a>;

    fn next(&mut self) -> Option<Unit<'a>> {
        loop {
            let valid = self.valid;
            if let Some(first) = valid.chars().next() {
                let bytes = valid.as_bytes();
                let stop = valid
                    .char_indices()
                    .find(|&(i, c)| needs_escape(c, bytes.get(i + 1).copied()))
                    .map_or(valid.len(), |(i, _)| i);
                let (unit, rest) = if stop > 0 {
                    let (text, rest) = valid.split_at(stop);
                    (Unit::Text(text), rest)
                } else {
                    let (esc, rest) = valid.split_at(first.len_utf8());
                    (Unit::Escape(esc.as_bytes()), rest)
                };
                self.valid = rest;
                return Some(unit);
            }
            if !self.invalid.is_empty() {
                return Some(Unit::Escape(core::mem::take(&mut self.invalid)));
            }
            let chunk = self.chunks.next()?;
            self.valid = chunk.valid();
            self.invalid = chunk.invalid();
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn escape_byte(b: u8) -> [u8; 4] {
    [
        b'\\',
        b'x',
        HEX[usize::from(b >> 4)],
        HEX[usize::from(b & 0xf)],
    ]
}

/// Writes `src` escaped (rules in the [module docs](self#escaping)) to `out`. The result is
/// always valid UTF-8, hence a `fmt::Write` sink.
pub fn escape_into(src: &[u8], out: &mut impl core::fmt::Write) -> core::fmt::Result {
    for unit in Units::new(src) {
        match unit {
            Unit::Text(s) => out.write_str(s)?,
            Unit::Escape(bytes) => {
                for &b in bytes {
                    let esc = escape_byte(b);
                    out.write_str(core::str::from_utf8(&esc).unwrap_or("\\x3f"))?;
                }
            }
        }
    }
    Ok(())
}

/// The length of `src` once escaped.
pub fn escaped_len(src: &[u8]) -> usize {
    Units::new(src)
        .map(|u| match u {
            Unit::Text(s) => s.len(),
            Unit::Escape(b) => 4 * b.len(),
        })
        .sum()
}

/// Escapes as much of `src` as fits into `out`, never cutting an escape or a character.
/// Returns (bytes written, bytes of `src` consumed).
fn escape_bounded(src: &[u8], out: &mut [u8]) -> (usize, usize) {
    let mut w = Cursor { buf: out, len: 0 };
    let mut consumed = 0;
    for unit in Units::new(src) {
        match unit {
            Unit::Text(s) => {
                let mut cut = w.room().min(s.len());
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                w.put(s.as_bytes().get(..cut).unwrap_or_default());
                consumed += cut;
                if cut < s.len() {
                    break;
                }
            }
            Unit::Escape(bytes) => {
                let fit = (w.room() / 4).min(bytes.len());
                for &b in bytes.get(..fit).unwrap_or_default() {
                    w.put(&escape_byte(b));
                }
                consumed += fit;
                if fit < bytes.len() {
                    break;
                }
            }
        }
    }
    (w.len, consumed)
}

/// Bytes written into a fixed buffer; what does not fit is cut off (callers size it so that
/// nothing is).
struct Cursor<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl Cursor<'_> {
    fn room(&self) -> usize {
        self.buf.len().saturating_sub(self.len)
    }

    fn put(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.room());
        if let (Some(dst), Some(src)) = (self.buf.get_mut(self.len..self.len + n), bytes.get(..n)) {
            dst.copy_from_slice(src);
            self.len += n;
        }
    }
}

impl core::fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.put(s.as_bytes());
        Ok(())
    }
}

/// Writes an app's name the way it appears in a record's prefix (and should in any text about
/// the app): cut to at most [`NAME_MAX`] bytes at a character boundary; a control character,
/// whitespace, `[`, `]`, `:` and each byte of invalid UTF-8 become `_` (so `NAME[PID]: ` reads
/// back unambiguously); an empty name becomes `-`.
pub fn write_name(name: &[u8], out: &mut impl core::fmt::Write) -> core::fmt::Result {
    if name.is_empty() {
        return out.write_char('-');
    }
    let mut len = 0;
    for chunk in name.utf8_chunks() {
        let invalid = chunk.invalid().iter().map(|_| '_');
        for c in chunk.valid().chars().chain(invalid) {
            let c = if c.is_control() || c.is_whitespace() || matches!(c, '[' | ']' | ':') {
                '_'
            } else {
                c
            };
            len += c.len_utf8();
            if len > NAME_MAX {
                return Ok(());
            }
            out.write_char(c)?;
        }
    }
    Ok(())
}

/// Who a kmsg record is from and at which priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KmsgHeader<'a> {
    /// Severity `0..=7` (only the low 3 bits are used).
    pub level: u8,
    /// Facility `0..=23`, usually [`LOG_USER`]; a larger value is replaced by `LOG_USER`.
    /// (The kernel itself turns facility 0, kernel, into `LOG_USER` for written records.)
    pub facility: u8,
    /// The app's name, any bytes (a command-line argument, a syslog tag); written as
    /// [`write_name`] does.
    pub name: &'a [u8],
    /// The app's process id, written as `[PID]` after the name.
    pub pid: Option<u32>,
}

impl KmsgHeader<'_> {
    /// `facility * 8 + level`, at most 191.
    pub const fn pri(&self) -> u8 {
        let facility = if self.facility > 23 {
            LOG_USER
        } else {
            self.facility
        };
        facility * 8 + (self.level & 7)
    }

    fn put_prefix(&self, w: &mut Cursor<'_>) {
        use core::fmt::Write as _;
        // Writing into a Cursor cannot fail; the arithmetic of PREFIX_MAX keeps it in bounds.
        let _ = write!(w, "<{}>", self.pri());
        let _ = write_name(self.name, w);
        if let Some(pid) = self.pid {
            let _ = write!(w, "[{pid}]");
        }
        w.put(b": ");
    }
}

/// One formatted record: see [`format_kmsg_line`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Formatted {
    /// Bytes of the output buffer to write.
    pub len: usize,
    /// Bytes of the text that went into this record; less than the whole text when the
    /// escaped text did not fit (the record then ends with the ` [cont]` mark).
    pub consumed: usize,
}

/// Formats one `write()` to `/dev/kmsg` into `out`:
///
/// ```text
/// <PRI>NAME[PID]: TEXT\n      or, without a PID,      <PRI>NAME: TEXT\n
/// ```
///
/// `PRI` is `facility * 8 + level` in decimal (the kernel takes the level and facility from
/// it and strips it); `TEXT` is `text` escaped ([module docs](self#escaping)) between the
/// continuation marks `piece` asks for ([module docs](self#marking-split-lines)). The trailing
/// `\n` is stripped by the kernel; without it the kernel would keep the record open for a
/// continuation and readers would not see it until the next message. The whole is at most
/// [`KMSG_MAX`] bytes.
///
/// When the escaped text does not fit (only possible when escaping made it longer than
/// [`TEXT_MAX`]), as much as fits is written, the record is marked as continuing, and
/// [`Formatted::consumed`] tells where the next record has to go on;
/// [`write_kmsg_lines`] does that loop.
pub fn format_kmsg_line(
    header: &KmsgHeader<'_>,
    piece: Piece,
    text: &[u8],
    out: &mut [u8; KMSG_MAX],
) -> Formatted {
    let mut w = Cursor {
        buf: out.as_mut_slice(),
        len: 0,
    };
    header.put_prefix(&mut w);
    if piece.continued() {
        w.put(CONT_MARK.as_bytes());
        w.put(b" ");
    }
    let start = w.len;
    // The text ends before the '\n', or before " [cont]\n" when the line goes on.
    let unmarked_end = KMSG_MAX - 1;
    let marked_end = (unmarked_end - (CONT_MARK.len() + 1)).max(start);
    if !piece.continues() {
        let dst = w.buf.get_mut(start..unmarked_end).unwrap_or_default();
        let (n, consumed) = escape_bounded(text, dst);
        if consumed == text.len() {
            w.len = start + n;
            w.put(b"\n");
            return Formatted {
                len: w.len,
                consumed,
            };
        }
    }
    let dst = w.buf.get_mut(start..marked_end).unwrap_or_default();
    let (n, consumed) = escape_bounded(text, dst);
    w.len = start + n;
    w.put(b" ");
    w.put(CONT_MARK.as_bytes());
    w.put(b"\n");
    Formatted {
        len: w.len,
        consumed,
    }
}

/// Formats `text` (one piece of a line) as many records as it takes (one, unless escaping
/// made it longer than [`TEXT_MAX`]) and hands each to `write`, which does the `write()` to
/// `/dev/kmsg`; the first error stops the loop and is returned. The continuation marks
/// combine: a [`Piece::Whole`] that needs two records goes out as first and last, and so on.
pub fn write_kmsg_lines<E>(
    header: &KmsgHeader<'_>,
    piece: Piece,
    text: &[u8],
    buf: &mut [u8; KMSG_MAX],
    mut write: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut rest = text;
    let mut continued = piece.continued();
    loop {
        let part = Piece::from_marks(continued, piece.continues());
        let f = format_kmsg_line(header, part, rest, buf);
        write(buf.get(..f.len).unwrap_or_default())?;
        match rest.get(f.consumed..) {
            Some(more) if !more.is_empty() && f.consumed > 0 => rest = more,
            _ => return Ok(()),
        }
        continued = true;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use alloc::string::String;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    fn split<const N: usize>(chunks: &[&[u8]]) -> Vec<(Vec<u8>, Piece)> {
        let mut s = LineSplitter::<N>::new();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |l, p| out.push((l.to_vec(), p)));
        }
        s.finish(|l, p| out.push((l.to_vec(), p)));
        out
    }

    fn whole(lines: &[&str]) -> Vec<(Vec<u8>, Piece)> {
        lines
            .iter()
            .map(|l| (l.as_bytes().to_vec(), Piece::Whole))
            .collect()
    }

    #[test]
    fn line_ends() {
        assert_eq!(
            split::<64>(&[b"a\nb\r\nc\rd\n\ne"]),
            whole(&["a", "b", "c", "d", "", "e"])
        );
        // \r\n across feeds: one line end, no empty line.
        assert_eq!(
            split::<64>(&[b"a\r", b"\nb\r", b"", b"\n", b"c"]),
            whole(&["a", "b", "c"])
        );
        // A lone \r at the end of a feed, then other text.
        assert_eq!(split::<64>(&[b"a\r", b"b\r"]), whole(&["a", "b"]));
        assert_eq!(split::<64>(&[b"\r\r\n\n"]), whole(&["", "", ""]));
        assert_eq!(split::<64>(&[b"x\r", b"\r", b"\n"]), whole(&["x", ""]));
        assert_eq!(split::<64>(&[]), whole(&[]));
        assert_eq!(split::<64>(&[b"", b"tail"]), whole(&["tail"]));
    }

    #[test]
    fn long_lines_come_in_pieces() {
        use Piece::*;
        let out = split::<4>(&[b"abcd\nabcde\nabcdefghij", b"kl\n"]);
        let expect: Vec<(Vec<u8>, Piece)> = [
            ("abcd", Whole),
            ("abcd", First),
            ("e", Last),
            ("abcd", First),
            ("efgh", Middle),
            ("ijkl", Last),
        ]
        .iter()
        .map(|(l, p)| (l.as_bytes().to_vec(), *p))
        .collect();
        assert_eq!(out, expect);
        // finish() after a split line ends it with a Last piece.
        assert_eq!(
            split::<2>(&[b"abc"]),
            [(b"ab".to_vec(), First), (b"c".to_vec(), Last)]
        );
        // A one-byte buffer still works.
        assert_eq!(
            split::<1>(&[b"ab\n"]),
            [(b"a".to_vec(), First), (b"b".to_vec(), Last)]
        );
    }

    #[test]
    fn pieces_do_not_cut_characters() {
        // "aé€" = 61 c3a9 e282ac: a cut at 4 bytes would split the euro sign.
        let out = split::<4>(&["aé€x\n".as_bytes()]);
        assert_eq!(out[0], ("aé".as_bytes().to_vec(), Piece::First));
        assert_eq!(out[1], ("€x".as_bytes().to_vec(), Piece::Last));
        // Invalid or too short for a character: cut at MAX.
        let out = split::<2>(&["€".as_bytes()]);
        assert_eq!(out[0], (b"\xe2\x82".to_vec(), Piece::First));
    }

    #[test]
    fn levels() {
        assert_eq!(
            parse_level(b"<3>disk on fire"),
            (Some(3), &b"disk on fire"[..])
        );
        assert_eq!(parse_level(b"<0>"), (Some(0), &b""[..]));
        for keep in [&b"<8>x"[..], b"<30>x", b"<07>x", b"<3x", b"3>", b"", b"<>x"] {
            assert_eq!(parse_level(keep), (None, keep));
        }
    }

    fn esc(src: &[u8]) -> String {
        let mut s = String::new();
        escape_into(src, &mut s).unwrap();
        assert_eq!(s.len(), escaped_len(src));
        s
    }

    #[test]
    fn escaping() {
        assert_eq!(esc(b"plain\ttext"), "plain\ttext");
        assert_eq!(esc(b"\x1b[31mred\x1b[0m"), "\\x1b[31mred\\x1b[0m");
        assert_eq!(esc(b"nul\0del\x7f"), "nul\\x00del\\x7f");
        assert_eq!(esc("grüße €".as_bytes()), "grüße €");
        assert_eq!(
            esc(b"bad \xff\xfe utf8 \xe2\x82"),
            "bad \\xff\\xfe utf8 \\xe2\\x82"
        );
        assert_eq!(esc("c1 \u{9b}".as_bytes()), "c1 \\xc2\\x9b");
        assert_eq!(esc(b"C:\\dir\\x1b \\\\"), "C:\\dir\\x5cx1b \\\\");
        assert_eq!(esc(b"end\\"), "end\\");
    }

    fn header(name: &str, pid: Option<u32>) -> KmsgHeader<'_> {
        let name = name.as_bytes();
        KmsgHeader {
            level: 6,
            facility: LOG_USER,
            name,
            pid,
        }
    }

    fn fmt(h: &KmsgHeader<'_>, piece: Piece, text: &[u8]) -> (String, usize) {
        let mut buf = [0; KMSG_MAX];
        let f = format_kmsg_line(h, piece, text, &mut buf);
        (
            String::from_utf8(buf[..f.len].to_vec()).unwrap(),
            f.consumed,
        )
    }

    #[test]
    fn kmsg_lines() {
        let h = header("app", Some(42));
        assert_eq!(
            fmt(&h, Piece::Whole, b"hi"),
            ("<14>app[42]: hi\n".into(), 2)
        );
        assert_eq!(
            fmt(&header("app", None), Piece::First, b"hi"),
            ("<14>app: hi [cont]\n".into(), 2)
        );
        assert_eq!(
            fmt(&h, Piece::Middle, b"\x01"),
            ("<14>app[42]: [cont] \\x01 [cont]\n".into(), 1)
        );
        assert_eq!(
            fmt(&h, Piece::Last, b"x"),
            ("<14>app[42]: [cont] x\n".into(), 1)
        );
        let odd = KmsgHeader {
            level: 11,
            facility: 99,
            name: b"my app:[x]\n",
            pid: Some(u32::MAX),
        };
        assert_eq!(
            fmt(&odd, Piece::Whole, b""),
            ("<11>my_app__x__[4294967295]: \n".into(), 0)
        );
        let local7 = KmsgHeader {
            level: 7,
            facility: 23,
            name: b"",
            pid: None,
        };
        assert_eq!(fmt(&local7, Piece::Whole, b"x"), ("<191>-: x\n".into(), 1));
        let mut name = String::new();
        write_name(b"a\xffb c\xe2\x82", &mut name).unwrap();
        assert_eq!(name, "a_b_c__");
        let long = "é".repeat(40);
        let (line, _) = fmt(&header(&long, None), Piece::Whole, b"x");
        assert_eq!(line, alloc::format!("<14>{}: x\n", "é".repeat(16)));
    }

    #[test]
    fn text_max_fits_the_worst_prefix() {
        let name = "n".repeat(NAME_MAX + 5);
        let worst = KmsgHeader {
            level: 7,
            facility: 23,
            name: name.as_bytes(),
            pid: Some(u32::MAX),
        };
        let text = [b'a'; TEXT_MAX];
        let (line, consumed) = fmt(&worst, Piece::Middle, &text);
        assert_eq!((line.len(), consumed), (KMSG_MAX, TEXT_MAX));
        let (_, consumed) = fmt(&worst, Piece::Middle, &[b'a'; TEXT_MAX + 1]);
        assert_eq!(consumed, TEXT_MAX);
    }

    #[test]
    fn escaped_overflow_continues() {
        let h = header("app", Some(1));
        let text = [0u8; 600]; // 2400 bytes escaped
        let mut buf = [0; KMSG_MAX];
        let mut lines: Vec<Vec<u8>> = Vec::new();
        write_kmsg_lines(&h, Piece::Whole, &text, &mut buf, |l| {
            lines.push(l.to_vec());
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(lines.len(), 3);
        let mut joined = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            assert!(l.len() <= KMSG_MAX);
            let s = core::str::from_utf8(l).unwrap();
            let t = s
                .strip_prefix("<14>app[1]: ")
                .unwrap()
                .strip_suffix('\n')
                .unwrap();
            let t = if i > 0 {
                t.strip_prefix("[cont] ").unwrap()
            } else {
                t
            };
            let t = if i < 2 {
                t.strip_suffix(" [cont]").unwrap()
            } else {
                t
            };
            joined.extend_from_slice(t.as_bytes());
        }
        assert_eq!(crate::kmsg::unescape(&joined), text);
    }

    proptest! {
        #[test]
        fn escape_round_trips(src in proptest::collection::vec(
            prop_oneof![any::<u8>(), Just(b'\\'), Just(b'x'), Just(0xc2), Just(0x9b)], 0..64)
        ) {
            let s = esc(&src);
            prop_assert!(!s.chars().any(|c| c.is_control() && c != '\t'));
            prop_assert_eq!(crate::kmsg::unescape(s.as_bytes()), src);
        }

        #[test]
        fn records_fit_and_join_back(
            text in proptest::collection::vec(any::<u8>(), 0..3000),
            name in proptest::collection::vec(any::<u8>(), 0..40),
            pid in proptest::option::of(any::<u32>()),
            piece in prop_oneof![
                Just(Piece::Whole), Just(Piece::First), Just(Piece::Middle), Just(Piece::Last)
            ],
        ) {
            let h = KmsgHeader { level: 3, facility: 1, name: &name, pid };
            let mut buf = [0; KMSG_MAX];
            let mut lines: Vec<String> = Vec::new();
            let res: Result<(), ()> = write_kmsg_lines(&h, piece, &text, &mut buf, |l| {
                lines.push(String::from_utf8(l.to_vec()).unwrap());
                Ok(())
            });
            prop_assert!(res.is_ok());
            let n = lines.len();
            prop_assert!(n >= 1);
            if escaped_len(&text) <= TEXT_MAX {
                prop_assert_eq!(n, 1);
            }
            let mut joined = Vec::new();
            for (i, l) in lines.iter().enumerate() {
                prop_assert!(l.len() <= KMSG_MAX);
                // The name is sanitized: the first ": " ends the prefix.
                let (_, t) = l.split_once(": ").unwrap();
                let mut t = t.strip_suffix('\n').unwrap();
                if i > 0 || piece.continued() {
                    t = t.strip_prefix("[cont] ").unwrap();
                }
                if i + 1 < n || piece.continues() {
                    t = t.strip_suffix(" [cont]").unwrap();
                }
                joined.extend_from_slice(t.as_bytes());
            }
            prop_assert_eq!(crate::kmsg::unescape(&joined), text);
        }
    }
}
