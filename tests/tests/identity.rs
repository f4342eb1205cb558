//! Device identity and mutual TLS, through real handshakes on loopback against the real
//! `blackbox-server` process: who may write, under which device id, and what every kind of bad
//! certificate gets.
#![allow(missing_docs, clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use blackbox_tests::harness::{Agent, KmsgFile, Server, bin, read_store, wait_until};
use blackbox_tests::tlsclient::{Conn, DeviceCert, chunk, client_config, post_once};

fn store_of(tmp: &tempfile::TempDir) -> String {
    format!("file://{}", tmp.path().join("store").display())
}

fn server(tmp: &tempfile::TempDir) -> Server {
    Server::start_tls(&store_of(tmp), &["--segment-max-age-ms", "50"], tmp.path())
}

/// Devices (by stored device id) and their record count.
fn stored(tmp: &tempfile::TempDir) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for l in read_store(&store_of(tmp), &[]) {
        *m.entry(l.device).or_insert(0) += 1;
    }
    m
}

fn allow(s: &Server, dev: &DeviceCert, name: Option<&str>) {
    let fp = dev.fingerprint().to_string();
    let mut args = vec!["allow", fp.as_str()];
    if let Some(n) = name {
        args.extend(["--name", n]);
    }
    s.tls().devices(&args);
}

#[test]
fn allowed_device_is_stored_under_its_certificate_id_whatever_it_claims() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp);
    let ca = &s.tls().ca;
    let b = DeviceCert::new("dev-b");
    allow(&s, &b, None);
    // The development header naming another device is ignored: the certificate decides.
    let a = post_once(
        s.port,
        ca,
        Some(&b),
        &[("x-blackbox-device", "dev-a")],
        &chunk("dev-b", 0, 5),
    )
    .unwrap();
    assert_eq!(a.status, 201, "{}", a.body);
    // A chunk claiming to be another device is refused, whatever the header says.
    let a = post_once(
        s.port,
        ca,
        Some(&b),
        &[("x-blackbox-device", "dev-a")],
        &chunk("dev-a", 0, 5),
    )
    .unwrap();
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(
        a.body.contains("dev-a") && a.body.contains("dev-b"),
        "{}",
        a.body
    );
    assert_eq!(stored(&tmp), [("dev-b".to_string(), 5)].into());
}

#[test]
fn unknown_device_is_refused_and_listed_as_pending_then_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp);
    let ca = &s.tls().ca;
    let d = DeviceCert::new("dev-new");
    let fp = d.fingerprint().to_string();
    let a = post_once(s.port, ca, Some(&d), &[], &chunk("dev-new", 0, 3)).unwrap();
    assert_eq!(a.status, 403);
    assert!(
        a.body.contains("not on the allowlist") && a.body.contains(&fp),
        "{}",
        a.body
    );
    // The record of seen devices is written within a second.
    let mut pending = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            pending = s.tls().devices(&["pending"]);
            pending.contains(&fp)
        }),
        "pending: {pending}"
    );
    assert!(
        pending
            .lines()
            .any(|l| l.starts_with(&fp) && l.contains("dev-new")),
        "{pending}"
    );
    // Allow it: the name comes from what it presented.
    s.tls().devices(&["allow", &fp]);
    let text = std::fs::read_to_string(&s.tls().allowlist).unwrap();
    assert!(text.contains(&format!("{fp}  dev-new")), "{text}");
    let a = post_once(s.port, ca, Some(&d), &[], &chunk("dev-new", 0, 3)).unwrap();
    assert_eq!(a.status, 201, "{}", a.body);
    assert!(!s.tls().devices(&["pending"]).contains(&fp));
    assert!(s.tls().devices(&["list"]).contains(&fp));
    assert_eq!(stored(&tmp), [("dev-new".to_string(), 3)].into());
}

