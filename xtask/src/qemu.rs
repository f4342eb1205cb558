//! `cargo xtask qemu --arch ARCH [--panic | --footprint]`: the agent on a real kernel in QEMU.
//!
//! Assembles a boot image from Debian's packages and the agent built for the board
//! ([`image`]), starts `blackbox-server` with TLS on the host's loopback (the guest reaches it
//! through QEMU's user networking as 10.0.2.2, over mutual TLS with an identity made on the host
//! and put on the allowlist), boots the guest (TCG) with the serial console in a file, and
//! watches the console and the store until the check is complete or time runs out. What the
//! guest does is `qemu/init.sh`; what counts as stored exactly once is [`check`].
//!
//! Everything stays under `target/qemu/ARCH/` (serial.log, server.log, qemu.log, the store, the
//! image); the paths are printed when the check fails.

mod check;
mod image;
mod json;

use std::collections::HashSet;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use blackbox_board::{BOARDS, Board, Qemu, Reserve};

use crate::run::{Proc, ServerTls, allow_agent, build_host, stop_flag, wait_healthy};
use crate::{apt, dist, project_root};
use check::{Check, Serial, Store};

/// How long the store may keep changing after the check is complete (late duplicates show up).
const SETTLE: Duration = Duration::from_secs(3);
/// Footprint test: how long the agent may take to deliver the rest after the load ended.
const FOOTPRINT_DRAIN: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub(crate) struct QemuArgs {
    /// The guest's CPU: x86_64, aarch64, armv7 or mipsel (the matching QEMU board).
    #[arg(long)]
    arch: String,
    /// Panic the first boot (sysrq c) and check after the second that everything written
    /// before the panic was stored exactly once under the first boot.
    #[arg(long, conflicts_with = "footprint")]
    panic: bool,
    /// Instead of the check: peak RSS of the agent and logos while forwarding --rate lines
    /// a second for --secs seconds.
    #[arg(long)]
    footprint: bool,
    /// Lines each of the two apps prints.
    #[arg(long, default_value_t = 400)]
    lines: u32,
    /// Footprint: lines per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Footprint: seconds.
    #[arg(long, default_value_t = 60)]
    secs: u32,
    /// Give up after this many seconds of QEMU.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Boot this agent binary (built for the guest's CPU) instead of building one.
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
}

/// The QEMU board whose agent target is for `arch`.
fn board_for(arch: &str) -> Result<(&'static Board, &'static Qemu)> {
    BOARDS
        .iter()
        .filter_map(|b| Some((b, b.qemu.as_ref()?)))
        .find(|(b, _)| b.rust_target.split('-').next() == Some(arch))
        .with_context(|| {
            let known: Vec<&str> = BOARDS
                .iter()
                .filter(|b| b.qemu.is_some())
                .filter_map(|b| b.rust_target.split('-').next())
                .collect();
            format!(
                "no QEMU board for --arch {arch}; known: {}",
                known.join(", ")
            )
        })
}

/// The Debian package with `qemu-system-*`.
fn qemu_package(system: &str) -> &'static str {
    match system {
        "qemu-system-x86_64" => "qemu-system-x86",
        s if s.starts_with("qemu-system-mips") => "qemu-system-mips",
        _ => "qemu-system-arm",
    }
}

