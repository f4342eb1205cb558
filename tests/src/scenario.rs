//! Runs of the flood against real server processes, and their figures: the receiver
//! (`blackbox-server serve`, optionally killed with `kill -9` and restarted mid-flood) and the
//! nginx baseline, each checked for every chunk stored exactly once.
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use crate::flood::{self, ClientConfig, Fleet, StoreCheck, Tally, Target};
use crate::harness::{Server, free_port};
use crate::nginx::{Nginx, NginxTls};
use crate::procstat::{self, Usage};

/// How a run goes.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Mutual TLS (device certificates on the allowlist) rather than plain HTTP.
    pub tls: bool,
    /// The agent's upload interval (the cap of every wait).
    pub interval: Duration,
    /// Window in which the devices come back.
    pub arrival: Duration,
    /// The agent's request timeout.
    pub timeout: Duration,
    /// Give up after this long.
    pub deadline: Duration,
    /// Extra `serve` arguments (default settings when empty).
    pub server_args: Vec<String>,
    /// `kill -9` the receiver once this fraction of the chunks is acknowledged, then restart it.
    pub kill9_at: Option<f64>,
    /// How long the receiver stays down after the kill.
    pub down_for: Duration,
    /// Print a progress line every this often.
    pub progress: Option<Duration>,
    /// Seed of the devices' randomness.
    pub seed: u64,
    /// Devices send their backlog in batches, as the agent does (the receiver only: nginx
    /// takes one chunk a request).
    pub batch: bool,
}

/// The figures of one run.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// What ran.
    pub name: String,
    /// Chunks the fleet holds.
    pub chunks: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Chunks acknowledged.
    pub acked: usize,
    /// Chunks acknowledged twice (must be 0).
    pub acked_twice: usize,
    /// From the start to the last acknowledgement.
    pub elapsed: Duration,
    /// Requests sent.
    pub requests: u64,
    /// 201 answers.
    pub created: u64,
    /// 200 answers (already stored).
    pub duplicate: u64,
    /// 503 answers.
    pub shed: u64,
    /// Other answers.
    pub other: u64,
    /// Connections that failed before a request went out (refused, closed, handshake).
    pub connect_failed: u64,
    /// Requests without an answer.
    pub no_answer: u64,
    /// Connections opened.
    pub connections: u64,
    /// The server's peak RSS (the largest of its incarnations) and CPU (all of them).
    pub server: Usage,
    /// The load generator's CPU.
    pub client_cpu: f64,
    /// The store compared with what was sent.
    pub check: StoreCheck,
    /// Chunks acknowledged before the `kill -9`, and how many of those the store lacks.
    pub kill9: Option<(usize, usize)>,
    /// The receiver's `/metrics` at the end.
    pub metrics: String,
}

