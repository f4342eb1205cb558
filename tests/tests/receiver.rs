//! The receiver protecting itself, with a real process on loopback: the connection limit, idle
//! and slow clients, and a graceful SIGTERM.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use blackbox_tests::harness::{
    Server, free_port, http_text, read_store, seqs_by_device, wait_until,
};
use blackbox_tests::tlsclient::chunk;

fn head(device: &str, len: usize) -> String {
    format!(
        "POST /v1/chunks HTTP/1.1\r\nhost: localhost\r\nx-blackbox-device: {device}\r\n\
         content-type: application/gzip\r\ncontent-length: {len}\r\n\r\n"
    )
}

/// Reads one answer: status and body (`None` if the connection closed first).
fn answer(s: &mut TcpStream) -> Option<(u16, String)> {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let status = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut len = 0;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        if h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

fn upload(port: u16, device: &str, body: &[u8]) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(head(device, body.len()).as_bytes()).ok()?;
    s.write_all(body).ok()?;
    answer(&mut s)
}

/// Whether the server closes `s` within `within` (reads EOF or a reset).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0))
        || matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

/// Over --max-connections a new connection is closed at once; connections that send nothing
/// are closed after --header-timeout; then there is room again.
#[test]
fn over_the_connection_limit_new_connections_are_closed_and_idle_ones_time_out() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let mport = free_port();
    let server = Server::start(
        &store,
        vec![],
        &[
            "--max-connections",
            "3",
            "--header-timeout",
            "1",
            "--segment-max-age-ms",
            "100",
            "--metrics-listen",
            &format!("127.0.0.1:{mport}"),
        ],
        tmp.path(),
    );
    // The start-up probe's connection may still be counted for a moment.
    std::thread::sleep(Duration::from_millis(200));
    let mut idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", server.port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let t = Instant::now();
    assert!(
        closed_within(&mut extra, Duration::from_millis(800)),
        "the fourth connection was kept"
    );
    assert!(t.elapsed() < Duration::from_millis(800));
    for s in &mut idle {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "an idle connection outlived the header timeout"
        );
    }
    let c = chunk("dev-c", 0, 10);
    assert_eq!(upload(server.port, "dev-c", &c).map(|a| a.0), Some(201));
    let metrics = http_text(&format!("http://127.0.0.1:{mport}/metrics"));
    assert!(
        metrics.contains("blackbox_shed_total{reason=\"connections\"} 1\n"),
        "{metrics}"
    );
}

/// SIGTERM: uploads whose bodies are still arriving finish and are acknowledged after their
/// segment is written; a new request on an open connection is answered 503 (or the idle
/// connection is closed); new connections are refused; health says "draining"; the process
/// exits 0; and the store holds exactly the acknowledged chunks.
#[test]
fn sigterm_lets_inflight_uploads_finish_and_refuses_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let mport = free_port();
    let mut server = Server::start(
        &store,
        vec![],
        &[
            "--segment-max-age-ms",
            "300",
            "--metrics-listen",
            &format!("127.0.0.1:{mport}"),
        ],
        tmp.path(),
    );
    let health = || {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent()
            .get(format!("http://127.0.0.1:{mport}/healthz"))
            .call()
            .map(|r| r.status().as_u16())
            .ok()
    };
    assert_eq!(health(), Some(200));
    // A keep-alive connection that has done one upload.
    let mut kept = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let first = chunk("dev-t", 0, 10);
    kept.write_all(head("dev-t", first.len()).as_bytes())
        .unwrap();
    kept.write_all(&first).unwrap();
    assert_eq!(answer(&mut kept).map(|a| a.0), Some(201));
    // Three uploads half sent.
    let mut slow: Vec<(TcpStream, Vec<u8>)> = (1..4)
        .map(|i| {
            let body = chunk("dev-t", i * 10, 10);
            let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
            s.write_all(head("dev-t", body.len()).as_bytes()).unwrap();
            s.write_all(&body[..body.len() / 2]).unwrap();
            (s, body)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    server.sigterm();
    assert!(
        wait_until(Duration::from_secs(5), || health() == Some(503)),
        "health does not say draining"
    );
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect((
            "127.0.0.1",
            server.port
        ))
        .is_err()),
        "still accepting connections after SIGTERM"
    );
    let late = chunk("dev-t", 100, 10);
    let refused = kept
        .write_all(head("dev-t", late.len()).as_bytes())
        .and_then(|()| kept.write_all(&late))
        .ok()
        .and_then(|()| answer(&mut kept));
    assert!(
        matches!(refused, None | Some((503, _))),
        "a request after SIGTERM was answered {refused:?}"
    );
    for (s, body) in &mut slow {
        s.write_all(&body[body.len() / 2..]).unwrap();
        let a = answer(s);
        assert_eq!(a.as_ref().map(|a| a.0), Some(201), "{a:?}");
    }
    assert!(server.wait_exit(Duration::from_secs(15)), "did not exit");
    assert!(server.exit.unwrap().success(), "{:?}", server.exit);
    let log = server.log_text();
    assert!(log.contains("last segment written"), "{log}");

    let seqs = seqs_by_device(&read_store(&store, &[]))
        .remove("dev-t")
        .unwrap_or_default();
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..40).collect::<Vec<u64>>(),
        "exactly the acknowledged chunks, once"
    );
}
