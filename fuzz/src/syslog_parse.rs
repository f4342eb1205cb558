//! What a program sends to `/dev/log`, through the agent's syslog path up to the kmsg records.
//!
//! - `syslog::parse` is total: any bytes give a message, no panic;
//! - the tag and the text are subslices of the input, the tag is never empty, facility and
//!   severity are in range;
//! - the message's lines (cut by `LineSplitter`) formatted as kmsg writes
//!   (`write_kmsg_lines`) give records of at most `KMSG_MAX` bytes, each `<PRI>NAME…: …\n`
//!   with no other line end inside, so one record is one line of the kernel log.
use blackbox_agent::logline::{KMSG_MAX, KmsgHeader, LineSplitter, Piece, write_kmsg_lines};
use blackbox_agent::syslog::{self, kmsg_level};

fn within(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    inner.is_empty() || (i >= o && i + inner.len() <= o + outer.len())
}

/// The checks on one input (what the fuzz target runs); panics on a failure.
pub fn run(data: &[u8]) {
    let m = syslog::parse(data);
    assert!(m.facility <= 23 && m.severity <= 7, "{m:?}");
    assert!(within(data, m.msg), "msg outside the input");
    if let Some(tag) = m.tag {
        assert!(!tag.is_empty() && within(data, tag), "bad tag {tag:?}");
    }
    let header = KmsgHeader {
        level: kmsg_level(m.severity),
        facility: m.facility,
        name: m.tag.unwrap_or(b"syslog"),
        pid: m.pid,
    };
    let mut buf = [0u8; KMSG_MAX];
    let mut emit = |text: &[u8], piece: Piece| {
        let _ = write_kmsg_lines::<()>(&header, piece, text, &mut buf, |rec| {
            assert!(rec.len() <= KMSG_MAX, "record of {} bytes", rec.len());
            assert_eq!(rec.first(), Some(&b'<'), "{rec:?}");
            assert_eq!(rec.last(), Some(&b'\n'), "{rec:?}");
            let inner = &rec[..rec.len() - 1];
            assert!(
                !inner.iter().any(|&b| b == b'\n' || b == b'\r' || b == 0),
                "a line end or NUL inside a record: {rec:?}"
            );
            Ok(())
        });
    };
    let mut lines: LineSplitter = LineSplitter::new();
    lines.feed(m.msg, &mut emit);
    lines.finish(&mut emit);
}
