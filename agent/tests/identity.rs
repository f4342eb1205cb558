//! The device identity on real files: what is made, what a second start finds, how interrupted
//! or tampered state is completed, and the certificate in a real mutual-TLS upload.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use blackbox_agent::linux::identity::{self, Identity, IdentityError, Obtained};
use blackbox_agent::linux::upload::{self, Answer, Uploader};
use blackbox_protocol::{DeviceId, Fingerprint};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

fn dev(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn idir(state: &Path) -> std::path::PathBuf {
    state.join("identity")
}

#[test]
fn creates_private_files_in_order() {
    let state = tempfile::tempdir().unwrap();
    let (id, how) = Identity::load_or_create(state.path(), Some(&dev("gw-7"))).unwrap();
    assert_eq!(how, Obtained::Created);
    assert!(how.is_new());
    let d = idir(state.path());
    assert_eq!(id.dir, d);
    assert_eq!(mode(&d), 0o700);
    for f in [
        identity::DEVICE_FILE,
        identity::KEY_FILE,
        identity::CERT_FILE,
    ] {
        assert_eq!(mode(&d.join(f)), 0o600, "{f}");
    }
    // Nothing else: no temporary files left behind.
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 3);
    assert_eq!(
        std::fs::read_to_string(d.join(identity::DEVICE_FILE)).unwrap(),
        "gw-7\n"
    );
    let key = std::fs::read_to_string(d.join(identity::KEY_FILE)).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
    assert_eq!(key, id.key_pem());
    assert_eq!(
        std::fs::read_to_string(d.join(identity::CERT_FILE)).unwrap(),
        id.cert_pem
    );
    assert_eq!(id.device, dev("gw-7"));
    assert_eq!(id.allowlist_line(), format!("{}  gw-7", id.fingerprint));
    // The key is never in the debug form.
    assert!(!format!("{id:?}").contains("PRIVATE"));
}

#[test]
fn second_load_finds_the_same_identity() {
    let state = tempfile::tempdir().unwrap();
    let (a, _) = Identity::load_or_create(state.path(), None).unwrap();
    let (b, how) = Identity::load_or_create(state.path(), None).unwrap();
    assert_eq!(how, Obtained::Loaded);
    assert!(!how.is_new());
    assert_eq!(a.fingerprint, b.fingerprint);
    assert_eq!(a.cert_der, b.cert_der);
    assert_eq!(a.key_pkcs8_der(), b.key_pkcs8_der());
    // Without --device-id a new identity is named after the host.
    assert_eq!(a.device, blackbox_agent::linux::default_device_id());
    // Asking for the id it has is fine.
    let (c, _) = Identity::load_or_create(state.path(), Some(&a.device)).unwrap();
    assert_eq!(c.fingerprint, a.fingerprint);
}

#[test]
fn fingerprint_is_sha256_of_the_der_and_round_trips() {
    let state = tempfile::tempdir().unwrap();
    let (id, _) = Identity::load_or_create(state.path(), Some(&dev("fp-1"))).unwrap();
    let from_file = std::fs::read(idir(state.path()).join(identity::CERT_FILE)).unwrap();
    let der = CertificateDer::from_pem_slice(&from_file).unwrap();
    assert_eq!(der.as_ref(), &id.cert_der[..]);
    let digest = ring::digest::digest(&ring::digest::SHA256, &id.cert_der);
    assert_eq!(&id.fingerprint.0[..], digest.as_ref());
    let text = id.fingerprint.to_string();
    assert!(
        text.starts_with("sha256:") && text.len() == 7 + 64,
        "{text}"
    );
    assert!(
        text[7..]
            .bytes()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    );
    assert_eq!(Fingerprint::from_str(&text).unwrap(), id.fingerprint);
}