impl RunReport {
    /// Megabytes (10^6) of chunks acknowledged per second.
    pub fn mb_per_s(&self) -> f64 {
        let acked_bytes = self.bytes as f64 * self.acked as f64 / self.chunks.max(1) as f64;
        acked_bytes / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Chunks acknowledged per second.
    pub fn chunks_per_s(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Megabytes of chunks acknowledged per second of server CPU time: throughput that does
    /// not depend on what else the machine is doing.
    pub fn mb_per_cpu_s(&self) -> f64 {
        let acked_bytes = self.bytes as f64 * self.acked as f64 / self.chunks.max(1) as f64;
        acked_bytes / 1e6 / self.server.cpu_secs.max(1e-9)
    }

    /// Share of requests answered 503.
    pub fn shed_share(&self) -> f64 {
        self.shed as f64 / self.requests.max(1) as f64
    }

    /// Everything acknowledged once, and stored exactly once.
    pub fn exactly_once(&self) -> bool {
        self.acked == self.chunks
            && self.acked_twice == 0
            && self.check.exact()
            && self.kill9.is_none_or(|(_, lost)| lost == 0)
    }

    /// A sample of the receiver's `/metrics`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics
            .lines()
            .find(|l| l.split([' ', '{']).next() == Some(name) && !l.contains('{'))
            .or_else(|| self.metrics.lines().find(|l| l.starts_with(name)))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// The report, for a person.
    pub fn print(&self) {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!("== {}", self.name);
        println!(
            "   {} of {} chunks acknowledged in {:.1} s: {:.1} MB/s, {:.0} chunks/s",
            self.acked,
            self.chunks,
            self.elapsed.as_secs_f64(),
            self.mb_per_s(),
            self.chunks_per_s()
        );
        println!(
            "   requests {}: 201 {}, 200 {}, 503 {} ({:.1} %), other {}; no answer {}; \
             connections {} opened, {} failed",
            self.requests,
            self.created,
            self.duplicate,
            self.shed,
            100.0 * self.shed_share(),
            self.other,
            self.no_answer,
            self.connections,
            self.connect_failed
        );
        println!(
            "   server peak RSS {:.1} MiB, CPU {:.1} s ({:.2} ms per chunk, {:.1} MB per CPU \
             second); load generator CPU {:.1} s",
            mib(self.server.peak_rss),
            self.server.cpu_secs,
            1e3 * self.server.cpu_secs / self.acked.max(1) as f64,
            self.mb_per_cpu_s(),
            self.client_cpu
        );
        if let Some((before, lost)) = self.kill9 {
            println!(
                "   kill -9 after {before} acknowledgements; of those, missing after restart: {lost}"
            );
        }
        let c = &self.check;
        println!(
            "   store: {} exactly once, {} missing, {} extra copies, {} damaged -> {}",
            c.once,
            c.missing,
            c.extra_copies,
            c.damaged,
            if self.exactly_once() {
                "every chunk stored exactly once"
            } else {
                "NOT EXACTLY ONCE"
            }
        );
    }
}

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn report_of(name: String, fleet: &Fleet, tally: &Tally, elapsed: Duration) -> RunReport {
    RunReport {
        name,
        chunks: fleet.chunks(),
        bytes: fleet.bytes(),
        acked: tally.acked.load(Relaxed),
        acked_twice: tally.acked_twice(),
        elapsed,
        requests: tally.requests.load(Relaxed),
        created: tally.created.load(Relaxed),
        duplicate: tally.duplicate.load(Relaxed),
        shed: tally.shed.load(Relaxed),
        other: tally.other.load(Relaxed),
        connect_failed: tally.connect_failed.load(Relaxed),
        no_answer: tally.no_answer.load(Relaxed),
        connections: tally.connections.load(Relaxed),
        ..RunReport::default()
    }
}

/// Prints progress and keeps the largest server reading while the devices run.
async fn watch(
    tally: Arc<Tally>,
    total: usize,
    every: Option<Duration>,
    usage: impl Fn() -> Option<Usage>,
    peak: Arc<Mutex<Usage>>,
) {
    let start = tokio::time::Instant::now();
    let mut last_print = start;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let u = usage();
        if let (Some(u), Ok(mut p)) = (u, peak.lock()) {
            p.peak_rss = p.peak_rss.max(u.peak_rss);
        }
        if let Some(every) = every
            && last_print.elapsed() >= every
        {
            last_print = tokio::time::Instant::now();
            println!(
                "   {:>5.0} s: {} of {total} chunks acknowledged, {} devices done, {} answers 503, \
                 {} connections failed; server RSS {:.0} MiB",
                start.elapsed().as_secs_f64(),
                tally.acked.load(Relaxed),
                tally.done.load(Relaxed),
                tally.shed.load(Relaxed),
                tally.connect_failed.load(Relaxed),
                u.map_or(0.0, |u| u.rss as f64 / (1 << 20) as f64)
            );
        }
    }
}

/// Chunks by (device index, chunk index).
type AckedChunks = Vec<(usize, usize)>;

/// The flood against `blackbox-server serve` on a `file://` store in `work`.
pub fn run_blackbox(fleet: &Arc<Fleet>, sc: &Scenario, work: &Path) -> anyhow::Result<RunReport> {
    let store_dir = work.join("store");
    let store = format!("file://{}", store_dir.display());
    let metrics_port = free_port();
    let mut args: Vec<String> = vec![
        "--metrics-listen".into(),
        format!("127.0.0.1:{metrics_port}"),
    ];
    args.extend(sc.server_args.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = if sc.tls {
        Server::start_tls_allowing(&store, &args, work, &fleet.allowlist())
    } else {
        Server::start(&store, vec![], &args, work)
    };
    let ca = server.tls.as_ref().map(|t| t.ca.clone());
    let addr = ([127, 0, 0, 1], server.port).into();
    let log = server.log.clone();
    let server = Arc::new(Mutex::new(server));
    let tally = Arc::new(Tally::new(fleet));
    let peak = Arc::new(Mutex::new(Usage::default()));
    let cpu_before_kill = Arc::new(Mutex::new(0.0f64));
    let killed_at: Arc<Mutex<Option<AckedChunks>>> = Arc::default();
    let client_cpu0 = procstat::self_cpu_secs();
    let rt = client_runtime()?;
    let cfg = ClientConfig {
        addr,
        target: Target::Blackbox,
        ca,
        interval: sc.interval,
        arrival: sc.arrival,
        timeout: sc.timeout,
        deadline: sc.deadline,
        batch: sc.batch,
    };
    let server_usage = {
        let server = server.clone();
        // try_lock: while the kill task restarts the server, skip a reading rather than block
        // one of the load generator's threads.
        move || server.try_lock().ok()?.pid().and_then(procstat::usage)
    };
    let elapsed = rt.block_on(async {
        let w = tokio::spawn(watch(
            tally.clone(),
            fleet.chunks(),
            sc.progress,
            server_usage.clone(),
            peak.clone(),
        ));
        let k = sc.kill9_at.map(|at| {
            let (tally, server, fleet, killed_at, peak, cpu) = (
                tally.clone(),
                server.clone(),
                fleet.clone(),
                killed_at.clone(),
                peak.clone(),
                cpu_before_kill.clone(),
            );
            let down = sc.down_for;
            let threshold = ((fleet.chunks() as f64 * at) as usize).max(1);
            tokio::spawn(async move {
                while tally.acked.load(Relaxed) < threshold {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = tokio::task::spawn_blocking(move || {
                    let Ok(mut s) = server.lock() else { return };
                    if let Some(u) = s.pid().and_then(procstat::usage) {
                        if let Ok(mut p) = peak.lock() {
                            p.peak_rss = p.peak_rss.max(u.peak_rss);
                        }
                        if let Ok(mut c) = cpu.lock() {
                            *c = u.cpu_secs;
                        }
                    }
                    s.kill9();
                    if let Ok(mut k) = killed_at.lock() {
                        *k = Some(tally.acked_set(&fleet));
                    }
                    drop(s);
                    std::thread::sleep(down);
                    if let Ok(mut s) = server.lock() {
                        s.restart();
                    }
                })
                .await;
            })
        });
        let elapsed = flood::drive(fleet.clone(), cfg, tally.clone(), sc.seed).await;
        w.abort();
        if let Some(k) = k {
            k.abort();
        }
        elapsed
    });
    let client_cpu = procstat::self_cpu_secs() - client_cpu0;
    let mut report = report_of(
        format!(
            "blackbox-server ({}{})",
            if sc.tls { "mutual TLS" } else { "plain HTTP" },
            if sc.kill9_at.is_some() {
                ", kill -9 mid-flood"
            } else {
                ""
            }
        ),
        fleet,
        &tally,
        elapsed,
    );
    report.client_cpu = client_cpu;
    report.metrics = ureq::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .unwrap_or_default();
    let mut s = server
        .lock()
        .map_err(|_| anyhow::anyhow!("server handle poisoned"))?;
    let last = s.pid().and_then(procstat::usage).unwrap_or_default();
    let mut p = peak.lock().map(|p| *p).unwrap_or_default();
    p.peak_rss = p.peak_rss.max(last.peak_rss);
    p.cpu_secs = last.cpu_secs + cpu_before_kill.lock().map(|c| *c).unwrap_or(0.0);
    report.server = p;
    s.sigterm();
    anyhow::ensure!(
        s.wait_exit(Duration::from_secs(60)),
        "the receiver did not stop within 60 s of SIGTERM; log: {}",
        log.display()
    );
    report.check = flood::check_segments(fleet, &store_dir)?;
    if let Some(before) = killed_at.lock().ok().and_then(|k| k.clone()) {
        let lost = lost_of(fleet, &before, &store_dir)?;
        report.kill9 = Some((before.len(), lost));
    }
    Ok(report)
}

/// How many of `acked` (device, chunk) the store lacks.
fn lost_of(fleet: &Fleet, acked: &[(usize, usize)], store_dir: &Path) -> anyhow::Result<usize> {
    let (counts, _) = flood::count_in_segments(fleet, store_dir)?;
    Ok(acked.iter().filter(|k| !counts.contains_key(k)).count())
}

/// The same fleet, the same client, against nginx PUT into files (WebDAV module).
pub fn run_nginx(
    fleet: &Arc<Fleet>,
    sc: &Scenario,
    work: &Path,
    nginx_bin: &Path,
) -> anyhow::Result<RunReport> {
    let tls = sc
        .tls
        .then(|| crate::harness::TlsFiles::init(&work.join("tls")));
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let nginx = Nginx::start(
        nginx_bin,
        &work.join("nginx"),
        workers,
        tls.as_ref().map(|t| NginxTls {
            cert: &t.cert,
            key: &t.key,
        }),
    )
    .context("starting nginx")?;
    let tally = Arc::new(Tally::new(fleet));
    let peak = Arc::new(Mutex::new(Usage::default()));
    let client_cpu0 = procstat::self_cpu_secs();
    let rt = client_runtime()?;
    let cfg = ClientConfig {
        addr: ([127, 0, 0, 1], nginx.port).into(),
        target: Target::Nginx,
        ca: tls.as_ref().map(|t| t.ca.clone()),
        interval: sc.interval,
        arrival: sc.arrival,
        timeout: sc.timeout,
        deadline: sc.deadline,
        batch: false,
    };
    let nginx = Arc::new(nginx);
    let elapsed = rt.block_on(async {
        let n = nginx.clone();
        let w = tokio::spawn(watch(
            tally.clone(),
            fleet.chunks(),
            sc.progress,
            move || Some(n.usage()),
            peak.clone(),
        ));
        let e = flood::drive(fleet.clone(), cfg, tally.clone(), sc.seed).await;
        w.abort();
        e
    });
    let client_cpu = procstat::self_cpu_secs() - client_cpu0;
    let mut report = report_of(
        format!(
            "nginx {} PUT into files ({})",
            nginx_version(nginx_bin),
            if sc.tls {
                "TLS, client certificate requested"
            } else {
                "plain HTTP"
            }
        ),
        fleet,
        &tally,
        elapsed,
    );
    report.client_cpu = client_cpu;
    let u = nginx.usage();
    let p = peak.lock().map(|p| *p).unwrap_or_default();
    report.server = Usage {
        peak_rss: p.peak_rss.max(u.peak_rss),
        ..u
    };
    report.check = flood::check_files(fleet, |dev, id| {
        nginx.path_of(dev, id.first_seq, id.last_seq)
    });
    drop(rt);
    Ok(report)
}

fn nginx_version(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .rsplit('/')
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_default()
}
