//! Sending one sealed chunk and classifying the answer.
//!
//! Two ways to reach the server, chosen by the URL's scheme ([`Scheme::of`]):
//! - `https://` ([`Uploader::mutual_tls`]): mutual TLS. The agent presents its device
//!   certificate ([`super::identity`]); the server admits it if the certificate's fingerprint
//!   is on its allowlist and takes the device id from the certificate's subject CN. No header
//!   names the device. The server's certificate is checked against `--server-ca` or the
//!   built-in web PKI roots.
//! - `http://` ([`Uploader::plain_http`]): development only (the server accepts it only with
//!   `--insecure-http`, on loopback). The device names itself in the `x-blackbox-device`
//!   header.
//!
//! Every answer is classified once, in [`Uploader::send`]: stored, try again later, or the
//! chunk itself is refused.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blackbox_protocol::DeviceId;
use rustls::AlertDescription;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};

use super::identity::Identity;

/// The header that names the device in plain HTTP mode.
pub const DEVICE_HEADER: &str = "x-blackbox-device";

/// Largest response body read (the server's answers are a short JSON object; a batch's lists
/// its chunks, about 150 bytes each).
const BODY_LIMIT: u64 = 32 << 10;

/// What to tell an operator when the server refuses the device.
const ALLOWLIST_HINT: &str = "is this device on the server's allowlist? \
                              `blackbox-agent identity` prints the line to add";

/// What the server's answer means for the chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Durably stored (201) or recognised as already stored (200).
    Acked {
        /// How many of the request's chunks the server already had (for the log).
        duplicates: usize,
    },
    /// Not stored; try again later. Every network and TLS error, timeout, refusal, 5xx and 503
    /// lands here, as do 401/403 (a device not yet on the allowlist).
    Retry {
        /// The server's Retry-After, if it sent one.
        after: Option<Duration>,
        /// Why, for the log (with a hint when the device is refused).
        why: String,
    },
    /// The server says the chunk itself is invalid (400, 413, 422): no retry can help.
    Rejected {
        /// Status and body.
        why: String,
        /// 413 for the body's size: the server's `--max-body`, from the answer. For a batch
        /// that says nothing about its chunks: smaller requests pass.
        max_body: Option<usize>,
    },
}

/// How the server URL says to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `https://`: mutual TLS.
    Https,
    /// `http://`: plain HTTP, for development.
    Http,
}

impl Scheme {
    /// The scheme of a server URL; anything but `http://` and `https://` is an error.
    pub fn of(server: &str) -> Result<Self, SetupError> {
        let starts = |p: &str| {
            server
                .get(..p.len())
                .is_some_and(|h| h.eq_ignore_ascii_case(p))
        };
        if starts("https://") {
            Ok(Self::Https)
        } else if starts("http://") {
            Ok(Self::Http)
        } else {
            Err(SetupError::Scheme {
                server: server.to_owned(),
            })
        }
    }
}

/// Why an [`Uploader`] cannot be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The server URL is neither `https://` nor `http://`.
    #[error(
        "server {server:?}: the URL must start with https:// (mutual TLS) or http:// \
         (development only)"
    )]
    Scheme {
        /// The URL given.
        server: String,
    },
    /// The constructor does not fit the URL's scheme.
    #[error("server {server}: {why}")]
    WrongScheme {
        /// The URL given.
        server: String,
        /// What does not fit.
        why: &'static str,
    },
    /// The CA file for the server cannot be used.
    #[error("--server-ca {}: {why}", path.display())]
    ServerCa {
        /// The file.
        path: PathBuf,
        /// Why not.
        why: String,
    },
    /// The device's certificate and key are not accepted by the TLS stack.
    #[error("the device certificate in {} cannot be used: {why}", dir.display())]
    ClientCert {
        /// The identity directory.
        dir: PathBuf,
        /// Why not.
        why: String,
    },
}

