//! The device's identity: a private key and a self-signed certificate that names the device.
//!
//! The agent makes them itself on first start; nothing secret ever leaves the device. The
//! operator adds the certificate's fingerprint (`blackbox-agent identity` prints the line) to the
//! server's allowlist, and from then on the server knows the device by the certificate it
//! presents in the TLS handshake: the fingerprint says *whether* it may upload, the subject's
//! common name (CN) says *which* device it is.
//!
//! # Files
//!
//! `STATE_DIR/identity/` (mode 0700) holds, each mode 0600:
//! - `device-id`: the device id, one line.
//! - `key.pem`: the ECDSA P-256 private key, PKCS#8 PEM.
//! - `cert.pem`: the certificate: self-signed, subject `CN=<device id>`, valid from 2000-01-01
//!   to 9999-12-31T23:59:59Z (RFC 5280's "no well-defined expiration": a device that boots
//!   with its clock at 1970 must still be able to use it), key usage digitalSignature, extended
//!   key usage clientAuth, a random serial number, `CA:FALSE`.
//!
//! # Guarantees
//!
//! - Every file is written whole or not at all (temporary file in the same directory, fsync,
//!   rename, fsync of the directory), in the order device id, key, certificate, so a crash
//!   leaves a prefix of that sequence. Loading completes it: a key without a certificate gets
//!   a certificate (same key); a certificate without its key is useless and is replaced,
//!   with a note on stderr, since its fingerprint has to be allowlisted anew.
//! - Files and the directory readable by group or others are narrowed to 0600/0700 (with a
//!   warning). Two processes (the service and an operator's `blackbox-agent identity`) never
//!   create at the same time: the directory is locked while it is read and written.
//! - An identity made for one device id is never silently reused for another: asking for
//!   another id is an error that says how to start over.
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use blackbox_protocol::{DeviceId, Fingerprint};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// The directory under the state directory that holds the identity.
pub const DIR: &str = "identity";
/// The device id file (the id and a newline).
pub const DEVICE_FILE: &str = "device-id";
/// The private key file (PKCS#8 PEM).
pub const KEY_FILE: &str = "key.pem";
/// The certificate file (PEM).
pub const CERT_FILE: &str = "cert.pem";

/// A device's key and certificate, loaded or made by [`Identity::load_or_create`].
#[derive(Clone)]
pub struct Identity {
    /// The device the certificate names (its subject CN).
    pub device: DeviceId,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The certificate, PEM (as in `cert.pem`).
    pub cert_pem: String,
    /// SHA-256 of [`Identity::cert_der`]: what the server's allowlist holds.
    pub fingerprint: Fingerprint,
    /// The directory the files are in (`STATE_DIR/identity`).
    pub dir: PathBuf,
    /// The private key, PKCS#8 DER.
    key_pkcs8: Vec<u8>,
    /// The private key, PKCS#8 PEM (as in `key.pem`).
    key_pem: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("Identity")
            .field("device", &self.device)
            .field("fingerprint", &self.fingerprint)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// How [`Identity::load_or_create`] came by the identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Obtained {
    /// Made now: a new key and certificate, whose fingerprint no allowlist holds yet.
    Created,
    /// The key was there but its certificate was missing, damaged or made for another key
    /// (an earlier start was interrupted): a new certificate was made for it, with a new
    /// fingerprint.
    NewCertificate,
    /// Loaded as it was.
    Loaded,
}

impl Obtained {
    /// True when the fingerprint is new (it must still be added to the allowlist).
    pub fn is_new(self) -> bool {
        self != Self::Loaded
    }
}