#[test]
fn revocation_refuses_the_next_connection_and_open_ones_within_a_second() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp);
    let ca = &s.tls().ca;
    let d = DeviceCert::new("dev-r");
    allow(&s, &d, Some("dev-r"));
    let mut open = Conn::open(s.port, client_config(ca, Some(&d))).unwrap();
    let a = open.post("/v1/chunks", &[], &chunk("dev-r", 0, 2)).unwrap();
    assert_eq!(a.status, 201, "{}", a.body);

    s.tls().devices(&["revoke", &d.fingerprint().to_string()]);
    let revoked = Instant::now();
    // A new connection is refused at once: the server checks the file on every connection.
    let a = post_once(s.port, ca, Some(&d), &[], &chunk("dev-r", 2, 2)).unwrap();
    assert_eq!(a.status, 403, "{}", a.body);
    // The connection it already had is refused within a second (the file is polled).
    let mut refused_after = None;
    let mut seq = 4;
    while revoked.elapsed() < Duration::from_secs(3) {
        let a = open
            .post("/v1/chunks", &[], &chunk("dev-r", seq, 1))
            .unwrap();
        seq += 1;
        if a.status == 403 {
            refused_after = Some(revoked.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = refused_after.expect("the open connection was never refused");
    assert!(
        after <= Duration::from_secs(1),
        "refused only after {after:?}"
    );
    let text = std::fs::read_to_string(&s.tls().allowlist).unwrap();
    assert!(text.contains("# revoked"), "{text}");
}

#[test]
fn a_device_cannot_take_another_device_id() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp);
    let ca = &s.tls().ca;
    // Allowlisted under a name: a certificate whose CN says otherwise is refused.
    let named = DeviceCert::new("dev-x");
    allow(&s, &named, Some("dev-y"));
    let a = post_once(s.port, ca, Some(&named), &[], &chunk("dev-x", 0, 1)).unwrap();
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("allowlisted as device dev-y"), "{}", a.body);

    // Two certificates on unnamed lines with the same CN: the first to write keeps the id.
    let first = DeviceCert::new("dev-z");
    let second = DeviceCert::new("dev-z");
    allow(&s, &first, None);
    allow(&s, &second, None);
    let a = post_once(s.port, ca, Some(&first), &[], &chunk("dev-z", 0, 2)).unwrap();
    assert_eq!(a.status, 201, "{}", a.body);
    let a = post_once(s.port, ca, Some(&second), &[], &chunk("dev-z", 2, 2)).unwrap();
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("already written by"), "{}", a.body);

    // An unnamed line cannot take a name another line holds.
    let y = DeviceCert::new("dev-y");
    allow(&s, &y, None);
    let a = post_once(s.port, ca, Some(&y), &[], &chunk("dev-y", 0, 1)).unwrap();
    assert_eq!(a.status, 403, "{}", a.body);

    // No CN, no device id.
    let anon = DeviceCert::with_validity(None, 2000, 9999);
    allow(&s, &anon, None);
    let a = post_once(s.port, ca, Some(&anon), &[], &chunk("dev-q", 0, 1)).unwrap();
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("no subject CN"), "{}", a.body);

    assert_eq!(stored(&tmp), [("dev-z".to_string(), 2)].into());
}

/// Expect the handshake or the first request to fail with a TLS alert naming `alert`.
fn refused_by_tls(r: Result<blackbox_tests::tlsclient::Answer, String>, alert: &str) {
    match r {
        Err(e) => assert!(e.contains(alert), "expected {alert}, got error {e}"),
        Ok(a) => panic!(
            "expected a TLS refusal ({alert}), got HTTP {}: {}",
            a.status, a.body
        ),
    }
}