#[test]
fn certificate_says_what_the_server_needs() {
    let state = tempfile::tempdir().unwrap();
    let (id, _) = Identity::load_or_create(state.path(), Some(&dev("cert-check_1:a"))).unwrap();
    let (rest, cert) = x509_parser::parse_x509_certificate(&id.cert_der).unwrap();
    assert!(rest.is_empty());
    let cn = |n: &x509_parser::x509::X509Name<'_>| {
        n.iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(cn(cert.subject()).as_deref(), Some("cert-check_1:a"));
    assert_eq!(cert.subject(), cert.issuer());
    // Self-signed: the signature checks with its own key.
    cert.verify_signature(None).unwrap();
    // 2000-01-01T00:00:00Z .. 9999-12-31T23:59:59Z, whatever the clock says.
    assert_eq!(cert.validity().not_before.timestamp(), 946_684_800);
    assert_eq!(cert.validity().not_after.timestamp(), 253_402_300_799);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.client_auth);
    assert!(!eku.value.server_auth);
    assert!(!cert.is_ca());
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    let serial = cert.raw_serial();
    assert!(serial.len() >= 8 && serial[0] & 0x80 == 0, "{serial:02x?}");
    // The key is the certificate's, and rustls can sign with it.
    let key = rcgen::KeyPair::from_pem(id.key_pem()).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_pkcs8_der().to_vec()));
    rustls::crypto::ring::sign::any_supported_type(&der).unwrap();
    // Two identities never share a serial number or a fingerprint.
    let other = tempfile::tempdir().unwrap();
    let (id2, _) = Identity::load_or_create(other.path(), Some(&dev("cert-check_1:a"))).unwrap();
    let (_, cert2) = x509_parser::parse_x509_certificate(&id2.cert_der).unwrap();
    assert_ne!(cert2.raw_serial(), serial);
    assert_ne!(id2.fingerprint, id.fingerprint);
}

#[test]
fn key_without_certificate_gets_a_new_certificate_for_the_same_key() {
    let state = tempfile::tempdir().unwrap();
    let (a, _) = Identity::load_or_create(state.path(), Some(&dev("crashy"))).unwrap();
    let d = idir(state.path());
    let key_before = std::fs::read(d.join(identity::KEY_FILE)).unwrap();
    std::fs::remove_file(d.join(identity::CERT_FILE)).unwrap();
    let (b, how) = Identity::load_or_create(state.path(), None).unwrap();
    assert_eq!(how, Obtained::NewCertificate);
    assert!(how.is_new());
    assert_eq!(
        std::fs::read(d.join(identity::KEY_FILE)).unwrap(),
        key_before
    );
    assert_eq!(b.key_pkcs8_der(), a.key_pkcs8_der());
    assert_eq!(b.device, dev("crashy"));
    assert_ne!(b.fingerprint, a.fingerprint);
    let (_, cert) = x509_parser::parse_x509_certificate(&b.cert_der).unwrap();
    let key = rcgen::KeyPair::from_pem(b.key_pem()).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    assert_eq!(mode(&d.join(identity::CERT_FILE)), 0o600);
    // A damaged certificate is replaced the same way.
    std::fs::write(
        d.join(identity::CERT_FILE),
        "-----BEGIN CERTIFICATE-----\nAAAA\n",
    )
    .unwrap();
    let (c, how) = Identity::load_or_create(state.path(), None).unwrap();
    assert_eq!(how, Obtained::NewCertificate);
    assert_eq!(c.key_pkcs8_der(), a.key_pkcs8_der());
    // As is a certificate made for another key (a crash after a new key, before its cert).
    let other = tempfile::tempdir().unwrap();
    let (o, _) = Identity::load_or_create(other.path(), Some(&dev("crashy"))).unwrap();
    std::fs::write(d.join(identity::CERT_FILE), &o.cert_pem).unwrap();
    let (e, how) = Identity::load_or_create(state.path(), None).unwrap();
    assert_eq!(how, Obtained::NewCertificate);
    assert_eq!(e.key_pkcs8_der(), a.key_pkcs8_der());
    assert_ne!(e.fingerprint, o.fingerprint);
}

