//! Mutual TLS: the server's certificate, the devices' certificates, and the accept loop.
//!
//! Devices present self-signed certificates; there is no CA. The handshake
//! ([`DeviceCertVerifier`]) requires a client certificate, refuses one that does not parse or is
//! outside its validity period, and checks that the client holds the certificate's private key
//! (the TLS CertificateVerify signature). Whether the certificate may *write* is decided per
//! request against the allowlist (see `receive::authenticate`), so that a revoked device is
//! refused on its next request even on a connection it already holds, and so that an unknown
//! device, having proved it owns its key, can be recorded as pending and told why it is refused.
//!
//! [`handshake`] is what the accept loop ([`crate::accept`]) does first on this port: a
//! first-byte check (a client speaking plain HTTP to this port gets a readable 400 instead of a
//! TLS alert it cannot print), then the handshake; the loop then serves HTTP/1.1 with the
//! peer's [`PeerCert`] attached to every request.
//!
//! [`init`] makes a small private CA and a server certificate signed by it
//! (`blackbox-server tls init`); agents trust that CA with `--server-ca`.
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use blackbox_protocol::Fingerprint;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::AsyncWriteExt;

/// The verified client certificate of a connection, attached to each of its requests.
#[derive(Debug, Clone)]
pub struct PeerCert {
    /// SHA-256 of the certificate's DER.
    pub fingerprint: Fingerprint,
    /// The subject's common name, if it has one (the device id it claims).
    pub common_name: Option<String>,
    /// Where the connection comes from.
    pub addr: SocketAddr,
}

/// SHA-256 of DER bytes.
pub fn fingerprint(der: &[u8]) -> Fingerprint {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Fingerprint(out)
}

/// The first common name of a certificate's subject.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// The crypto provider of both ends: ring.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Requires a client certificate that parses, is within its validity period, and whose key
/// signed the handshake. Which certificates may write is the allowlist's business.
#[derive(Debug)]
pub struct DeviceCertVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl DeviceCertVerifier {
    /// A verifier using the provider's signature algorithms.
    pub fn new(provider: &rustls::crypto::CryptoProvider) -> Self {
        Self {
            algs: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for DeviceCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let validity = cert.validity();
        if now > validity.not_after.timestamp() {
            tracing::debug!(fp = %fingerprint(end_entity.as_ref()), "client certificate expired");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
        }
        if now < validity.not_before.timestamp() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The server's TLS configuration from PEM files: a certificate chain and its key.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing the PEM certificates in {}", cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no PEM certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the PEM private key in {}", key.display()))?;
    let provider = provider();
    let verifier = Arc::new(DeviceCertVerifier::new(&provider));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("the server certificate and key do not fit together")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Stateless session tickets: a device that reconnects (after a 503, or its next upload)
    // resumes without the signature and certificate checks of a full handshake, and the
    // server keeps no per-device session state. The ticket carries the client certificate, and
    // every request is still checked against the allowlist.
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().context("TLS session tickets")?;
    Ok(Arc::new(cfg))
}

/// The verified client certificate of a finished handshake, or `None` if it has none (the
/// verifier requires one, so only a misconfigured `ServerConfig` gets here without).
pub fn peer_cert(
    tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    addr: SocketAddr,
) -> Option<PeerCert> {
    let der = tls.get_ref().1.peer_certificates()?.first()?;
    Some(PeerCert {
        fingerprint: fingerprint(der.as_ref()),
        common_name: common_name(der.as_ref()),
        addr,
    })
}

/// Whether a handshake failed because of the client's certificate (worth the operator's
/// attention; scanners and dropped connections are not).
pub fn is_certificate_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)))
}

/// What a plain-HTTP client gets on the TLS port.
const PLAIN_HTTP_REFUSAL: &str = "This port speaks HTTPS and requires a device certificate; plain HTTP was sent. Use https://.\n";

/// The TLS handshake, after checking the first byte: a TLS record starts with 0x16
/// (handshake); a letter means a plain HTTP request, which gets a readable 400. `Ok(None)`:
/// no TLS client (closed, or answered with that 400).
pub async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
) -> std::io::Result<Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Ok(None);
    }
    if first[0] != 0x16 {
        if first[0].is_ascii_uppercase() {
            refuse_plain_http(tcp).await;
        }
        return Ok(None);
    }
    acceptor.accept(tcp).await.map(Some)
}

/// Answers a plain HTTP request with a 400 the client can print. The request head is read
/// first and the rest drained after answering (a bounded lingering close, as web servers do):
/// closing with unread bytes would reset the connection and lose the answer.
async fn refuse_plain_http(mut tcp: tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    const LIMIT: usize = 64 << 10;
    let mut buf = vec![0u8; 8192];
    let mut seen = Vec::new();
    let head = async {
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < LIMIT {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), head).await;
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{PLAIN_HTTP_REFUSAL}",
        PLAIN_HTTP_REFUSAL.len()
    );
    if tcp.write_all(answer.as_bytes()).await.is_err() || tcp.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut total = 0usize;
        while total < (1 << 20) {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

impl fmt::Display for PeerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.common_name {
            Some(cn) => write!(f, "{} (CN {cn:?}) from {}", self.fingerprint, self.addr),
            None => write!(f, "{} (no CN) from {}", self.fingerprint, self.addr),
        }
    }
}

/// Files written by [`init`].
#[derive(Debug)]
pub struct InitFiles {
    /// The CA certificate: give it to agents as `--server-ca`.
    pub ca_cert: PathBuf,
    /// The CA key: keep it offline; only needed to issue another server certificate.
    pub ca_key: PathBuf,
    /// The server certificate (`--tls-cert`).
    pub server_cert: PathBuf,
    /// The server key (`--tls-key`).
    pub server_key: PathBuf,
}

/// Makes a private CA and a server certificate for `names` (DNS names or IP addresses) in
/// `dir`. Keys are written with mode 0600. Refuses to overwrite existing files unless `force`.
pub fn init(dir: &Path, names: &[String], force: bool) -> anyhow::Result<InitFiles> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, date_time_ymd,
    };
    if names.is_empty() {
        bail!("give at least one name or address the agents will connect to");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = InitFiles {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    };
    for p in [
        &files.ca_cert,
        &files.ca_key,
        &files.server_cert,
        &files.server_key,
    ] {
        if p.exists() && !force {
            bail!(
                "{} exists; not overwriting it (--force replaces the CA and server certificate, \
                 and every agent then needs the new ca.pem)",
                p.display()
            );
        }
    }
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let ca_key = KeyPair::generate_for(alg)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "blackbox server CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = date_time_ymd(2000, 1, 1);
    ca.not_after = date_time_ymd(2100, 1, 1);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::from_params(&ca, &ca_key);

    for n in names {
        if n.parse::<IpAddr>().is_err()
            && !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            bail!("{n:?} is neither an IP address nor a DNS name");
        }
    }
    let server_key = KeyPair::generate_for(alg)?;
    let mut sp = CertificateParams::new(names.to_vec())?;
    sp.distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    sp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sp.not_before = date_time_ymd(2000, 1, 1);
    sp.not_after = date_time_ymd(2100, 1, 1);
    let server_cert = sp.signed_by(&server_key, &issuer)?;

    write_file(&files.ca_key, ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&files.ca_cert, ca_cert.pem().as_bytes(), 0o644)?;
    write_file(
        &files.server_key,
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(&files.server_cert, server_cert.pem().as_bytes(), 0o644)?;
    Ok(files)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