/// Why there is no identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading, writing or locking a file or directory failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done ("reading", "writing", ...).
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The identity there names another device than the one asked for.
    #[error(
        "the identity in {} was made for device {existing}, not {wanted}; to make a new \
         identity for {wanted}, remove {} (its certificate then needs a new entry in the \
         server's allowlist), or leave out --device-id to keep {existing}",
        dir.display(),
        dir.display()
    )]
    DeviceMismatch {
        /// The identity directory.
        dir: PathBuf,
        /// The device the identity was made for.
        existing: DeviceId,
        /// The device asked for (`--device-id`).
        wanted: DeviceId,
    },
    /// The device id file does not hold a valid device id.
    #[error(
        "{}: not a device id ({reason}); fix it or remove {} to make a new identity",
        path.display(),
        path.parent().unwrap_or(path).display()
    )]
    BadDeviceId {
        /// The file.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The key file does not hold a usable key.
    #[error(
        "{}: not a PKCS#8 ECDSA P-256 private key ({reason}); remove {} to make a new identity \
         (it then needs a new entry in the server's allowlist)",
        path.display(),
        path.parent().unwrap_or(path).display()
    )]
    BadKey {
        /// The file.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The certificate and the device id file name different devices.
    #[error(
        "{} names device {cert_device} but {} says {file_device}; remove {} to make a new identity",
        cert.display(),
        cert.with_file_name(DEVICE_FILE).display(),
        cert.parent().unwrap_or(cert).display()
    )]
    Inconsistent {
        /// The certificate file.
        cert: PathBuf,
        /// The device its subject CN names.
        cert_device: String,
        /// The device the device id file names.
        file_device: DeviceId,
    },
    /// Making a key or certificate failed.
    #[error("making the device {what}: {reason}")]
    Generate {
        /// "key", "certificate", "serial number".
        what: &'static str,
        /// The cause.
        reason: String,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> IdentityError + 'a {
    move |source| IdentityError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

impl Identity {
    /// The identity directory under `state_dir`.
    pub fn dir_in(state_dir: &Path) -> PathBuf {
        state_dir.join(DIR)
    }

    /// Loads the identity from `state_dir/identity`, completing or making it as needed (see
    /// the module documentation). `wanted_device` (`--device-id`) names the device a new
    /// identity is made for (default: [`super::default_device_id`]); an existing identity
    /// for another device is an error.
    pub fn load_or_create(
        state_dir: &Path,
        wanted_device: Option<&DeviceId>,
    ) -> Result<(Self, Obtained), IdentityError> {
        let dir = Self::dir_in(state_dir);
        fs::create_dir_all(state_dir).map_err(io_err("creating", state_dir))?;
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating", &dir)(e)),
        }
        // Also narrows what the umask left (or what someone changed).
        private_mode(&dir, 0o700)?;
        let _lock = lock(&dir)?;
        remove_stale_temporaries(&dir);

        let device_path = dir.join(DEVICE_FILE);
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        let device_text = read_private(&device_path)?;
        let key_pem = read_private(&key_path)?;
        let cert_pem = read_private(&cert_path)?;

        let recorded = match &device_text {
            Some(t) => Some(
                DeviceId::new(t.trim_end_matches(['\n', '\r'])).map_err(|e| {
                    IdentityError::BadDeviceId {
                        path: device_path.clone(),
                        reason: e.to_string(),
                    }
                })?,
            ),
            None => None,
        };
        let cert = cert_pem.as_deref().and_then(|pem| {
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
            let cn = subject_cn(&der)?;
            Some((der.to_vec(), cn))
        });
        // The device id file is written first, so it is missing only if someone removed it;
        // a certificate that still has its key then says which device this is.
        let recorded = match (recorded, &cert, &key_pem) {
            (Some(d), _, _) => Some(d),
            (None, Some((_, cn)), Some(_)) => DeviceId::new(cn).ok(),
            _ => None,
        };
        if let (Some(existing), Some(wanted)) = (&recorded, wanted_device)
            && existing != wanted
        {
            return Err(IdentityError::DeviceMismatch {
                dir,
                existing: existing.clone(),
                wanted: wanted.clone(),
            });
        }
        let device = match (recorded, wanted_device) {
            (Some(d), _) => d,
            (None, Some(w)) => w.clone(),
            (None, None) => super::default_device_id(),
        };
        if device_text.is_none() {
            write_atomic(&dir, DEVICE_FILE, format!("{device}\n").as_bytes())?;
        }

        let (key, new_key) = match &key_pem {
            Some(pem) => (
                KeyPair::from_pkcs8_pem_and_sign_algo(pem, &PKCS_ECDSA_P256_SHA256).map_err(
                    |e| IdentityError::BadKey {
                        path: key_path.clone(),
                        reason: e.to_string(),
                    },
                )?,
                false,
            ),
            None => {
                if cert_pem.is_some() {
                    eprintln!(
                        "blackbox-agent: {} is there but its key {} is missing: that identity \
                         is unusable; making a new key and certificate (add the new \
                         fingerprint to the server's allowlist)",
                        cert_path.display(),
                        key_path.display()
                    );
                }
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| {
                    IdentityError::Generate {
                        what: "key",
                        reason: e.to_string(),
                    }
                })?;
                write_atomic(&dir, KEY_FILE, key.serialize_pem().as_bytes())?;
                (key, true)
            }
        };

        let kept = match (&cert, new_key) {
            (Some((der, cn)), false) => {
                if cn != device.as_str() {
                    return Err(IdentityError::Inconsistent {
                        cert: cert_path,
                        cert_device: cn.clone(),
                        file_device: device,
                    });
                }
                if subject_public_key_info(der) == Some(&key.subject_public_key_info()[..]) {
                    cert_pem.clone().map(|pem| (der.clone(), pem))
                } else {
                    eprintln!(
                        "blackbox-agent: {} was not made for the key in {}; making a new \
                         certificate for that key (add the new fingerprint to the server's \
                         allowlist)",
                        cert_path.display(),
                        key_path.display()
                    );
                    None
                }
            }
            (None, false) => {
                if cert_pem.is_some() {
                    eprintln!(
                        "blackbox-agent: {} is damaged; making a new certificate for the key \
                         in {} (add the new fingerprint to the server's allowlist)",
                        cert_path.display(),
                        key_path.display()
                    );
                }
                None
            }
            (_, true) => None,
        };
        let (cert_der, cert_pem, obtained) = match kept {
            Some((der, pem)) => (der, pem, Obtained::Loaded),
            None => {
                let cert = make_certificate(&key, &device)?;
                let pem = cert.pem();
                write_atomic(&dir, CERT_FILE, pem.as_bytes())?;
                let obtained = if new_key {
                    Obtained::Created
                } else {
                    Obtained::NewCertificate
                };
                (cert.der().to_vec(), pem, obtained)
            }
        };
        let id = Self {
            fingerprint: fingerprint(&cert_der),
            device,
            cert_der,
            cert_pem,
            dir,
            key_pkcs8: key.serialize_der(),
            key_pem: key.serialize_pem(),
        };
        Ok((id, obtained))
    }

    /// The line for the server's allowlist: `<fingerprint>  <device id>` (two spaces).
    pub fn allowlist_line(&self) -> String {
        format!("{}  {}", self.fingerprint, self.device)
    }

    /// The private key, PKCS#8 DER (what `key.pem` holds).
    pub fn key_pkcs8_der(&self) -> &[u8] {
        &self.key_pkcs8
    }

    /// The private key, PKCS#8 PEM (what `key.pem` holds).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }
}