/// Reads the CA certificates (PEM, one or more) that the server's certificate must chain to.
pub fn load_server_ca(path: &Path) -> Result<RootCerts, SetupError> {
    let err = |why: String| SetupError::ServerCa {
        path: path.to_owned(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            "holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let mut store = rustls::RootCertStore::empty();
    let (_, ignored) = store.add_parsable_certificates(certs.iter().cloned());
    if ignored > 0 {
        return Err(err(format!(
            "{ignored} of its {} certificate(s) cannot be parsed as X.509",
            certs.len()
        )));
    }
    Ok(RootCerts::new_with_certs(
        &certs
            .iter()
            .map(|c| Certificate::from_der(c).to_owned())
            .collect::<Vec<_>>(),
    ))
}

/// An HTTP client for one server.
#[derive(Debug)]
pub struct Uploader {
    agent: ureq::Agent,
    url: String,
    /// The device header (plain HTTP only: over TLS the certificate names the device).
    device_header: Option<String>,
    tls: bool,
}

impl Uploader {
    /// A client for an `https://` server: presents `identity`'s certificate and checks the
    /// server's against `roots` ([`load_server_ca`], or [`RootCerts::WebPki`]).
    pub fn mutual_tls(
        server: &str,
        identity: &Identity,
        roots: RootCerts,
        timeout: Duration,
    ) -> Result<Self, SetupError> {
        if Scheme::of(server)? != Scheme::Https {
            return Err(SetupError::WrongScheme {
                server: server.to_owned(),
                why: "mutual TLS needs an https:// URL",
            });
        }
        // Check the pair here: ureq would only find out (and panic) at the first connection.
        let key_der =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_pkcs8_der().to_vec()));
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(rustls::RootCertStore::empty()))
        .and_then(|b| {
            b.with_client_auth_cert(
                vec![CertificateDer::from(identity.cert_der.clone())],
                key_der,
            )
        })
        .map_err(|e| SetupError::ClientCert {
            dir: identity.dir.clone(),
            why: e.to_string(),
        })?;
        // (ureq does not export its key kinds: the PEM label says PKCS#8.)
        let key = PrivateKey::from_pem(identity.key_pem().as_bytes()).map_err(|e| {
            SetupError::ClientCert {
                dir: identity.dir.clone(),
                why: e.to_string(),
            }
        })?;
        let client = ClientCert::new_with_certs(
            &[Certificate::from_der(&identity.cert_der).to_owned()],
            key,
        );
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .client_cert(Some(client))
            .root_certs(roots)
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .https_only(true)
            .tls_config(tls)
            .build()
            .into();
        Ok(Self {
            agent,
            url: chunks_url(server),
            device_header: None,
            tls: true,
        })
    }

    /// A client for an `http://` server (development only), naming `device` in the
    /// `x-blackbox-device` header.
    pub fn plain_http(
        server: &str,
        device: &DeviceId,
        timeout: Duration,
    ) -> Result<Self, SetupError> {
        if Scheme::of(server)? != Scheme::Http {
            return Err(SetupError::WrongScheme {
                server: server.to_owned(),
                why: "the device header is only sent over http:// (https:// uses the certificate)",
            });
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            agent,
            url: chunks_url(server),
            device_header: Some(device.as_str().to_owned()),
            tls: false,
        })
    }

    /// Sends one chunk.
    pub fn send(&self, bytes: &[u8]) -> Answer {
        let mut req = self
            .agent
            .post(&self.url)
            .header("content-type", "application/gzip");
        if let Some(d) = &self.device_header {
            req = req.header(DEVICE_HEADER, d);
        }
        let mut resp = match req.send(bytes) {
            Ok(r) => r,
            Err(e) => {
                return Answer::Retry {
                    after: None,
                    why: explain(&e, self.tls),
                };
            }
        };
        let status = resp.status().as_u16();
        let after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = resp
            .body_mut()
            .with_config()
            .limit(BODY_LIMIT)
            .read_to_string()
            .unwrap_or_default();
        let body = body.trim();
        match status {
            // All of them already stored; or some new, and a batch's answer lists each.
            200 => Answer::Acked {
                duplicates: body.matches(r#""status":"duplicate""#).count().max(1),
            },
            201 => Answer::Acked {
                duplicates: body.matches(r#""status":"duplicate""#).count(),
            },
            400 | 413 | 422 => Answer::Rejected {
                why: format!("{status}: {body}"),
                max_body: (status == 413).then(|| max_body(body)).flatten(),
            },
            401 | 403 => Answer::Retry {
                after,
                why: format!("{status}: {body} ({ALLOWLIST_HINT})"),
            },
            _ => Answer::Retry {
                after,
                why: format!("{status}: {body}"),
            },
        }
    }
}

/// The `max_body` a 413 answer states (`{"error":"…","max_body":N}`), if it states one.
fn max_body(body: &str) -> Option<usize> {
    let rest = &body[body.find(r#""max_body":"#)? + r#""max_body":"#.len()..];
    let digits = rest.trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok().filter(|&n| n > 0)
}

fn chunks_url(server: &str) -> String {
    format!("{}/v1/chunks", server.trim_end_matches('/'))
}

/// The rustls error inside a ureq error, if there is one.
fn rustls_error(e: &ureq::Error) -> Option<&rustls::Error> {
    match e {
        ureq::Error::Rustls(r) => Some(r),
        ureq::Error::Io(io) => {
            let mut cur = io
                .get_ref()
                .map(|x| x as &(dyn std::error::Error + 'static));
            while let Some(c) = cur {
                if let Some(r) = c.downcast_ref::<rustls::Error>() {
                    return Some(r);
                }
                cur = c.source();
            }
            None
        }
        _ => None,
    }
}

/// A network or TLS error as a line for the log, with a hint where the cause is likely the
/// device's identity or the server's certificate.
fn explain(e: &ureq::Error, tls: bool) -> String {
    let hint = match rustls_error(e) {
        Some(rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateRequired
            | AlertDescription::NoCertificate,
        )) => Some(format!(
            "the server refused this device's certificate: {ALLOWLIST_HINT}"
        )),
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => {
            Some(
                "the server's certificate is not trusted: give the CA that signed it with \
                 --server-ca FILE"
                    .to_owned(),
            )
        }
        _ if tls
            && matches!(e, ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset) =>
        {
            Some(format!(
                "the server closed the TLS connection; {ALLOWLIST_HINT}"
            ))
        }
        _ => None,
    };
    match hint {
        Some(h) => format!("{e} ({h})"),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn io_wrapped(r: rustls::Error) -> ureq::Error {
        ureq::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, r))
    }

    #[test]
    fn the_body_limit_is_read_from_a_413_answer_when_it_states_one() {
        let answer = r#"{"error":"too large: body of 262144 bytes, limit 65536","max_body":65536}"#;
        assert_eq!(max_body(answer), Some(65536));
        assert_eq!(max_body(r#"{"max_body": 7}"#), Some(7));
        for no in [
            r#"{"error":"invalid chunk 2 of 3 in the request (none stored): limit exceeded"}"#,
            r#"{"max_body":0}"#,
            r#"{"max_body":"#,
            r#"{"max_body":-1}"#,
            r#"{"max_body":99999999999999999999999}"#,
            "",
        ] {
            assert_eq!(max_body(no), None, "{no}");
        }
    }

    #[test]
    fn schemes() {
        assert_eq!(
            Scheme::of("https://logs.example:8443").unwrap(),
            Scheme::Https
        );
        assert_eq!(Scheme::of("HTTP://127.0.0.1:8080").unwrap(), Scheme::Http);
        for bad in ["ftp://x", "127.0.0.1:8080", "", "https:/x"] {
            let e = Scheme::of(bad).unwrap_err().to_string();
            assert!(e.contains("https://"), "{e}");
        }
    }

    #[test]
    fn refused_certificate_gets_the_allowlist_hint() {
        for alert in [
            AlertDescription::CertificateRequired,
            AlertDescription::BadCertificate,
            AlertDescription::UnknownCA,
        ] {
            let why = explain(&io_wrapped(rustls::Error::AlertReceived(alert)), true);
            assert!(why.contains("allowlist"), "{why}");
            assert!(why.contains("blackbox-agent identity"), "{why}");
        }
        let why = explain(
            &io_wrapped(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
            true,
        );
        assert!(why.contains("--server-ca"), "{why}");
        let why = explain(
            &ureq::Error::Io(std::io::ErrorKind::ConnectionRefused.into()),
            true,
        );
        assert!(
            !why.contains("allowlist") && !why.contains("--server-ca"),
            "{why}"
        );
    }

    #[test]
    fn constructors_check_the_scheme() {
        let dev = DeviceId::new("d").unwrap();
        assert!(Uploader::plain_http("https://x", &dev, Duration::from_secs(1)).is_err());
        assert!(Uploader::plain_http("http://x/", &dev, Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn server_ca_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no pem here\n").unwrap();
        let e = load_server_ca(&empty).unwrap_err().to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no certificate"),
            "{e}"
        );
        let e = load_server_ca(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
        let cert = rcgen::generate_simple_self_signed(vec!["ca.example".into()]).unwrap();
        let ok = dir.path().join("ca.pem");
        std::fs::write(&ok, cert.cert.pem()).unwrap();
        assert!(matches!(load_server_ca(&ok).unwrap(), RootCerts::Specific(c) if c.len() == 1));
    }
}