pub(crate) fn run(args: QemuArgs) -> Result<()> {
    let started = Instant::now();
    let (board, q) = board_for(&args.arch)?;
    let dir = project_root().join("target/qemu").join(&args.arch);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mode = match (args.panic, args.footprint) {
        (true, _) => "panic",
        (_, true) => "footprint",
        _ => "once",
    };
    println!(
        "==> qemu {} ({}), {mode}: preparing (tools, kernel, agent, image)",
        args.arch, board.name
    );

    let mut tools = vec![
        (q.system, qemu_package(q.system)),
        ("cpio", "cpio"),
        ("dpkg-deb", "dpkg"),
    ];
    if board.reserve == Reserve::DeviceTree {
        tools.push(("dtc", "device-tree-compiler"));
    }
    apt::ensure_programs(&tools)?;
    // Debug builds: CI's tests have built them already, and the host side is not measured.
    let bin = build_host(&["blackbox-server", "blackbox-agent"], false)?;
    let agent = match &args.agent {
        Some(path) => project_root().join(path),
        None => dist::build_agent(board.rust_target)?,
    };

    let server_bin = bin.join("blackbox-server");
    let tls = ServerTls::ensure(&server_bin, dir.join("tls"))?;
    let device = format!("qemu-{}", args.arch);
    let state = dir.join("state");
    allow_agent(
        Command::new(bin.join("blackbox-agent")),
        &server_bin,
        &state,
        &device,
        &tls.allowlist(),
    )?;

    let port = free_port()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let pstore = image::has_pstore(board, q);
    let env = [
        ("MODE", mode.to_owned()),
        ("BOARD", board.name.to_owned()),
        ("DEVICE", device.clone()),
        ("SERVER", format!("https://10.0.2.2:{port}")),
        ("SCRATCH", format!("{:#x}", q.scratch.addr)),
        ("PSTORE", u8::from(pstore).to_string()),
        ("LINES", args.lines.to_string()),
        ("RATE", args.rate.to_string()),
        ("SECS", args.secs.to_string()),
        ("NOW", now.to_string()),
    ];
    let img = image::assemble(
        board,
        q,
        &dir,
        &image::Contents {
            agent: &agent,
            ca: &tls.ca(),
            state: &state,
            env: &env,
        },
    )?;
    println!(
        "    image ready in {} s: {} + {}",
        started.elapsed().as_secs(),
        img.kernel.display(),
        img.initrd.display()
    );

    let stop = stop_flag()?;
    let store_dir = dir.join("store");
    if store_dir.exists() {
        std::fs::remove_dir_all(&store_dir)
            .with_context(|| format!("removing {}", store_dir.display()))?;
    }
    let logs = Logs {
        serial: dir.join("serial.log"),
        server: dir.join("server.log"),
        qemu: dir.join("qemu.log"),
    };
    let listen: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
    let mut cmd = tls.serve(&server_bin, listen, &store_dir.to_string_lossy());
    cmd.arg("--segment-max-age-ms").arg("200");
    to_file(&mut cmd, &logs.server)?;
    let mut server = Proc::spawn("blackbox-server", cmd)?;
    wait_healthy(listen, &mut server, &stop)?;

    let mut cmd = qemu_command(board, q, &img, &logs.serial);
    to_file(&mut cmd, &logs.qemu)?;
    let booted = Instant::now();
    let mut qemu = Proc::spawn("qemu", cmd)?;
    println!(
        "    serial console: {} (tail -f it to watch)",
        logs.serial.display()
    );

    let deadline = booted + Duration::from_secs(args.timeout);
    let mut store = Store::default();
    let mut early: Option<HashSet<PathBuf>> = None;
    let mut complete_at: Option<Instant> = None;
    let mut seen_boots = 0;
    let mut last_sample_at: Option<Instant> = None;
    let outcome = loop {
        sleep(Duration::from_secs(1));
        if stop.load(Ordering::Relaxed) {
            break Outcome::Interrupted;
        }
        if let Some(status) = qemu.exited()? {
            break Outcome::QemuExited(status.to_string());
        }
        if let Some(status) = server.exited()? {
            break Outcome::ServerExited(status.to_string());
        }
        let serial = Serial::read(&logs.serial);
        while seen_boots < serial.boots.len() {
            seen_boots += 1;
            println!(
                "    {:>4} s  boot {seen_boots} ({})",
                booted.elapsed().as_secs(),
                serial.boots[seen_boots - 1]
            );
        }
        let order = store.refresh(&store_dir)?;
        if early.is_none() && serial.boots.len() >= 2 {
            early = Some(order.iter().cloned().collect());
        }
        let done = if args.footprint {
            // After the last sample: until every line is stored, or the agent has had time.
            let (Some(boot), true) = (serial.boots.first(), serial.done) else {
                if Instant::now() > deadline {
                    break Outcome::TimedOut;
                }
                continue;
            };
            let (lines, _) = check::load_lines(&store, &order, boot);
            let since = *last_sample_at.get_or_insert_with(Instant::now);
            lines as u64 >= u64::from(args.rate) * u64::from(args.secs)
                || since.elapsed() > FOOTPRINT_DRAIN
        } else {
            let (Some(boot), Some(dump)) = (serial.boots.first(), &serial.dump) else {
                if Instant::now() > deadline {
                    break Outcome::TimedOut;
                }
                continue;
            };
            let c = Check::run(dump, boot, &store, &order, early.as_ref());
            (!args.panic || serial.boots.len() >= 2)
                && c.complete(pstore && args.panic)
                && (!args.panic || identity_line(&store, &order, &serial, &device).is_some())
        };
        if done {
            let at = *complete_at.get_or_insert_with(Instant::now);
            if at.elapsed() >= SETTLE {
                break Outcome::Done;
            }
        }
        if Instant::now() > deadline {
            break Outcome::TimedOut;
        }
    };
    let qemu_secs = booted.elapsed().as_secs();
    qemu.stop();
    server.stop();

    println!();
    let serial = Serial::read(&logs.serial);
    let order = store.refresh(&store_dir)?;
    let mut failures = match &outcome {
        Outcome::Done => Vec::new(),
        other => vec![other.to_string()],
    };
    println!(
        "==> qemu {} ({}), {mode}: {} boot(s) in {qemu_secs} s of QEMU ({} s in all)",
        args.arch,
        board.name,
        serial.boots.len(),
        started.elapsed().as_secs()
    );
    if args.footprint {
        footprint_report(&args, &serial, &store, &order, &mut failures);
    } else if let (Some(boot), Some(dump)) = (serial.boots.first(), &serial.dump) {
        println!("    boot 1: {boot}");
        if let Some(b2) = serial.boots.get(1) {
            println!("    boot 2: {b2}");
        }
        let c = Check::run(dump, boot, &store, &order, early.as_ref());
        let no_pstore = (!args.panic)
            .then_some("no panic")
            .or((!pstore).then_some("the stock kernel has no pstore"));
        c.print(no_pstore);
        failures.extend(c.failures(pstore && args.panic));
        if args.panic && serial.boots.len() < 2 {
            failures.push("the guest did not come back after the panic".to_owned());
        }
        if args.panic && serial.boots.len() >= 2 {
            let said = serial.init_script.as_deref().unwrap_or("nothing");
            println!("    boot 2: etc/init.d/S50blackbox status: {said}");
            if !said.starts_with("blackbox: running") {
                failures.push(format!(
                    "boot 2: the init script did not report the agent running ({said})"
                ));
            }
            // The allowlist line the script writes into the kernel log reached the server.
            match identity_line(&store, &order, &serial, &device) {
                Some(l) => println!("    boot 2: stored {l:?}"),
                None => failures
                    .push("boot 2: the init script's identity line was not stored".to_owned()),
            }
        }
    } else {
        failures.push("the guest never copied its kernel log to the console".to_owned());
    }
    if serial.boots.len() > 2 {
        failures.push(format!("the guest booted {} times", serial.boots.len()));
    }
    if failures.is_empty() {
        println!("PASS");
        return Ok(());
    }
    println!("FAIL");
    for f in &failures {
        println!("    {f}");
    }
    println!("    serial console: {}", logs.serial.display());
    println!("    server log:     {}", logs.server.display());
    println!("    QEMU's output:  {}", logs.qemu.display());
    println!("    store:          {}", store_dir.display());
    bail!("the QEMU boot test failed on {}", args.arch)
}