/// The SHA-256 fingerprint of a certificate's DER bytes.
pub fn fingerprint(cert_der: &[u8]) -> Fingerprint {
    let d = ring::digest::digest(&ring::digest::SHA256, cert_der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Fingerprint(out)
}

/// The device certificate for `key` (see the module documentation for its contents).
fn make_certificate(key: &KeyPair, device: &DeviceId) -> Result<rcgen::Certificate, IdentityError> {
    let mut serial = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| IdentityError::Generate {
            what: "serial number",
            reason: "no randomness from the system".into(),
        })?;
    // Positive, and 16 bytes long in DER (RFC 5280: positive, at most 20 bytes).
    serial[0] = (serial[0] & 0x7f) | 0x40;
    let mut p = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, device.as_str());
    p.distinguished_name = name;
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(9999, 12, 31) + Duration::from_secs(86_400 - 1);
    p.serial_number = Some(SerialNumber::from_slice(&serial));
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.self_signed(key).map_err(|e| IdentityError::Generate {
        what: "certificate",
        reason: e.to_string(),
    })
}

/// Reads a file of the identity (`None` when it does not exist), narrowing its mode to 0600.
fn read_private(path: &Path) -> Result<Option<String>, IdentityError> {
    match fs::read(path) {
        Ok(b) => {
            private_mode(path, 0o600)?;
            String::from_utf8(b)
                .map(Some)
                .map_err(|_| io_err("reading", path)(io::ErrorKind::InvalidData.into()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

/// Takes group and other access away from `path` (a file: 0600; the directory: 0700).
fn private_mode(path: &Path, mode: u32) -> Result<(), IdentityError> {
    let meta = fs::metadata(path).map_err(io_err("reading the mode of", path))?;
    let now = meta.permissions().mode() & 0o7777;
    if now & 0o077 != 0 || now & mode != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(io_err("changing the mode of", path))?;
        if now & 0o077 != 0 {
            eprintln!(
                "blackbox-agent: warning: {} was mode {now:04o} (open to group or others); \
                 changed to {mode:04o}",
                path.display()
            );
        }
    }
    Ok(())
}

/// An exclusive lock on the identity directory, held until the returned file is dropped.
fn lock(dir: &Path) -> Result<File, IdentityError> {
    let f = File::open(dir).map_err(io_err("opening", dir))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io_err("locking", dir)(e.into()))?;
    Ok(f)
}

/// The prefix of temporary files (`.NAME.tmp-PID`).
const TMP_MARK: &str = ".tmp-";

/// Removes temporary files an interrupted write left behind (the directory is locked).
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.contains(TMP_MARK) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Writes `dir/name` whole or not at all: a mode-0600 temporary file, fsync, rename over the
/// target, fsync of the directory.
fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<(), IdentityError> {
    let target = dir.join(name);
    let tmp = dir.join(format!(".{name}{TMP_MARK}{}", std::process::id()));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &target)?;
        File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map_err(io_err("writing", &target))
}

/// One DER element and what follows it.
struct Der<'a> {
    tag: u8,
    /// Tag, length and contents.
    whole: &'a [u8],
    contents: &'a [u8],
    rest: &'a [u8],
}

/// The DER element at the start of `b` (`None` if it is cut short or its length is absurd).
fn der_element(b: &[u8]) -> Option<Der<'_>> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    let header = b.len() - rest.len();
    Some(Der {
        tag,
        whole: &b[..header + len],
        contents: &rest[..len],
        rest: &rest[len..],
    })
}

