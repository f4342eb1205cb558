//! Helpers for the downstream tests (narrative, grep, grind, compact): chunks with chosen
//! clocks, uploads to a development-mode server, and `blackbox-server` subcommands as processes.
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use blackbox_protocol::{BootId, Chunk, DeviceId, Limits, Origin, Record, SyncPoint};

use blackbox_server::segment::{Accepted, IndexEntry};

use crate::harness::bin;

/// One record to put in a chunk: (sequence number, monotonic µs, message).
pub type Rec = (u64, u64, String);

/// An encoded chunk of `device` in boot `boot` with sync point `sync`.
pub fn encode(device: &str, boot: u8, sync: SyncPoint, recs: &[Rec]) -> Vec<u8> {
    let records = recs
        .iter()
        .map(|(seq, mono, msg)| Record {
            seq: *seq,
            mono_us: *mono,
            level: 6,
            facility: 0,
            origin: Origin::Kmsg,
            msg: msg.clone().into_bytes(),
        })
        .collect();
    Chunk::new(
        DeviceId::new(device).unwrap(),
        BootId([boot; 16]),
        sync,
        records,
    )
    .unwrap()
    .encode(6, &Limits::DEFAULT)
    .unwrap()
}

/// The boot id text of [`encode`]'s `boot` byte.
pub fn boot_text(boot: u8) -> String {
    BootId([boot; 16]).to_string()
}

/// POSTs a chunk to a development-mode server as `device`; the HTTP status.
pub fn post(url: &str, device: &str, body: &[u8]) -> Result<u16, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into();
    agent
        .post(format!("{url}/v1/chunks"))
        .header("x-blackbox-device", device)
        .send(body)
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

/// Runs `blackbox-server ARGS…` with `env` and waits for it.
pub fn server_cmd(args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(bin("blackbox-server"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .output()
        .expect("running blackbox-server")
}

/// Like [`server_cmd`], asserting success; returns stdout.
pub fn server_ok(args: &[&str], env: &[(String, String)]) -> String {
    let out = server_cmd(args, env);
    assert!(
        out.status.success(),
        "blackbox-server {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `zcat FILES… | grep -E PATTERN` (with `-c` when `count`), as a shell pipeline of the real
/// tools.
pub fn zcat_grep(files: &[impl AsRef<Path>], pattern: &str, extra: &[&str]) -> String {
    let mut zcat = Command::new("zcat")
        .args(files.iter().map(|f| f.as_ref()))
        .stdout(Stdio::piped())
        .spawn()
        .expect("zcat");
    let out = Command::new("grep")
        .arg("-E")
        .args(extra)
        .arg("--")
        .arg(pattern)
        .stdin(zcat.stdout.take().unwrap())
        .output()
        .expect("grep");
    assert!(zcat.wait().unwrap().success());
    String::from_utf8(out.stdout).unwrap()
}

/// The segment files of a local store directory, in key order.
pub fn local_segments(dir: &Path) -> Vec<std::path::PathBuf> {
    files_under(&dir.join("raw"), ".seg.gz")
}

/// The files under `dir` (at any depth) whose names end with `suffix`, sorted.
pub fn files_under(dir: &Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The lines of one file of the loghub corpus in `shared/corpus/loghub/` beside the workspace
/// (Loghub, <https://github.com/logpai/loghub>; Zhu et al., ISSRE 2023), invalid UTF-8
/// replaced.
pub fn corpus_lines(file: &str) -> Vec<String> {
    let path = crate::harness::root()
        .join("../shared/corpus/loghub")
        .join(file);
    let bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("corpus file {}: {e}", path.display()));
    String::from_utf8_lossy(&bytes)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `lines` as chunk bodies of `per_chunk` records: record `i` has sequence number `i` and
/// monotonic time `i` ms.
pub fn line_chunks(
    device: &str,
    boot: u8,
    sync: SyncPoint,
    lines: &[String],
    per_chunk: usize,
) -> Vec<Vec<u8>> {
    lines
        .chunks(per_chunk)
        .enumerate()
        .map(|(c, part)| {
            let first = (c * per_chunk) as u64;
            let recs: Vec<Rec> = part
                .iter()
                .enumerate()
                .map(|(i, l)| (first + i as u64, (first + i as u64) * 1000, l.clone()))
                .collect();
            encode(device, boot, sync, &recs)
        })
        .collect()
}

/// Writes a raw segment of `chunks` and its index under `key` (`raw/YYYY-MM-DD/HH/….seg.gz`),
/// as a receiver would have at that ingest hour.
pub fn put_segment(store_url: &str, env: &[(String, String)], key: &str, chunks: &[Vec<u8>]) {
    let mut seg = Vec::new();
    let mut idx = Vec::new();
    for c in chunks {
        let full = Chunk::decode(c, &Limits::DEFAULT).unwrap();
        let entry = IndexEntry::of(&Accepted::of(&full), seg.len() as u64, c.len() as u64);
        serde_json::to_writer(&mut idx, &entry).unwrap();
        idx.push(b'\n');
        seg.extend_from_slice(c);
    }
    let store = blackbox_server::Store::open_with(store_url, env).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        store.put(key, seg).await.unwrap();
        let idx_key = format!("{}.idx", key.strip_suffix(".seg.gz").unwrap());
        store.put(&idx_key, idx).await.unwrap();
    });
}

/// Every event under `prefix` in the store at `store` (gzip NDJSON objects), sorted.
pub fn events(store: &str, prefix: &str) -> Vec<blackbox_server::grind::Event> {
    use std::io::Read as _;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let st = blackbox_server::Store::open(store).unwrap();
        let mut out = Vec::new();
        for k in st.list(prefix).await.unwrap() {
            let bytes = st.get(&k).await.unwrap();
            let mut text = String::new();
            flate2::read::MultiGzDecoder::new(&bytes[..])
                .read_to_string(&mut text)
                .unwrap();
            out.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<blackbox_server::grind::Event>(l).unwrap()),
            );
        }
        out.sort();
        out
    })
}

/// `blackbox-server grind` arguments: `store`, `rules`, events under `<prefix>events/`, the
/// checkpoint `<prefix>checkpoint.json`, then `extra`.
pub fn grind_args(store: &str, rules: &str, prefix: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["grind", "--store", store, "--rules", rules]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend([
        "--events-prefix".into(),
        format!("{prefix}events/"),
        "--checkpoint".into(),
        format!("{prefix}checkpoint.json"),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}