#[test]
fn garbage_expired_wrong_key_and_missing_certificates_are_refused_in_the_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp);
    let ca = &s.tls().ca;
    let body = chunk("dev-e", 0, 1);

    let expired = DeviceCert::with_validity(Some("dev-e"), 2000, 2001);
    allow(&s, &expired, None);
    refused_by_tls(
        post_once(s.port, ca, Some(&expired), &[], &body),
        "CertificateExpired",
    );

    let future = DeviceCert::with_validity(Some("dev-e"), 2090, 2100);
    allow(&s, &future, None);
    // TLS has one alert for both ends of the validity period (RFC 8446: "expired or not
    // currently valid").
    refused_by_tls(
        post_once(s.port, ca, Some(&future), &[], &body),
        "CertificateExpired",
    );

    // A thief with the allowlisted certificate but not its key.
    let owner = DeviceCert::new("dev-e");
    allow(&s, &owner, None);
    let thief = owner.with_key_of(&DeviceCert::new("thief"));
    refused_by_tls(
        post_once(s.port, ca, Some(&thief), &[], &body),
        "DecryptError",
    );

    refused_by_tls(
        post_once(s.port, ca, Some(&DeviceCert::garbage()), &[], &body),
        "BadCertificate",
    );
    refused_by_tls(
        post_once(s.port, ca, None, &[], &body),
        "CertificateRequired",
    );

    // The owner still gets in; none of the refused ones is stored or listed as pending (none
    // proved it holds its key).
    let a = post_once(s.port, ca, Some(&owner), &[], &body).unwrap();
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(stored(&tmp), [("dev-e".to_string(), 1)].into());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(s.tls().devices(&["pending"]).trim().is_empty());
}

#[test]
fn plain_http_to_the_tls_port_gets_a_readable_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .post(&format!("http://127.0.0.1:{}/v1/chunks", s.port))
        .header("x-blackbox-device", "dev-p")
        .send(&chunk("dev-p", 0, 1)[..])
        .unwrap();
    assert_eq!(r.status(), 400);
    let body = r.body_mut().read_to_string().unwrap();
    assert!(body.contains("speaks HTTPS"), "{body}");
    assert!(stored(&tmp).is_empty());
}

#[test]
fn serve_refuses_plain_http_off_loopback_and_missing_tls_files() {
    let run = |args: &[&str]| {
        Command::new(bin("blackbox-server"))
            .arg("serve")
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[
        "--insecure-http",
        "--listen",
        "0.0.0.0:0",
        "--store",
        "memory://",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    let out = run(&["--store", "memory://"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert"));
}

/// The README's flow with the real agent: identity, refused while unknown, allowed, logs arrive.
#[test]
fn agent_flow_identity_pending_allow_logs_arrive() {
    let tmp = tempfile::tempdir().unwrap();
    let s = server(&tmp);
    let state = tmp.path().join("agent");
    let out = Command::new(bin("blackbox-agent"))
        .args(["identity", "--device-id", "router-1", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let (fp, device) = line.trim().split_once("  ").unwrap();
    assert_eq!(device, "router-1");
    let files = DeviceCert::from_pem_files(
        &state.join("identity/cert.pem"),
        &state.join("identity/key.pem"),
    );
    assert_eq!(files.fingerprint().to_string(), fp);

    let mut kmsg = KmsgFile::new(tmp.path().join("kmsg"));
    kmsg.append(20, "app");
    let ca = s.tls().ca.display().to_string();
    let agent = Agent::start(
        &s.url(),
        &state,
        &kmsg.path,
        "router-1",
        &["--interval", "0.3", "--jitter", "0", "--server-ca", &ca],
    );
    // Unknown: refused, pending, the agent says why.
    assert!(wait_until(Duration::from_secs(20), || s
        .tls()
        .devices(&["pending"])
        .contains(fp)));
    assert!(
        wait_until(Duration::from_secs(10), || agent
            .log_text()
            .contains("allowlist")),
        "{}",
        agent.log_text()
    );
    assert!(stored(&tmp).is_empty());
    // Allowed: everything arrives, under the certificate's id.
    s.tls().devices(&["allow", fp]);
    assert!(
        wait_until(Duration::from_secs(20), || stored(&tmp).get("router-1")
            == Some(&20)),
        "{:?}\n{}",
        stored(&tmp),
        agent.log_text()
    );
}
