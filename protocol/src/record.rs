//! One log record, as the agent read it and as a chunk carries it.
use alloc::vec::Vec;

/// Where a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Origin {
    /// Read from `/dev/kmsg`: kernel messages and every userspace line funnelled into it.
    Kmsg,
    /// Recovered from a pstore/ramoops dump after a reboot (the panic itself).
    Pstore,
    /// Written by the agent itself: gaps (records lost, with counts), markers.
    Agent,
}

impl Origin {
    /// The name used in the JSON line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Kmsg => "kmsg",
            Self::Pstore => "pstore",
            Self::Agent => "agent",
        }
    }

    /// The inverse of [`Origin::as_str`].
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "kmsg" => Some(Self::Kmsg),
            "pstore" => Some(Self::Pstore),
            "agent" => Some(Self::Agent),
            _ => None,
        }
    }
}

/// One record: a line of the device's single ordered log stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number in the device's per-boot stream (the kernel's kmsg sequence for kmsg
    /// records). Strictly increasing within a boot.
    pub seq: u64,
    /// Monotonic time since boot, in microseconds.
    pub mono_us: u64,
    /// Syslog severity, 0 (emerg) to 7 (debug).
    pub level: u8,
    /// Syslog facility (0 kernel, 1 user, ...).
    pub facility: u8,
    /// Where the record came from.
    pub origin: Origin,
    /// The message bytes, exactly as logged (not necessarily UTF-8).
    pub msg: Vec<u8>,
}

impl Record {
    /// Highest valid syslog severity.
    pub const MAX_LEVEL: u8 = 7;

    /// A record the agent writes to say that `count` records with sequence numbers in
    /// `first..=last` were lost, and why. Its own sequence number is `first`, so it sorts where
    /// the lost records stood.
    pub fn gap(first: u64, last: u64, count: u64, mono_us: u64, reason: &str) -> Self {
        let msg = alloc::format!("blackbox: {count} records lost (seq {first}..{last}): {reason}");
        Self {
            seq: first,
            mono_us,
            level: 4,
            facility: 0,
            origin: Origin::Agent,
            msg: msg.into_bytes(),
        }
    }
}
