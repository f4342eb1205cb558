//! The agent's TOML configuration file (default `/etc/blackbox/agent.toml`).
//!
//! ```toml
//! # `blackbox-agent run` (command-line flags win over these).
//! [run]
//! server = "https://blackbox.example.net:8443"
//! server_ca = "/etc/blackbox/server-ca.pem"
//! board = "qemu-x86_64"            # the ring in the board's reserved memory
//! state_dir = "/var/lib/blackbox"
//! interval = 60                    # seconds between uploads
//! syslog = ["/dev/log"]            # sockets to listen on ([] for none; "stream:PATH" too)
//! synced_flag = "/var/run/blackbox.synced"  # exists while NTP has the clock
//!
//! # Limits for every app's lines (logos and syslog tags); each key is optional.
//! [logos.default]
//! burst_bytes = 1048576   # the burst bucket: this many bytes ...
//! burst_secs = 300        # ... refilled over this many seconds
//! daily_bytes = 5242880   # the long-term bucket
//! daily_secs = 86400
//!
//! # One app (the NAME given to `logos`, or a syslog tag); unset keys come from [logos.default].
//! [logos.app.dnsmasq]
//! burst_bytes = 262144
//! ```
//!
//! Both buckets start half full. `*_bytes = 0` mutes an app (every line dropped and counted).
//! Unknown keys are errors, so a typo does not silently leave a limit at its default.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::bucket::Limits;

/// Where the agent looks for its configuration when none is given.
pub const DEFAULT_PATH: &str = "/etc/blackbox/agent.toml";

/// The whole file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Settings of `blackbox-agent run`.
    #[serde(default)]
    pub run: RunToml,
    /// Per-app rate limits.
    #[serde(default)]
    pub logos: LogosConfig,
}

/// `[run]`: defaults for `blackbox-agent run`'s flags of the same names.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunToml {
    /// `--server`.
    pub server: Option<String>,
    /// `--server-ca`.
    pub server_ca: Option<PathBuf>,
    /// `--board`.
    pub board: Option<String>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--device-id`.
    pub device_id: Option<String>,
    /// `--interval`, seconds.
    pub interval: Option<f64>,
    /// `--syslog-socket`, each; an empty list turns the listener off.
    pub syslog: Option<Vec<String>>,
    /// `--synced-flag`.
    pub synced_flag: Option<PathBuf>,
}

/// `[logos]`: the default limits and per-app overrides.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogosConfig {
    /// `[logos.default]`.
    #[serde(default)]
    pub default: LimitsToml,
    /// `[logos.app.NAME]`.
    #[serde(default)]
    pub app: BTreeMap<String, LimitsToml>,
}

/// Limits as written in the file; unset keys fall back.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsToml {
    /// Burst bucket size, bytes.
    pub burst_bytes: Option<u64>,
    /// Burst bucket refill time, seconds.
    pub burst_secs: Option<u64>,
    /// Long-term bucket size, bytes.
    pub daily_bytes: Option<u64>,
    /// Long-term bucket refill time, seconds.
    pub daily_secs: Option<u64>,
}

impl LimitsToml {
    fn over(self, base: Limits) -> Limits {
        let us = |s: u64| s.saturating_mul(1_000_000);
        Limits {
            burst_bytes: self.burst_bytes.unwrap_or(base.burst_bytes),
            burst_period_us: self.burst_secs.map_or(base.burst_period_us, us),
            daily_bytes: self.daily_bytes.unwrap_or(base.daily_bytes),
            daily_period_us: self.daily_secs.map_or(base.daily_period_us, us),
        }
    }

    fn check(&self, what: &str) -> anyhow::Result<()> {
        if self.burst_secs == Some(0) || self.daily_secs == Some(0) {
            bail!("{what}: burst_secs and daily_secs must be at least 1");
        }
        Ok(())
    }
}

impl Config {
    /// Parses the text of a configuration file.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let cfg: Self = toml::from_str(text)?;
        cfg.logos.default.check("[logos.default]")?;
        for (name, l) in &cfg.logos.app {
            l.check(&format!("[logos.app.{name}]"))?;
        }
        Ok(cfg)
    }

    /// Reads `path`. A missing file is the default configuration unless `required` (the path
    /// was given explicitly).
    pub fn load(path: &Path, required: bool) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).with_context(|| format!("in {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The limits of app `name`.
    pub fn limits_for(&self, name: &str) -> Limits {
        let base = self.logos.default.over(Limits::DEFAULT);
        match self.logos.app.get(name) {
            Some(l) => l.over(base),
            None => base,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_overrides_and_errors() {
        let c = Config::parse(
            "[logos.default]\nburst_bytes = 1000\n[logos.app.dnsmasq]\ndaily_secs = 60\n",
        )
        .unwrap();
        let d = c.limits_for("other");
        assert_eq!(d.burst_bytes, 1000);
        assert_eq!(d.daily_bytes, Limits::DEFAULT.daily_bytes);
        let a = c.limits_for("dnsmasq");
        assert_eq!(a.burst_bytes, 1000);
        assert_eq!(a.daily_period_us, 60_000_000);
        assert_eq!(Config::parse("").unwrap().limits_for("x"), Limits::DEFAULT);
        assert!(Config::parse("[logos.default]\nburst_byte = 1\n").is_err());
        assert!(Config::parse("[logos.app.x]\nburst_secs = 0\n").is_err());
        let r =
            Config::parse("[run]\nserver = \"https://h:1\"\nsyslog = []\ninterval = 5\n").unwrap();
        assert_eq!(r.run.server.as_deref(), Some("https://h:1"));
        assert_eq!(r.run.syslog, Some(vec![]));
        assert_eq!(r.run.interval, Some(5.0));
        let f = Config::parse("[run]\nsynced_flag = \"/var/run/x\"\n").unwrap();
        assert_eq!(f.run.synced_flag, Some(PathBuf::from("/var/run/x")));
        assert!(Config::parse("[run]\nservr = \"x\"\n").is_err());
        assert!(Config::load(Path::new("/nonexistent/agent.toml"), false).is_ok());
        assert!(Config::load(Path::new("/nonexistent/agent.toml"), true).is_err());
    }

    /// The `agent.toml` that `cargo xtask dist` puts into every firmware overlay parses, for
    /// every board, both as shipped and with each commented-out setting switched on: so neither
    /// the file nor its examples can drift from what the agent accepts.
    #[test]
    fn the_overlay_agent_toml_parses_for_every_board() {
        let template = include_str!("../../../board-support/overlay/etc/blackbox/agent.toml");
        // `# key = value` and `# [table]` lines are examples; other comments are prose.
        let uncommented: String = template
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with('[')
                        || rest.split_once(" = ").is_some_and(|(k, _)| {
                            k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        }) =>
                {
                    rest
                }
                _ => line,
            })
            .fold(String::new(), |acc, l| acc + l + "\n");
        assert_ne!(uncommented, template, "the template shows no examples");
        for b in blackbox_board::BOARDS {
            for text in [template, uncommented.as_str()] {
                let c = Config::parse(&text.replace("@BOARD@", b.name))
                    .unwrap_or_else(|e| panic!("{}: {e:#}\n{text}", b.name));
                assert_eq!(c.run.board.as_deref(), Some(b.name));
                assert!(c.run.server.is_some() && c.run.server_ca.is_some());
            }
        }
        let full = Config::parse(&uncommented.replace("@BOARD@", "qemu-x86_64")).unwrap();
        assert!(full.run.device_id.is_some() && full.run.interval.is_some());
        assert!(!full.logos.app.is_empty());
    }
}
