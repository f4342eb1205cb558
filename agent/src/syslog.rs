//! One syslog message as received on `/dev/log`, parsed without allocation.
//!
//! What arrives there in practice:
//!
//! ```text
//! <13>Feb  5 17:32:18 myapp[1234]: hello      glibc syslog(3) with LOG_PID (no '\n')
//! <13>: hello                                  glibc when localtime fails (no timestamp)
//! <13>Feb  5 17:32:18 myapp: hello\n          musl syslog(3) (always appends '\n')
//! <13>Feb  5 17:32:18 : hello\n               musl without openlog(): empty tag
//! <132>Feb  5 17:32:18 mytag: hello            busybox `logger -t mytag -p local0.warn hello`
//! <34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - BOM'su root' failed ...
//!                                              RFC 5424 (e.g. systemd-cat, newer `logger`)
//! ```
//!
//! Over a stream socket glibc also sends the terminating NUL. [`parse`] is lenient and total:
//! any bytes give a [`Syslog`], no input panics, and [`Syslog::msg`] and [`Syslog::tag`] are
//! always subslices of the input.
//!
//! # RFC 3164 (the BSD format)
//!
//! After `<PRI>`: an optional timestamp `Mmm dd hh:mm:ss` (day padded with a space or a zero),
//! then the tag: the first word if it ends in `:` (`TAG:` or `TAG[PID]:`); if not and there was
//! a timestamp, the second word if that one does, the first being a hostname. One space after
//! the colon is skipped. Without such a word there is no tag and the message is everything
//! after the timestamp. This is a guess by nature: a message `Error: disk full` sent without a
//! tag reads as tag `Error`; a tag with a space in it is not recognised as a whole.
//!
//! # RFC 5424
//!
//! `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD [MSG]`, `-` for a nil field. APP-NAME is
//! the tag, a numeric PROCID the pid; structured data (`[id k="v\]"]...`, with `\"`, `\\`
//! and `\]` escaped inside values) is skipped; a UTF-8 BOM at the start of MSG is removed. A
//! message that starts like RFC 5424 but does not follow it is read as RFC 3164 instead.

/// The facility of a message without a valid PRI: user.
pub const DEFAULT_FACILITY: u8 = 1;

/// The severity of a message without a valid PRI: notice.
pub const DEFAULT_SEVERITY: u8 = 5;

/// The largest valid PRI: facility 23 (local7), severity 7 (debug).
pub const PRI_MAX: u8 = 191;

/// Which format a message was read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `<PRI>` and the BSD header (timestamp, tag), each part optional.
    Rfc3164,
    /// `<PRI>1 ...` with all the RFC 5424 header fields.
    Rfc5424,
    /// No valid PRI: the whole message is the text.
    Bare,
}

/// One parsed message; every slice borrows from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Syslog<'a> {
    /// Facility `0..=23` ([`DEFAULT_FACILITY`] without a PRI).
    pub facility: u8,
    /// Severity `0..=7` ([`DEFAULT_SEVERITY`] without a PRI).
    pub severity: u8,
    /// The app's name (RFC 3164 TAG or RFC 5424 APP-NAME), never empty.
    pub tag: Option<&'a [u8]>,
    /// The sender's process id, if it gave a numeric one.
    pub pid: Option<u32>,
    /// The message text, without one trailing `\n` and one trailing NUL.
    pub msg: &'a [u8],
    /// The format it was read as.
    pub format: Format,
}

/// The kmsg level for a syslog severity: the same number, both are `0..=7` (emergency to
/// debug) with the same meanings; only the low three bits are kept.
pub const fn kmsg_level(severity: u8) -> u8 {
    severity & 7
}