fn footprint_report(
    args: &QemuArgs,
    serial: &Serial,
    store: &Store,
    order: &[PathBuf],
    failures: &mut Vec<String>,
) {
    let peak = |who: &str, field: &str| {
        serial
            .foot
            .iter()
            .filter_map(|s| s.kb.get(&(who.to_owned(), field.to_owned())))
            .max()
            .copied()
    };
    let last = |who: &str, field: &str| {
        serial
            .foot
            .iter()
            .rev()
            .find_map(|s| s.kb.get(&(who.to_owned(), field.to_owned())))
            .copied()
    };
    let kb = |v: Option<u64>| v.map_or("?".to_owned(), |v| format!("{v} kB"));
    let want = u64::from(args.rate) * u64::from(args.secs);
    let (stored, dup) = serial
        .boots
        .first()
        .map_or((0, 0), |b| check::load_lines(store, order, b));
    let secs = match serial.foot_span {
        (Some(a), Some(b)) if b > a => Some(b - a),
        _ => None,
    };
    println!(
        "    load: {want} lines of ~100 bytes at {} lines/s for {} s, written in {} s",
        args.rate,
        args.secs,
        secs.map_or("?".to_owned(), |s| format!("{s:.1}"))
    );
    println!("    stored: {stored} distinct, {dup} duplicated");
    println!(
        "    agent: peak RSS (VmHWM) {}, RSS at the end {}",
        kb(peak("agent", "VmHWM")),
        kb(last("agent", "VmRSS"))
    );
    println!(
        "    logos: peak RSS (VmHWM) {}, RSS {}",
        kb(peak("logos", "VmHWM")),
        kb(last("logos", "VmRSS"))
    );
    if (stored as u64) < want || dup > 0 {
        failures.push(format!(
            "{stored} of {want} lines stored ({dup} duplicated)"
        ));
    }
    if peak("agent", "VmHWM").is_none() {
        failures.push("no memory figures from the guest".to_owned());
    }
}