const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;
const VERSION: u8 = 0xa0;

/// The contents of the SEQUENCE at the start of `b`.
fn sequence(b: &[u8]) -> Option<&[u8]> {
    der_element(b)
        .filter(|e| e.tag == SEQUENCE)
        .map(|e| e.contents)
}

/// The elements of `tbsCertificate` after the version, up to the subject public key info:
/// serial, signature, issuer, validity, subject, spki.
fn tbs_fields(cert_der: &[u8]) -> Option<[&[u8]; 6]> {
    let tbs = sequence(sequence(cert_der)?)?;
    let mut rest = tbs;
    // The explicit [0] version comes first when present.
    if rest.first() == Some(&VERSION) {
        rest = der_element(rest)?.rest;
    }
    let mut out: [&[u8]; 6] = [&[]; 6];
    for slot in &mut out {
        let e = der_element(rest)?;
        *slot = e.whole;
        rest = e.rest;
    }
    Some(out)
}

/// The subject's common name of a certificate (the device id, in ours).
fn subject_cn(cert_der: &[u8]) -> Option<String> {
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    let [_, _, _, _, subject, _] = tbs_fields(cert_der)?;
    let mut rdns = sequence(subject)?;
    while !rdns.is_empty() {
        let set = der_element(rdns)?;
        rdns = set.rest;
        let mut atvs = set.contents;
        while !atvs.is_empty() {
            let atv = der_element(atvs)?;
            atvs = atv.rest;
            let oid = der_element(atv.contents).filter(|e| e.tag == OID)?;
            if oid.contents == CN_OID {
                let text = der_element(oid.rest)?;
                return String::from_utf8(text.contents.to_vec()).ok();
            }
        }
    }
    None
}

/// The subject public key info of a certificate, DER.
fn subject_public_key_info(cert_der: &[u8]) -> Option<&[u8]> {
    let [.., spki] = tbs_fields(cert_der)?;
    Some(spki)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn der_walk_reads_our_certificate() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let dev = DeviceId::new("gw-0042").unwrap();
        let cert = make_certificate(&key, &dev).unwrap();
        assert_eq!(subject_cn(cert.der()).as_deref(), Some("gw-0042"));
        assert_eq!(
            subject_public_key_info(cert.der()),
            Some(&key.subject_public_key_info()[..])
        );
        // Truncated or garbage input is a `None`, never a panic.
        for n in 0..cert.der().len() {
            let _ = subject_cn(&cert.der()[..n]);
            let _ = subject_public_key_info(&cert.der()[..n]);
        }
        assert_eq!(subject_cn(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
