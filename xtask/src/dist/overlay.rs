//! The firmware overlay: one tarball per board, `dist/blackbox-agent-<board>.tar.gz`, to unpack
//! over a root filesystem (Buildroot `BR2_ROOTFS_OVERLAY`, OpenWrt `files/`):
//!
//! ```text
//! usr/sbin/blackbox-agent             the static agent for the board's CPU
//! etc/init.d/S50blackbox               busybox init / sysv rcS (start, stop, restart, status)
//! etc/init.d/blackbox                  OpenWrt procd
//! etc/blackbox/agent.toml              [run] naming the board; logos limits commented out
//! etc/hotplug.d/ntp/50-blackbox        OpenWrt: NTP events keep the agent's synced flag
//! usr/libexec/blackbox/ntp-synced      the same for busybox `ntpd -S`
//! boot/blackbox-cmdline.txt            kernel command-line fragment (memmap= on x86/MIPS)
//! boot/blackbox-reserved-memory.dtsi   reserved-memory nodes (device-tree boards only)
//! SHA256SUMS                           of every file above
//! ```
//!
//! The files under `etc/` are templates in `board-support/overlay/` (every file there is
//! shipped; `@BOARD@` becomes the board's name; the executable bit is kept). The tarballs are
//! reproducible: names sorted, owner and group 0, modes normalised, every mtime
//! `SOURCE_DATE_EPOCH` (default: the time of the last commit), gzip without a name or time.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use blackbox_board::{BOARDS, Board, Reserve};

use super::{sha256sums, target_dir};
use crate::{project_root, run_cmd, show};

/// Where the templates live.
fn templates() -> PathBuf {
    project_root().join("board-support/overlay")
}

/// Writes the tarball of every board whose agent target is in `agents`; returns their names.
pub(super) fn write_all(out: &Path, agents: &[(&str, &Path)]) -> Result<Vec<String>> {
    check_gnu_tar()?;
    let mtime = source_date_epoch();
    let mut names = Vec::new();
    for board in BOARDS {
        let Some(&(_, agent)) = agents.iter().find(|(t, _)| *t == board.rust_target) else {
            println!(
                "    no overlay for {}: its agent ({}) was not built",
                board.name, board.rust_target
            );
            continue;
        };
        let name = format!("blackbox-agent-{}.tar.gz", board.name);
        println!("==> overlay {name}");
        write_one(board, agent, &out.join(&name), mtime)?;
        names.push(name);
    }
    Ok(names)
}

fn write_one(board: &Board, agent: &Path, tarball: &Path, mtime: u64) -> Result<()> {
    let stage = target_dir().join("overlay").join(board.name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    copy_templates(&templates(), &stage, board)?;
    let binary = std::fs::read(agent).with_context(|| format!("reading {}", agent.display()))?;
    put(&stage, "usr/sbin/blackbox-agent", &binary, true)?;
    put(
        &stage,
        "boot/blackbox-cmdline.txt",
        cmdline_txt(board).as_bytes(),
        false,
    )?;
    if let Some(dtsi) = dtsi(board) {
        put(
            &stage,
            "boot/blackbox-reserved-memory.dtsi",
            dtsi.as_bytes(),
            false,
        )?;
    }

    let mut files = Vec::new();
    list_files(&stage, &stage, &mut files)?;
    files.sort();
    sha256sums(&stage, &files, &stage.join("SHA256SUMS"))?;

    let mut top: Vec<String> = std::fs::read_dir(&stage)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    top.sort();
    let plain = tarball.with_extension(""); // x.tar.gz -> x.tar
    let mut tar = Command::new("tar");
    tar.env("LC_ALL", "C")
        .arg("--create")
        .arg("--file")
        .arg(&plain)
        .args([
            "--format=gnu",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            // rw-r--r--, or rwxr-xr-x for directories and executables, whatever the umask.
            "--mode=u=rwX,go=rX",
        ])
        .arg(format!("--mtime=@{mtime}"))
        .arg("--directory")
        .arg(&stage)
        .arg("--")
        .args(&top);
    run_cmd(&mut tar)?;
    // -n: no file name or time in the gzip header.
    run_cmd(Command::new("gzip").args(["-n", "-9", "-f"]).arg(&plain))?;
    if !tarball.exists() {
        bail!("gzip did not write {}", tarball.display());
    }
    Ok(())
}

/// Copies the template tree `from` into `to`, with `@BOARD@` replaced in every file.
fn copy_templates(from: &Path, to: &Path, board: &Board) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let (src, dest) = (entry.path(), to.join(entry.file_name()));
        let meta = entry.metadata()?;
        if meta.is_dir() {
            copy_templates(&src, &dest, board)?;
            continue;
        }
        let text = std::fs::read_to_string(&src)
            .with_context(|| format!("reading the template {}", src.display()))?;
        let exec = meta.permissions().mode() & 0o111 != 0;
        write_file(&dest, text.replace("@BOARD@", board.name).as_bytes(), exec)?;
    }
    Ok(())
}

