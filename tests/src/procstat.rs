//! Memory and CPU of processes, read from `/proc` (Linux): what the flood reports for the
//! receiver, for nginx and for itself.

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Resident set size now, bytes (`VmRSS`).
    pub rss: u64,
    /// Peak resident set size, bytes (`VmHWM`).
    pub peak_rss: u64,
    /// User + system CPU time, seconds.
    pub cpu_secs: f64,
}

impl Usage {
    /// Sums readings (a master process and its workers).
    pub fn sum(all: impl IntoIterator<Item = Usage>) -> Usage {
        all.into_iter().fold(Usage::default(), |a, b| Usage {
            rss: a.rss + b.rss,
            peak_rss: a.peak_rss + b.peak_rss,
            cpu_secs: a.cpu_secs + b.cpu_secs,
        })
    }
}

/// The process's memory and CPU, or `None` once it is gone.
pub fn usage(pid: u32) -> Option<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let (_, fields) = stat_fields(pid)?;
    Some(Usage {
        rss: kib("VmRSS:"),
        peak_rss: kib("VmHWM:"),
        cpu_secs: cpu_of(&fields),
    })
}

/// CPU seconds (user + system) this process has used so far.
pub fn self_cpu_secs() -> f64 {
    usage(std::process::id()).map_or(0.0, |u| u.cpu_secs)
}

/// Process ids whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| stat_fields(*p).is_some_and(|(ppid, _)| ppid == pid))
        .collect()
}

/// The fields of `/proc/PID/stat` after the command name, and the parent pid.
fn stat_fields(pid: u32) -> Option<(u32, Vec<String>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
    let ppid = fields.get(1)?.parse().ok()?;
    Some((ppid, fields))
}

fn cpu_of(fields: &[String]) -> f64 {
    // utime and stime are fields 14 and 15 of the line, 12th and 13th after the name.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / rustix::param::clock_ticks_per_second() as f64
}