#[test]
fn certificate_without_key_is_replaced_by_a_new_identity() {
    let state = tempfile::tempdir().unwrap();
    let (a, _) = Identity::load_or_create(state.path(), Some(&dev("lostkey"))).unwrap();
    std::fs::remove_file(idir(state.path()).join(identity::KEY_FILE)).unwrap();
    let (b, how) = Identity::load_or_create(state.path(), None).unwrap();
    assert_eq!(how, Obtained::Created);
    assert_eq!(b.device, dev("lostkey"));
    assert_ne!(b.key_pkcs8_der(), a.key_pkcs8_der());
    assert_ne!(b.fingerprint, a.fingerprint);
}

#[test]
fn only_the_device_id_written_is_completed() {
    let state = tempfile::tempdir().unwrap();
    let d = idir(state.path());
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(identity::DEVICE_FILE), "early-crash\n").unwrap();
    let (id, how) = Identity::load_or_create(state.path(), None).unwrap();
    assert_eq!(how, Obtained::Created);
    assert_eq!(id.device, dev("early-crash"));
}

#[test]
fn missing_device_id_file_is_recovered_from_the_certificate() {
    let state = tempfile::tempdir().unwrap();
    let (a, _) = Identity::load_or_create(state.path(), Some(&dev("named-by-cn"))).unwrap();
    let f = idir(state.path()).join(identity::DEVICE_FILE);
    std::fs::remove_file(&f).unwrap();
    let (b, how) = Identity::load_or_create(state.path(), None).unwrap();
    assert_eq!(how, Obtained::Loaded);
    assert_eq!(b.device, dev("named-by-cn"));
    assert_eq!(b.fingerprint, a.fingerprint);
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "named-by-cn\n");
    // A device id file that disagrees with the certificate is an error, not a guess.
    std::fs::write(&f, "someone-else\n").unwrap();
    let e = Identity::load_or_create(state.path(), None).unwrap_err();
    assert!(matches!(e, IdentityError::Inconsistent { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("named-by-cn") && msg.contains("someone-else"),
        "{msg}"
    );
    std::fs::write(&f, "not a valid id!\n").unwrap();
    let msg = Identity::load_or_create(state.path(), None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&f.display().to_string()), "{msg}");
}