/// Writes `rel` (a `/`-separated path) under `stage`.
fn put(stage: &Path, rel: &str, bytes: &[u8], exec: bool) -> Result<()> {
    let dest = stage.join(rel);
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_file(&dest, bytes, exec)
}

fn write_file(dest: &Path, bytes: &[u8], exec: bool) -> Result<()> {
    std::fs::write(dest, bytes).with_context(|| format!("writing {}", dest.display()))?;
    let mode = if exec { 0o755 } else { 0o644 };
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", dest.display()))
}

/// Every file under `dir`, as paths relative to `root`.
fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            list_files(root, &path, out)?;
        } else {
            let rel = path
                .strip_prefix(root)
                .context("a file outside the stage")?;
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// `boot/blackbox-cmdline.txt`: the fragment on its own line, comments around it (so
/// `grep -v '^#'` gives exactly the fragment).
fn cmdline_txt(b: &Board) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        s,
        "# blackbox, board {}: add the next line to the kernel command line.",
        b.name
    );
    let _ = match b.reserve {
        Reserve::Memmap => writeln!(
            s,
            "# Its memmap= words keep the agent's ring (and ramoops) out of the kernel's RAM.\n\
             # In GRUB write each `$` as `\\$`; in U-Boot quote the whole bootargs value."
        ),
        Reserve::DeviceTree => writeln!(
            s,
            "# The ring is reserved in the device tree: see blackbox-reserved-memory.dtsi."
        ),
    };
    let _ = writeln!(s, "{}", b.cmdline());
    if let (Reserve::Memmap, Some(params)) = (b.reserve, b.ramoops_params()) {
        let _ = writeln!(
            s,
            "# If ramoops is a module rather than built in, load it with these parameters\n\
             # (busybox insmod does not read ramoops.* from the kernel command line):\n\
             # insmod ramoops.ko {params}"
        );
    }
    s
}

/// `boot/blackbox-reserved-memory.dtsi`, for device-tree boards.
fn dtsi(b: &Board) -> Option<String> {
    let fragment = b.dts_fragment()?;
    Some(format!(
        "/*\n * blackbox, board {}: the agent's ring{} kept out of the kernel's RAM.\n \
         * Include it at the end of the board's .dts:\n \
         *     /include/ \"blackbox-reserved-memory.dtsi\"\n \
         * If the .dts has a reserved-memory node already, move these nodes into it (and write\n \
         * their reg in its #address-cells and #size-cells).\n */\n{fragment}",
        b.name,
        if b.ramoops.is_some() {
            " and the ramoops region,"
        } else {
            ","
        }
    ))
}

