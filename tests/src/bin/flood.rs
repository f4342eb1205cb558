//! `flood`: the fibre-repair load generator (run it as `cargo xtask flood`, which builds the
//! release binaries and installs nginx). See `blackbox_tests::flood` for what a device does.
//!
//! Phases (`--phases`, default both):
//! - `flood`: N devices (default 10,000) come back at once with the real agent's schedule
//!   (interval 60 s); the receiver runs with default settings. Prints throughput, the 503 share,
//!   the receiver's peak RSS and CPU, and checks that every chunk is stored exactly once.
//! - `bench`: the same bodies, devices retrying within 1 s, against the receiver and against
//!   nginx PUT into files: MB/s and chunks/s of both, and the ratio.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blackbox_tests::flood::{Fleet, FleetConfig};
use blackbox_tests::scenario::{self, RunReport, Scenario};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Floods blackbox-server with a fleet of devices coming back after an outage")]
struct Args {
    /// Devices.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Chunks each device holds when it comes back.
    #[arg(long, default_value_t = 4)]
    backlog: usize,
    /// Ring block (one chunk) in bytes; the agent's default ring of 16 MiB has 64 KiB blocks.
    #[arg(long, default_value_t = 64 << 10)]
    block_bytes: usize,
    /// Deflate level of the chunks (the agent's default).
    #[arg(long, default_value_t = 6)]
    level: u8,
    /// Plain HTTP (receiver in --insecure-http mode, nginx without TLS) instead of mutual TLS.
    #[arg(long)]
    plain: bool,
    /// The agents' upload interval in the flood, seconds (the agent's default; every wait is
    /// capped by it).
    #[arg(long, default_value_t = 60.0)]
    interval: f64,
    /// Seconds over which the devices come back (0: all in the same instant).
    #[arg(long, default_value_t = 1.0)]
    arrival: f64,
    /// The interval in the bench phase, seconds (short: the receiver, not the schedule, should
    /// set the pace).
    #[arg(long, default_value_t = 1.0)]
    bench_interval: f64,
    /// kill -9 the receiver once this fraction of the chunks is acknowledged (flood phase).
    #[arg(long)]
    kill9_at: Option<f64>,
    /// Seconds the receiver stays down after the kill.
    #[arg(long, default_value_t = 2.0)]
    down: f64,
    /// Phases to run: flood, bench.
    #[arg(long, value_delimiter = ',', default_value = "flood,bench")]
    phases: Vec<String>,
    /// The nginx binary for the bench baseline.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    /// Extra `serve` arguments for the receiver (repeatable; default settings otherwise).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Where stores and logs go (a fresh temporary directory under it).
    #[arg(long, default_value = "target/flood")]
    work_dir: PathBuf,
    /// Seed of the boot ids and the devices' randomness.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// In the flood, devices send one chunk a request rather than their backlog in batches
    /// as the agent does (up to 64 chunks and 256 KiB a request). The bench always sends one
    /// chunk a request: the same bodies as nginx.
    #[arg(long)]
    singles: bool,
    /// Give up a run after this many seconds.
    #[arg(long, default_value_t = 1800)]
    deadline: u64,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("flood: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: Args) -> anyhow::Result<bool> {
    raise_fd_limit();
    let secs = |s: f64| Duration::try_from_secs_f64(s).unwrap_or_default();
    let fcfg = FleetConfig {
        devices: a.devices,
        backlog: a.backlog,
        block_bytes: a.block_bytes,
        level: a.level,
        certs: !a.plain,
        seed: a.seed,
    };
    println!("load average at start: {}", load_average());
    let t = Instant::now();
    let fleet = Arc::new(Fleet::build_cached(&fcfg, Some(&a.work_dir.join("cache")))?);
    println!(
        "fleet: {} devices x {} chunks = {} chunks, {:.1} MB ({} KiB ring blocks of loghub \
         corpus lines, deflate level {}), {}; built in {:.1} s",
        a.devices,
        a.backlog,
        fleet.chunks(),
        fleet.bytes() as f64 / 1e6,
        a.block_bytes >> 10,
        a.level,
        if a.plain {
            "plain HTTP".to_owned()
        } else {
            format!(
                "mutual TLS, {} P-256 device certificates on the allowlist",
                a.devices
            )
        },
        t.elapsed().as_secs_f64()
    );
    std::fs::create_dir_all(&a.work_dir)?;
    let work = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&a.work_dir)?;
    let base = Scenario {
        tls: !a.plain,
        interval: secs(a.interval),
        arrival: secs(a.arrival),
        timeout: Duration::from_secs(30),
        deadline: Duration::from_secs(a.deadline),
        server_args: a.server_args.clone(),
        kill9_at: None,
        down_for: secs(a.down),
        progress: Some(Duration::from_secs(10)),
        seed: a.seed,
        batch: false,
    };
    let mut ok = true;
    if a.phases.iter().any(|p| p == "flood") {
        println!(
            "\n# flood: all devices back within {} s, agent interval {} s (waits capped by it), \
             {}, receiver with default settings{}",
            a.arrival,
            a.interval,
            if a.singles {
                "one chunk a request"
            } else {
                "backlogs in the agent's batches (up to 64 chunks and 256 KiB a request)"
            },
            a.kill9_at
                .map(|f| format!(", kill -9 at {:.0} % acknowledged", f * 100.0))
                .unwrap_or_default()
        );
        let sc = Scenario {
            kill9_at: a.kill9_at,
            batch: !a.singles,
            ..base.clone()
        };
        let r = scenario::run_blackbox(&fleet, &sc, &work.path().join("flood"))?;
        r.print();
        print_server_metrics(&r);
        ok &= r.exactly_once();
        let rss_mib = r.server.peak_rss as f64 / (1 << 20) as f64;
        println!(
            "   peak RSS {rss_mib:.1} MiB {} the 256 MiB target",
            if rss_mib <= 256.0 { "within" } else { "OVER" }
        );
        ok &= rss_mib <= 256.0;
    }
    if a.phases.iter().any(|p| p == "bench") {
        println!(
            "\n# bench: the same bodies (one chunk a request), devices retrying within {} s; the receiver (file:// \
             store, fsync) and nginx (PUT into files, no fsync) on this machine's {} CPUs",
            a.bench_interval,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let sc = Scenario {
            interval: secs(a.bench_interval),
            ..base
        };
        let ours = scenario::run_blackbox(&fleet, &sc, &work.path().join("bench-blackbox"))?;
        ours.print();
        let theirs = scenario::run_nginx(&fleet, &sc, &work.path().join("bench-nginx"), &a.nginx)?;
        theirs.print();
        ok &= ours.exactly_once() && theirs.exactly_once();
        println!(
            "\n   throughput: blackbox-server {:.1} MB/s ({:.0} chunks/s), nginx {:.1} MB/s \
             ({:.0} chunks/s): ratio {:.2}",
            ours.mb_per_s(),
            ours.chunks_per_s(),
            theirs.mb_per_s(),
            theirs.chunks_per_s(),
            ours.mb_per_s() / theirs.mb_per_s().max(1e-9)
        );
        println!(
            "   per server CPU second: blackbox-server {:.1} MB, nginx {:.1} MB: ratio {:.2} \
             (load average {})",
            ours.mb_per_cpu_s(),
            theirs.mb_per_cpu_s(),
            ours.mb_per_cpu_s() / theirs.mb_per_cpu_s().max(1e-9),
            load_average()
        );
    }
    println!(
        "\n{}",
        if ok {
            "flood: PASS"
        } else {
            "flood: FAIL (see above)"
        }
    );
    Ok(ok)
}

/// The machine's 1-minute load average: the figures above are wall-clock, on shared CPUs.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn print_server_metrics(r: &RunReport) {
    let shed: Vec<String> = ["inflight", "memory", "decoders", "draining", "connections"]
        .iter()
        .filter_map(|why| {
            let line = format!("blackbox_shed_total{{reason=\"{why}\"}} ");
            let v = r.metrics.lines().find_map(|l| l.strip_prefix(&line))?;
            Some(format!("{why} {v}"))
        })
        .collect();
    println!(
        "   receiver /metrics: shed by reason: {}; duplicates recognised: {}; segments: {}",
        shed.join(", "),
        r.metric("blackbox_chunks_duplicate_total").unwrap_or(0.0),
        r.metric("blackbox_segments_stored_total").unwrap_or(0.0),
    );
}

/// 10,000 devices need more than the usual 1,024 open files (the receiver raises its own).
fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    );
}