/// Parses one datagram (or one NUL/newline-terminated message of a stream). Total: see the
/// [module docs](self).
pub fn parse(input: &[u8]) -> Syslog<'_> {
    let input = input.strip_suffix(b"\0").unwrap_or(input);
    let input = input.strip_suffix(b"\n").unwrap_or(input);
    let Some((pri, rest)) = parse_pri(input) else {
        return Syslog {
            facility: DEFAULT_FACILITY,
            severity: DEFAULT_SEVERITY,
            tag: None,
            pid: None,
            msg: input,
            format: Format::Bare,
        };
    };
    let (tag, pid, msg, format) = match parse_5424(rest) {
        Some((tag, pid, msg)) => (tag, pid, msg, Format::Rfc5424),
        None => {
            let (tag, pid, msg) = parse_3164(rest);
            (tag, pid, msg, Format::Rfc3164)
        }
    };
    Syslog {
        facility: pri >> 3,
        severity: pri & 7,
        tag,
        pid,
        msg,
        format,
    }
}

/// `<N>` with 1 to 3 digits and N <= 191.
fn parse_pri(input: &[u8]) -> Option<(u8, &[u8])> {
    let rest = input.strip_prefix(b"<")?;
    let end = rest.iter().take(4).position(|&b| b == b'>')?;
    let value = parse_decimal(rest.get(..end)?, 3)?;
    let pri = u8::try_from(value).ok().filter(|&p| p <= PRI_MAX)?;
    Some((pri, rest.get(end + 1..)?))
}

/// 1 to `max_digits` ASCII digits, nothing else.
fn parse_decimal(digits: &[u8], max_digits: usize) -> Option<u32> {
    if digits.is_empty() || digits.len() > max_digits {
        return None;
    }
    digits.iter().try_fold(0u32, |acc, &b| {
        let d = b.checked_sub(b'0').filter(|d| *d < 10)?;
        acc.checked_mul(10)?.checked_add(u32::from(d))
    })
}

fn parse_pid(digits: &[u8]) -> Option<u32> {
    parse_decimal(digits, 10)
}

/// The next space-terminated word and what follows the space.
fn word(input: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = input.iter().position(|&b| b == b' ')?;
    Some((input.get(..end)?, input.get(end + 1..)?))
}

type Parts<'a> = (Option<&'a [u8]>, Option<u32>, &'a [u8]);

fn parse_5424(rest: &[u8]) -> Option<Parts<'_>> {
    let rest = rest.strip_prefix(b"1 ")?;
    let (timestamp, rest) = word(rest)?;
    let (hostname, rest) = word(rest)?;
    let (app, rest) = word(rest)?;
    let (procid, rest) = word(rest)?;
    let (msgid, rest) = word(rest)?;
    if [timestamp, hostname, app, procid, msgid]
        .iter()
        .any(|f| f.is_empty())
    {
        return None;
    }
    let msg = match skip_structured_data(rest)? {
        [b' ', msg @ ..] => msg,
        end @ [] => end,
        _ => return None,
    };
    let msg = msg.strip_prefix(b"\xef\xbb\xbf").unwrap_or(msg);
    let tag = Some(app).filter(|a| *a != b"-");
    Some((tag, parse_pid(procid), msg))
}

/// Skips `-` or one or more `[...]` elements; `None` if there is neither or one is not closed.
fn skip_structured_data(input: &[u8]) -> Option<&[u8]> {
    if let Some(rest) = input.strip_prefix(b"-") {
        return Some(rest);
    }
    let mut rest = input;
    if rest.first() != Some(&b'[') {
        return None;
    }
    while let Some(element) = rest.strip_prefix(b"[") {
        let mut quoted = false;
        let mut i = 0;
        loop {
            match *element.get(i)? {
                b'\\' => i += 2,
                b'"' => {
                    quoted = !quoted;
                    i += 1;
                }
                b']' if !quoted => break,
                _ => i += 1,
            }
        }
        rest = element.get(i + 1..)?;
    }
    Some(rest)
}

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// Skips `Mmm dd hh:mm:ss` and the space after it (or the end of the message).
fn skip_timestamp(input: &[u8]) -> Option<&[u8]> {
    let [
        m0,
        m1,
        m2,
        b' ',
        d0,
        d1,
        b' ',
        h0,
        h1,
        b':',
        n0,
        n1,
        b':',
        s0,
        s1,
        rest @ ..,
    ] = input
    else {
        return None;
    };
    let digit = |b: &u8| b.is_ascii_digit();
    let ok = MONTHS.contains(&&[*m0, *m1, *m2])
        && (*d0 == b' ' || digit(d0))
        && [d1, h0, h1, n0, n1, s0, s1].into_iter().all(digit);
    if !ok {
        return None;
    }
    match rest {
        [b' ', rest @ ..] => Some(rest),
        [] => Some(rest),
        _ => None,
    }
}