/// The tarballs' mtime: `SOURCE_DATE_EPOCH`, else the last commit's time, else 0.
fn source_date_epoch() -> u64 {
    if let Some(t) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return t;
    }
    Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(project_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// The flags above are GNU tar's.
fn check_gnu_tar() -> Result<()> {
    let mut cmd = Command::new("tar");
    cmd.arg("--version");
    let out = cmd
        .output()
        .with_context(|| format!("could not run `{}`", show(&cmd)))?;
    if !String::from_utf8_lossy(&out.stdout).contains("GNU tar") {
        bail!("the overlays need GNU tar (Debian: `apt-get install tar`)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use blackbox_board::{QEMU_AARCH64_VIRT, QEMU_X86_64};

    #[test]
    fn cmdline_file_is_the_fragment_once_comments_are_dropped() {
        for b in BOARDS {
            let text = cmdline_txt(b);
            let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
            assert_eq!(lines, [b.cmdline().to_string()], "{}", b.name);
        }
        let x86 = cmdline_txt(&QEMU_X86_64);
        assert!(
            x86.contains("# insmod ramoops.ko mem_address=0x1f000000 "),
            "{x86}"
        );
    }

    #[test]
    fn only_device_tree_boards_get_a_dtsi() {
        assert!(dtsi(&QEMU_X86_64).is_none());
        let d = dtsi(&QEMU_AARCH64_VIRT).unwrap_or_default();
        assert!(
            d.starts_with("/*\n * blackbox, board qemu-aarch64-virt"),
            "{d}"
        );
        assert!(d.contains("blackbox-ring@5e000000"), "{d}");
    }

    #[test]
    fn templates_are_complete() {
        let t = templates();
        for f in [
            "etc/init.d/S50blackbox",
            "etc/init.d/blackbox",
            "etc/hotplug.d/ntp/50-blackbox",
            "usr/libexec/blackbox/ntp-synced",
        ] {
            let mode = std::fs::metadata(t.join(f)).map(|m| m.permissions().mode());
            assert!(mode.is_ok_and(|m| m & 0o111 != 0), "{f} must be executable");
        }
        let toml = std::fs::read_to_string(t.join("etc/blackbox/agent.toml")).unwrap_or_default();
        assert!(toml.contains("board = \"@BOARD@\""), "{toml}");
    }

    /// The busybox init script, run by `sh` against a stub agent (its paths from
    /// `$BLACKBOX_DEFAULTS`): `start` writes the identity line into the kernel log and runs the
    /// agent with the configured state directory, the supervisor starts it again after it dies,
    /// `status` says so, and `stop` ends the supervisor and the agent.
    #[test]
    fn the_busybox_script_supervises_the_agent() {
        use std::time::{Duration, Instant};
        let dir = std::env::temp_dir().join(format!("bb-s50-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run")).unwrap_or_default();
        let d = dir.display();
        let agent = dir.join("agent");
        std::fs::write(
            &agent,
            format!(
                "#!/bin/sh\n\
                 echo \"$*\" >>'{d}/calls'\n\
                 case \"$1\" in\n\
                 identity) echo 'sha256:00  dev-1' ;;\n\
                 logos) cat >>'{d}/kmsg' ;;\n\
                 run) exec sleep 30 ;;\n\
                 esac\n"
            ),
        )
        .unwrap_or_default();
        let _ = std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755));
        std::fs::write(
            dir.join("agent.toml"),
            format!("[run]\nstate_dir = \"{d}/state\"\n"),
        )
        .unwrap_or_default();
        let defaults = dir.join("defaults");
        std::fs::write(
            &defaults,
            format!(
                "AGENT='{d}/agent'\nCONFIG='{d}/agent.toml'\nPIDFILE='{d}/run/bb.pid'\n\
                 AGENT_PIDFILE='{d}/run/agent.pid'\nRESPAWN_DELAY=1\nPSTORE='{d}/no-pstore'\n"
            ),
        )
        .unwrap_or_default();
        let script = templates().join("etc/init.d/S50blackbox");
        // Its output through a pipe, as a shell or ssh takes it: a supervisor left holding the
        // pipe (dash keeps a copy of redirected descriptors) would make the caller hang.
        let rc = |arg: &str| {
            let child = std::process::Command::new("sh")
                .arg(&script)
                .arg(arg)
                .env("BLACKBOX_DEFAULTS", &defaults)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn();
            let child = child.unwrap_or_else(|e| panic!("sh: {e}"));
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(child.wait_with_output());
            });
            let out = rx.recv_timeout(Duration::from_secs(10));
            let out = out.unwrap_or_else(|_| panic!("`{arg}` kept its caller's output open"));
            let out = out.unwrap_or_else(|e| panic!("sh: {e}"));
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        };
        // Whatever happens, stop the supervisor and remove the files.
        struct Stop(PathBuf, PathBuf, PathBuf);
        impl Drop for Stop {
            fn drop(&mut self) {
                let _ = std::process::Command::new("sh")
                    .arg(&self.0)
                    .arg("stop")
                    .env("BLACKBOX_DEFAULTS", &self.1)
                    .output();
                let _ = std::fs::remove_dir_all(&self.2);
            }
        }
        let _stop = Stop(script.clone(), defaults.clone(), dir.clone());
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let runs = || {
            read("calls")
                .lines()
                .filter(|l| *l == format!("run --config {d}/agent.toml --state-dir {d}/state"))
                .count()
        };
        let until = |what: &dyn Fn() -> bool| {
            let t = Instant::now();
            while !what() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            what()
        };

        assert_eq!(rc("start"), (Some(0), "blackbox: started\n".into()));
        assert!(until(&|| runs() == 1), "{}", read("calls"));
        // The identity is made before the agent runs (`logos` may come first: it runs beside
        // `identity`, in the same pipeline).
        let calls = read("calls");
        let identity = calls.find(&format!("identity --state-dir {d}/state\n"));
        assert!(
            identity.is_some_and(|i| calls.find("run --config").is_some_and(|r| i < r)),
            "{calls}"
        );
        assert!(
            until(&|| read("kmsg").contains("sha256:00  dev-1")),
            "{}",
            read("kmsg")
        );
        assert!(dir.join("state").is_dir());
        assert_eq!(rc("status").0, Some(0));
        // The agent dies: the supervisor logs it and starts it again.
        let pid = read("run/agent.pid");
        assert!(
            std::process::Command::new("kill")
                .arg(pid.trim())
                .status()
                .is_ok_and(|s| s.success())
        );
        assert!(until(&|| runs() == 2), "{}", read("calls"));
        assert!(read("kmsg").contains("blackbox-agent run exited with status"));
        assert_eq!(rc("stop"), (Some(0), "blackbox: stopped\n".into()));
        assert_eq!(rc("status").0, Some(3));
        assert!(!dir.join("run/agent.pid").exists() && !dir.join("run/bb.pid").exists());
        assert_eq!(runs(), 2, "not started again after stop");
    }

    /// The NTP hook keeps the synced flag: set on a step, and on a stratum event or the
    /// periodic one while the stratum is below 16; cleared at stratum 16 and on unsync; other
    /// events leave it alone.
    #[test]
    fn the_ntp_hook_keeps_the_synced_flag() {
        let dir = std::env::temp_dir().join(format!("bb-ntp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let flag = dir.join("run/blackbox.synced");
        let hook = templates().join("usr/libexec/blackbox/ntp-synced");
        let event = |args: &[&str], stratum: Option<&str>| {
            let mut c = std::process::Command::new("sh");
            c.arg(&hook).args(args).env("BLACKBOX_SYNCED_FLAG", &flag);
            match stratum {
                Some(s) => c.env("stratum", s),
                None => c.env_remove("stratum"),
            };
            assert!(c.status().is_ok_and(|s| s.success()), "{args:?}");
            flag.exists()
        };
        assert!(!event(&["periodic"], None), "no stratum: not synchronised");
        assert!(event(&["step"], None), "the clock was set");
        assert!(
            event(&["bogus"], Some("16")),
            "unknown events change nothing"
        );
        assert!(!event(&["stratum"], Some("16")));
        assert!(event(&["stratum"], Some("2")));
        assert!(event(&["periodic"], Some("3")));
        assert!(!event(&["unsync"], Some("3")));
        assert!(
            !event(&["stratum"], Some("x")),
            "a stratum that is not a number"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// OpenWrt's procd script, run by `sh` with procd, `mkdir` and the agent stubbed: the
    /// identity and the agent use /etc/blackbox/state (OpenWrt's /var is RAM) unless the config
    /// names a state directory, and then both use that one.
    #[test]
    fn the_openwrt_script_keeps_the_identity_on_flash() {
        let dir = std::env::temp_dir().join(format!("bb-procd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let script = templates().join("etc/init.d/blackbox");
        let run = |config: &str| -> String {
            let conf = dir.join("agent.toml");
            std::fs::write(&conf, config).unwrap_or_default();
            let calls = dir.join("calls");
            let _ = std::fs::remove_file(&calls);
            let sh = format!(
                ". '{script}'\n\
                 CONFIG='{conf}'\n\
                 PROG=agent\n\
                 agent() {{ echo \"agent $*\" >>'{calls}'; }}\n\
                 mkdir() {{ echo \"mkdir $*\" >>'{calls}'; }}\n\
                 logger() {{ cat >/dev/null; }}\n\
                 procd_open_instance() {{ :; }}\n\
                 procd_close_instance() {{ :; }}\n\
                 procd_set_param() {{ echo \"$*\" >>'{calls}'; }}\n\
                 start_service\n",
                script = script.display(),
                conf = conf.display(),
                calls = calls.display(),
            );
            let ok = std::process::Command::new("sh")
                .args(["-c", &sh])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "sh {sh}");
            std::fs::read_to_string(&calls).unwrap_or_default()
        };
        let calls = run("[run]\nserver = \"https://x\"\n");
        for want in [
            "mkdir -p /etc/blackbox/state",
            "agent identity --state-dir /etc/blackbox/state",
            "command agent run --config",
        ] {
            assert!(calls.contains(want), "{want}: {calls}");
        }
        assert!(
            calls.contains("agent.toml --state-dir /etc/blackbox/state\n"),
            "{calls}"
        );
        let calls = run("[run]\nstate_dir = \"/data/bb\"\n");
        assert!(
            calls.contains("agent identity --state-dir /data/bb"),
            "{calls}"
        );
        assert!(
            calls.contains("agent.toml --state-dir /data/bb\n"),
            "{calls}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
