//! A device for the identity tests: any certificate (good, expired, garbage, someone else's) and
//! any key, real TLS handshakes with rustls, and a minimal HTTP/1.1 client that can keep its
//! connection open across requests.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blackbox_protocol::{BootId, Chunk, DeviceId, Fingerprint, Limits, Origin, Record, SyncPoint};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, date_time_ymd};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::CertifiedKey;

/// A certificate and the key the client will sign the handshake with (they need not match).
pub struct DeviceCert {
    pub cert: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl DeviceCert {
    /// A self-signed certificate with subject CN `cn` (if any), valid from `from` to `until`
    /// (years).
    pub fn with_validity(cn: Option<&str>, from: i32, until: i32) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        } else {
            p.distinguished_name
                .push(DnType::OrganizationName, "no common name");
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = date_time_ymd(from, 1, 1);
        p.not_after = date_time_ymd(until, 1, 1);
        let cert = p.self_signed(&key).unwrap();
        Self {
            cert: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    /// A valid certificate for device `cn`.
    pub fn new(cn: &str) -> Self {
        Self::with_validity(Some(cn), 2000, 9999)
    }

    /// The certificate as the agent's files hold it (`--state-dir`'s `identity/`).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Self {
        Self {
            cert: CertificateDer::pem_file_iter(cert)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap(),
            key: PrivateKeyDer::from_pem_file(key).unwrap(),
        }
    }

    pub fn fingerprint(&self) -> Fingerprint {
        blackbox_server::tls::fingerprint(self.cert[0].as_ref())
    }

    /// This certificate, but the handshake signed with another key.
    pub fn with_key_of(&self, other: &DeviceCert) -> Self {
        Self {
            cert: self.cert.clone(),
            key: other.key.clone_key(),
        }
    }

    /// Random bytes where the certificate should be.
    pub fn garbage() -> Self {
        let good = Self::new("garbage");
        let bytes: Vec<u8> = (0..300u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        Self {
            cert: vec![CertificateDer::from(bytes)],
            key: good.key,
        }
    }
}

/// Presents a fixed certificate and key, without checking that they belong together (rustls's
/// own helpers refuse a mismatched pair; a thief would not).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A client configuration trusting `ca_pem`, presenting `dev` (or nothing).
pub fn client_config(ca_pem: &Path, dev: Option<&DeviceCert>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match dev {
        Some(d) => {
            let key = provider
                .key_provider
                .load_private_key(d.key.clone_key())
                .unwrap();
            b.with_client_cert_resolver(Arc::new(Fixed(Arc::new(CertifiedKey::new(
                d.cert.clone(),
                key,
            )))))
        }
        None => b.with_no_client_auth(),
    };
    Arc::new(cfg)
}

/// One HTTPS connection; requests on it reuse it (keep-alive).
pub struct Conn {
    stream: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Conn {
    /// Connects to 127.0.0.1:`port` and completes the handshake.
    pub fn open(port: u16, cfg: Arc<rustls::ClientConfig>) -> Result<Self, String> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let name = ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
        }
        Ok(Self {
            stream: BufReader::new(s),
        })
    }

    /// POSTs `body` to `path` with extra headers; reads the whole answer.
    pub fn post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Answer, String> {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/gzip\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let w = self.stream.get_mut();
        let sent = w
            .write_all(req.as_bytes())
            .and_then(|()| w.write_all(body))
            .and_then(|()| w.flush());
        if let Err(e) = sent {
            // In TLS 1.3 a refused client certificate shows only after the client's handshake
            // ends: the server's alert is waiting to be read.
            let s = self.stream.get_mut();
            while let Ok(n) = s.conn.read_tls(&mut s.sock) {
                if let Err(alert) = s.conn.process_new_packets() {
                    return Err(format!("{alert} (writing: {e})"));
                }
                if n == 0 {
                    break;
                }
            }
            return Err(e.to_string());
        }
        let mut status_line = String::new();
        let n = self
            .stream
            .read_line(&mut status_line)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed without an answer".into());
        }
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.stream.read_line(&mut h).map_err(|e| e.to_string())?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut b = vec![0u8; len];
        self.stream.read_exact(&mut b).map_err(|e| e.to_string())?;
        Ok(Answer {
            status,
            body: String::from_utf8_lossy(&b).into_owned(),
        })
    }
}

/// One request on a new connection.
pub fn post_once(
    port: u16,
    ca: &Path,
    dev: Option<&DeviceCert>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Answer, String> {
    Conn::open(port, client_config(ca, dev))?.post("/v1/chunks", headers, body)
}

/// An encoded chunk of `n` records from `device` starting at `first`.
pub fn chunk(device: &str, first: u64, n: u64) -> Vec<u8> {
    let records = (first..first + n)
        .map(|seq| Record {
            seq,
            mono_us: 1_000_000 + seq,
            level: 6,
            facility: 1,
            origin: Origin::Kmsg,
            msg: format!("{device} line {seq}").into_bytes(),
        })
        .collect();
    let sync = SyncPoint {
        mono_us: 1_000_000,
        wall_us: 1_795_269_785_000_000,
        synced: true,
    };
    Chunk::new(
        DeviceId::new(device).unwrap(),
        BootId([9; 16]),
        sync,
        records,
    )
    .unwrap()
    .encode(6, &Limits::DEFAULT)
    .unwrap()
}