/// Why the watch ended.
enum Outcome {
    Done,
    TimedOut,
    Interrupted,
    QemuExited(String),
    ServerExited(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Done => f.write_str("done"),
            Outcome::TimedOut => f.write_str("timed out before the check was complete"),
            Outcome::Interrupted => f.write_str("interrupted"),
            Outcome::QemuExited(s) => write!(f, "QEMU exited on its own ({s})"),
            Outcome::ServerExited(s) => write!(f, "blackbox-server exited on its own ({s})"),
        }
    }
}

struct Logs {
    serial: PathBuf,
    server: PathBuf,
    qemu: PathBuf,
}

/// Boot 2's allowlist line (`blackbox: sha256:…  DEVICE`, written into the kernel log by the
/// init script), if stored.
fn identity_line(
    store: &Store,
    order: &[PathBuf],
    serial: &Serial,
    device: &str,
) -> Option<String> {
    let b2 = serial.boots.get(1)?;
    store.find(order, b2, |m| {
        m.starts_with("blackbox: sha256:") && m.ends_with(&format!("  {device}"))
    })
}

/// The QEMU command line: TCG, the board's machine, the serial console into `serial`, user
/// networking with the board's NIC.
fn qemu_command(board: &Board, q: &Qemu, img: &image::Image, serial: &Path) -> Command {
    let mut cmd = Command::new(q.system);
    cmd.args([
        "-accel",
        "tcg",
        "-M",
        q.machine,
        "-m",
        &q.ram_mib.to_string(),
    ])
    .args(["-display", "none", "-monitor", "none"])
    .arg("-serial")
    .arg(format!("file:{}", serial.display()))
    .args(["-nic", &format!("user,model={}", q.nic)])
    .arg("-kernel")
    .arg(&img.kernel)
    .arg("-initrd")
    .arg(&img.initrd)
    .arg("-append")
    .arg(board.cmdline().to_string());
    if let Some(cpu) = q.cpu {
        cmd.args(["-cpu", cpu]);
    }
    if let Some(dtb) = &img.dtb {
        cmd.arg("-dtb").arg(dtb);
    }
    cmd
}

fn to_file(cmd: &mut Command, path: &Path) -> Result<()> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    cmd.stdout(f.try_clone()?).stderr(f);
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("finding a free port")?
        .local_addr()?
        .port())
}

/// The boot test as CI runs it: `--arch ARCH --panic`.
pub(crate) fn ci(arch: &str) -> Result<()> {
    run(QemuArgs {
        arch: arch.to_owned(),
        panic: true,
        footprint: false,
        lines: 400,
        rate: 1000,
        secs: 60,
        timeout: 600,
        agent: None,
    })
}