/// A `TAG:` or `TAG[PID]:` word at the start of `input`, then the message after one space.
/// An empty tag (`: msg`) is no tag but still ends the header.
fn tag_word(input: &[u8]) -> Option<Parts<'_>> {
    let end = input.iter().position(|&b| b == b' ').unwrap_or(input.len());
    let (word, rest) = input.split_at(end);
    let name = word.strip_suffix(b":")?;
    let msg = rest.strip_prefix(b" ").unwrap_or(rest);
    let (name, pid) = match name.strip_suffix(b"]").and_then(|n| {
        let open = n.iter().rposition(|&b| b == b'[')?;
        Some((n.get(..open)?, parse_pid(n.get(open + 1..)?)?))
    }) {
        Some((n, pid)) => (n, Some(pid)),
        None => (name, None),
    };
    Some((Some(name).filter(|n| !n.is_empty()), pid, msg))
}

fn parse_3164(rest: &[u8]) -> Parts<'_> {
    let (stamped, rest) = match skip_timestamp(rest) {
        Some(after) => (true, after),
        None => (false, rest),
    };
    if let Some(parts) = tag_word(rest) {
        return parts;
    }
    if stamped && let Some(parts) = word(rest).and_then(|(_host, after)| tag_word(after)) {
        return parts;
    }
    (None, None, rest)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    /// facility, severity, tag, pid, msg, format
    type Fields<'a> = (u8, u8, Option<&'a [u8]>, Option<u32>, &'a [u8], Format);

    fn p(input: &[u8]) -> Fields<'_> {
        let s = parse(input);
        (s.facility, s.severity, s.tag, s.pid, s.msg, s.format)
    }

    use Format::*;

    #[test]
    fn glibc() {
        // openlog("myapp", LOG_PID, LOG_USER); syslog(LOG_NOTICE, "hello");
        assert_eq!(
            p(b"<13>Feb  5 17:32:18 myapp[1234]: hello"),
            (
                1,
                5,
                Some(&b"myapp"[..]),
                Some(1234),
                &b"hello"[..],
                Rfc3164
            )
        );
        // Stream socket: the NUL comes along. Day of month >= 10.
        assert_eq!(
            p(b"<30>Dec 24 08:00:01 sshd[99]: Accepted key\0"),
            (
                3,
                6,
                Some(&b"sshd"[..]),
                Some(99),
                &b"Accepted key"[..],
                Rfc3164
            )
        );
        // localtime failed: "<%d>: ".
        assert_eq!(
            p(b"<11>: no time"),
            (1, 3, None, None, &b"no time"[..], Rfc3164)
        );
    }

    #[test]
    fn musl() {
        assert_eq!(
            p(b"<14>Jan  1 00:00:00 app: started\n"),
            (1, 6, Some(&b"app"[..]), None, &b"started"[..], Rfc3164)
        );
        // No openlog(): the ident is empty.
        assert_eq!(
            p(b"<14>Jan  1 00:00:00 : started\n"),
            (1, 6, None, None, &b"started"[..], Rfc3164)
        );
        assert_eq!(
            p(b"<14>Jan  1 00:00:00 app[7]: \n"),
            (1, 6, Some(&b"app"[..]), Some(7), &b""[..], Rfc3164)
        );
    }

    #[test]
    fn busybox_logger() {
        // logger -t mytag -p local0.warn hello (busybox 1.36; musl adds the '\n').
        for input in [
            &b"<132>Oct  3 09:41:07 mytag: hello"[..],
            b"<132>Oct  3 09:41:07 mytag: hello\n",
        ] {
            assert_eq!(
                p(input),
                (16, 4, Some(&b"mytag"[..]), None, &b"hello"[..], Rfc3164)
            );
        }
    }

    #[test]
    fn other_3164() {
        // With a hostname (as forwarded, or as written to files).
        assert_eq!(
            p(b"<38>Jun 14 15:16:01 combo sshd(pam_unix)[19939]: check pass; user unknown"),
            (
                4,
                6,
                Some(&b"sshd(pam_unix)"[..]),
                Some(19939),
                &b"check pass; user unknown"[..],
                Rfc3164
            )
        );
        // No timestamp.
        assert_eq!(
            p(b"<12>mytag[3]: x y"),
            (1, 4, Some(&b"mytag"[..]), Some(3), &b"x y"[..], Rfc3164)
        );
        // No tag: everything after the timestamp.
        assert_eq!(
            p(b"<13>Feb  5 17:32:18 just some words"),
            (1, 5, None, None, &b"just some words"[..], Rfc3164)
        );
        // No header at all, and a colon in the message that is no tag.
        assert_eq!(
            p(b"<13>see http://x: y"),
            (1, 5, None, None, &b"see http://x: y"[..], Rfc3164)
        );
        // A non-numeric pid stays in the tag; a timestamp at the very end.
        assert_eq!(
            p(b"<13>t[x]: m"),
            (1, 5, Some(&b"t[x]"[..]), None, &b"m"[..], Rfc3164)
        );
        assert_eq!(
            p(b"<13>Feb  5 17:32:18"),
            (1, 5, None, None, &b""[..], Rfc3164)
        );
        assert_eq!(p(b"<0>"), (0, 0, None, None, &b""[..], Rfc3164));
        assert_eq!(p(b"<191>x"), (23, 7, None, None, &b"x"[..], Rfc3164));
    }

    #[test]
    fn rfc5424_examples() {
        // RFC 5424 section 6.5, examples 1 to 4.
        let ex1 = b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - \
                    \xef\xbb\xbf'su root' failed for lonvick on /dev/pts/8";
        assert_eq!(
            p(ex1),
            (
                4,
                2,
                Some(&b"su"[..]),
                None,
                &b"'su root' failed for lonvick on /dev/pts/8"[..],
                Rfc5424
            )
        );
        let ex2 = b"<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - \
                    %% It's time to make the do-nuts.";
        assert_eq!(
            p(ex2),
            (
                20,
                5,
                Some(&b"myproc"[..]),
                Some(8710),
                &b"%% It's time to make the do-nuts."[..],
                Rfc5424
            )
        );
        let ex3 = b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 \
                    [exampleSDID@32473 iut=\"3\" eventSource=\"Application\" eventID=\"1011\"] \
                    \xef\xbb\xbfAn application event log entry...";
        assert_eq!(
            p(ex3),
            (
                20,
                5,
                Some(&b"evntslog"[..]),
                None,
                &b"An application event log entry..."[..],
                Rfc5424
            )
        );
        let ex4 = b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 \
                    [exampleSDID@32473 iut=\"3\" eventSource=\"Application\" eventID=\"1011\"]\
                    [examplePriority@32473 class=\"high\"]";
        assert_eq!(
            p(ex4),
            (20, 5, Some(&b"evntslog"[..]), None, &b""[..], Rfc5424)
        );
    }

    #[test]
    fn rfc5424_escapes_and_nil() {
        assert_eq!(
            p(b"<14>1 - - - - - [a@1 k=\"x\\]y\\\"z\" j=\"]\"] msg\n"),
            (1, 6, None, None, &b"msg"[..], Rfc5424)
        );
        // Unclosed structured data, missing fields: read as RFC 3164, nothing lost.
        assert_eq!(
            p(b"<14>1 - - app 1 - [a b"),
            (1, 6, None, None, &b"1 - - app 1 - [a b"[..], Rfc3164)
        );
        assert_eq!(
            p(b"<14>1 ts host app"),
            (1, 6, None, None, &b"1 ts host app"[..], Rfc3164)
        );
        assert_eq!(
            p(b"<14>1 - - - - - -x"),
            (1, 6, None, None, &b"1 - - - - - -x"[..], Rfc3164)
        );
    }

    #[test]
    fn malformed() {
        for input in [
            &b""[..],
            b"plain text",
            b"<",
            b"<>x",
            b"<192>x",
            b"<1000>x",
            b"<-1>x",
            b"<1a>x",
            b"<13",
            b"13>x",
            b"<+1>x",
        ] {
            let s = parse(input);
            assert_eq!(
                (s.facility, s.severity, s.format),
                (1, 5, Bare),
                "{input:?}"
            );
            assert_eq!(s.msg, input);
        }
        assert_eq!(parse(b"<99999999>x").msg, b"<99999999>x");
        assert_eq!(parse(b"raw\n\0").msg, b"raw");
        assert_eq!(parse(b"raw\n\n").msg, b"raw\n");
        assert_eq!(
            parse(b"<13>a[4294967296]: x").tag,
            Some(&b"a[4294967296]"[..])
        );
        assert_eq!(parse(b"<013>x").facility, 1);
        assert_eq!(kmsg_level(parse(b"<132>x").severity), 4);
    }

    fn within(outer: &[u8], inner: &[u8]) -> bool {
        let o = outer.as_ptr_range();
        let i = inner.as_ptr_range();
        o.start <= i.start && i.end <= o.end
    }

    fn syslogish() -> impl Strategy<Value = Vec<u8>> {
        let pri = prop_oneof![
            Just(Vec::new()),
            (0u16..300).prop_map(|n| alloc::format!("<{n}>").into_bytes()),
        ];
        let head = prop_oneof![
            Just(b"".to_vec()),
            Just(b"1 ".to_vec()),
            Just(b"Feb  5 17:32:18 ".to_vec()),
            Just(b"Feb 15 17:32:18".to_vec()),
        ];
        let piece = prop_oneof![
            Just(b" ".to_vec()),
            Just(b"-".to_vec()),
            Just(b":".to_vec()),
            Just(b"[".to_vec()),
            Just(b"]".to_vec()),
            Just(b"\\".to_vec()),
            Just(b"\"".to_vec()),
            Just(b"\xef\xbb\xbf".to_vec()),
            "[a-z0-9]{1,4}".prop_map(|s| s.into_bytes()),
            proptest::collection::vec(any::<u8>(), 1..3),
        ];
        let tail = prop_oneof![
            Just(b"".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\0".to_vec())
        ];
        (pri, head, proptest::collection::vec(piece, 0..16), tail)
            .prop_map(|(a, b, c, d)| [a, b, c.concat(), d].concat())
    }

    proptest! {
        #[test]
        fn total_and_borrowed(input in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            syslogish(),
        ]) {
            let s = parse(&input);
            prop_assert!(within(&input, s.msg));
            if let Some(tag) = s.tag {
                prop_assert!(!tag.is_empty() && within(&input, tag));
            }
            prop_assert!(s.facility <= 23 && s.severity <= 7);
            if s.format == Format::Bare {
                prop_assert_eq!((s.facility, s.severity, s.tag, s.pid), (1, 5, None, None));
            }
        }
    }
}