#[test]
fn another_device_id_is_an_error_naming_both() {
    let state = tempfile::tempdir().unwrap();
    let (a, _) = Identity::load_or_create(state.path(), Some(&dev("sensor-a"))).unwrap();
    let e = Identity::load_or_create(state.path(), Some(&dev("sensor-b"))).unwrap_err();
    assert!(matches!(e, IdentityError::DeviceMismatch { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("sensor-a") && msg.contains("sensor-b"),
        "{msg}"
    );
    assert!(
        msg.contains(&idir(state.path()).display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("allowlist"), "{msg}");
    // Nothing was touched.
    let (b, how) = Identity::load_or_create(state.path(), None).unwrap();
    assert_eq!(how, Obtained::Loaded);
    assert_eq!(b.fingerprint, a.fingerprint);
}

#[test]
fn loose_modes_are_narrowed() {
    let state = tempfile::tempdir().unwrap();
    let (a, _) = Identity::load_or_create(state.path(), Some(&dev("loose"))).unwrap();
    let d = idir(state.path());
    let set = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    set(&d.join(identity::KEY_FILE), 0o640).unwrap();
    set(&d.join(identity::CERT_FILE), 0o644).unwrap();
    set(&d, 0o755).unwrap();
    let (b, how) = Identity::load_or_create(state.path(), None).unwrap();
    assert_eq!(how, Obtained::Loaded);
    assert_eq!(b.fingerprint, a.fingerprint);
    assert_eq!(mode(&d.join(identity::KEY_FILE)), 0o600);
    assert_eq!(mode(&d.join(identity::CERT_FILE)), 0o600);
    assert_eq!(mode(&d), 0o700);
}

#[test]
fn stale_temporary_files_are_removed() {
    let state = tempfile::tempdir().unwrap();
    Identity::load_or_create(state.path(), Some(&dev("tmp"))).unwrap();
    let d = idir(state.path());
    std::fs::write(d.join(".key.pem.tmp-12345"), "half a key").unwrap();
    Identity::load_or_create(state.path(), None).unwrap();
    assert!(!d.join(".key.pem.tmp-12345").exists());
}

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blackbox-agent"))
}

#[test]
fn identity_command_prints_the_allowlist_line() {
    let state = tempfile::tempdir().unwrap();
    let run = || {
        let out = agent()
            .args(["identity", "--device-id", "bin-test.1", "--state-dir"])
            .arg(state.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (first, err1) = run();
    let (second, err2) = run();
    assert_eq!(first, second);
    assert_eq!(first.lines().count(), 1, "{first:?}");
    let line = first.strip_suffix('\n').unwrap();
    let (fp, id) = line.split_once("  ").unwrap();
    assert_eq!(id, "bin-test.1");
    assert!(fp.starts_with("sha256:") && fp.len() == 7 + 64, "{fp}");
    assert!(
        fp[7..]
            .bytes()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    );
    let (loaded, _) = Identity::load_or_create(state.path(), None).unwrap();
    assert_eq!(fp, loaded.fingerprint.to_string());
    let dir = idir(state.path()).display().to_string();
    assert!(err1.contains("created") && err1.contains(&dir), "{err1}");
    assert!(
        err2.contains("already existed") && err2.contains(&dir),
        "{err2}"
    );
    // Another id for the same state directory is refused, with both ids named.
    let out = agent()
        .args(["identity", "--device-id", "other", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bin-test.1") && err.contains("other"), "{err}");
}

#[test]
fn run_refuses_unknown_schemes_and_a_ca_for_plain_http() {
    let state = tempfile::tempdir().unwrap();
    let out = agent()
        .args([
            "run",
            "--server",
            "ftp://127.0.0.1:1",
            "--kmsg",
            "/nonexistent",
        ])
        .arg("--state-dir")
        .arg(state.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("https://") && err.contains("ftp://"), "{err}");
    // Nothing was made for a URL that cannot be used.
    assert!(!idir(state.path()).exists());
    let out = agent()
        .args([
            "run",
            "--server",
            "http://127.0.0.1:1",
            "--server-ca",
            "/x.pem",
        ])
        .args(["--kmsg", "/nonexistent", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--server-ca"), "{err}");
}

// --- Mutual TLS over loopback ----------------------------------------------------------

/// A CA and a server certificate for 127.0.0.1 signed by it.
struct ServerPki {
    ca_pem: String,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn server_pki() -> ServerPki {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test server CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    ServerPki {
        ca_pem: ca_cert.pem(),
        cert: leaf.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

/// What the test server saw of one request.
#[derive(Debug)]
struct Seen {
    peer: Option<Fingerprint>,
    head: String,
    body_len: usize,
}

/// Serves one connection: requires a client certificate that `trusted` (a self-signed device
/// certificate) vouches for, and answers `status` with `body`.
fn serve_once(
    pki: &ServerPki,
    trusted: &[u8],
    status: &'static str,
    body: &'static str,
) -> (SocketAddr, JoinHandle<Result<Seen, String>>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(trusted.to_vec())).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![pki.cert.clone()], pki.key.clone_key())
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn = rustls::ServerConnection::new(config).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        let (head, body_len) = loop {
            match tls.read(&mut tmp) {
                Ok(0) => return Err("eof before the request".into()),
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                Err(e) => {
                    // The alert is sent; let the client read it before the socket closes.
                    let _ = std::io::copy(&mut tls.sock, &mut std::io::sink());
                    return Err(e.to_string());
                }
            }
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + len {
                    break (head, len);
                }
            }
        };
        let peer = tls
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| identity::fingerprint(c));
        let resp = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(resp.as_bytes()).map_err(|e| e.to_string())?;
        tls.conn.send_close_notify();
        let _ = tls.flush();
        Ok(Seen {
            peer,
            head,
            body_len,
        })
    });
    (addr, handle)
}

fn tls_setup() -> (ServerPki, tempfile::TempDir, std::path::PathBuf, Identity) {
    let pki = server_pki();
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("server-ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let (id, _) =
        Identity::load_or_create(&tmp.path().join("state"), Some(&dev("tls-dev"))).unwrap();
    (pki, tmp, ca, id)
}

/// A mutual-TLS uploader for the test server at `addr`, trusting the CA in `ca`.
fn uploader(addr: impl std::fmt::Display, id: &Identity, ca: &std::path::Path) -> Uploader {
    Uploader::mutual_tls(
        &format!("https://{addr}"),
        id,
        upload::load_server_ca(ca).unwrap(),
        Duration::from_secs(10),
    )
    .unwrap()
}

#[test]
fn mutual_tls_upload_presents_the_device_certificate() {
    let (pki, _tmp, ca, id) = tls_setup();
    let (addr, server) = serve_once(&pki, &id.cert_der, "201 Created", "{}");
    let up = uploader(format!("{addr}/"), &id, &ca); // a trailing slash in --server is fine
    let answer = up.send(b"chunk bytes");
    let seen = server.join().unwrap().unwrap();
    assert_eq!(answer, Answer::Acked { duplicates: 0 });
    assert_eq!(seen.peer, Some(id.fingerprint));
    assert!(seen.head.starts_with("post /v1/chunks "), "{}", seen.head);
    assert_eq!(seen.body_len, b"chunk bytes".len());
    // Over TLS the certificate names the device, never a header.
    assert!(!seen.head.contains(upload::DEVICE_HEADER), "{}", seen.head);
}

#[test]
fn device_not_on_the_allowlist_is_retried_with_a_hint() {
    let (pki, tmp, ca, id) = tls_setup();
    // The server knows another device only: the handshake fails.
    let (stranger, _) =
        Identity::load_or_create(&tmp.path().join("stranger"), Some(&dev("stranger"))).unwrap();
    let (addr, server) = serve_once(&pki, &stranger.cert_der, "201 Created", "{}");
    let up = uploader(addr, &id, &ca);
    let answer = up.send(b"x");
    assert!(server.join().unwrap().is_err());
    match answer {
        Answer::Retry { why, .. } => {
            assert!(why.contains("allowlist"), "{why}");
            assert!(why.contains("blackbox-agent identity"), "{why}");
        }
        other => panic!("{other:?}"),
    }

    // The handshake passes but the server refuses the device: its error body is kept.
    let (addr, server) = serve_once(
        &pki,
        &id.cert_der,
        "403 Forbidden",
        r#"{"error":"device sha256:00 is not on the allowlist"}"#,
    );
    let up = uploader(addr, &id, &ca);
    let answer = up.send(b"x");
    server.join().unwrap().unwrap();
    match answer {
        Answer::Retry { why, .. } => {
            assert!(why.starts_with("403"), "{why}");
            assert!(why.contains("is not on the allowlist"), "{why}");
            assert!(why.contains("blackbox-agent identity"), "{why}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn untrusted_server_certificate_is_retried_with_a_ca_hint() {
    let (pki, _tmp, _ca, id) = tls_setup();
    let (addr, server) = serve_once(&pki, &id.cert_der, "201 Created", "{}");
    // The web PKI roots do not know the test CA.
    let up = Uploader::mutual_tls(
        &format!("https://{addr}"),
        &id,
        ureq::tls::RootCerts::WebPki,
        Duration::from_secs(10),
    )
    .unwrap();
    let answer = up.send(b"x");
    let _ = server.join().unwrap();
    match answer {
        Answer::Retry { why, .. } => assert!(why.contains("--server-ca"), "{why}"),
        other => panic!("{other:?}"),
    }
}
