//! Device identity on the wire: the SHA-256 fingerprint of a device certificate.
//!
//! The agent prints it (`blackbox-agent identity`), the operator pastes it into the server's
//! allowlist, and the server computes it from the certificate presented in the TLS handshake.
//! All three use this one type, so the text form cannot drift.
//!
//! Text form: `sha256:` followed by 64 lowercase hex digits. Parsing also accepts the bare 64
//! digits, upper case, and the colon-separated form OpenSSL prints
//! (`openssl x509 -noout -fingerprint -sha256`), with or without its `sha256 Fingerprint=` prefix.
//! Hashing is left to the caller (both ends already carry a SHA-256 implementation in their
//! TLS stack).
use core::fmt;
use core::str::FromStr;

/// The SHA-256 digest of a certificate's DER bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

/// Why a text is not a fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FingerprintError {
    /// A character other than a hex digit (or a colon between byte pairs).
    NotHex,
    /// Not exactly 32 bytes (64 hex digits).
    Length(usize),
}

impl fmt::Display for FingerprintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotHex => {
                f.write_str("a fingerprint is 64 hex digits (optionally `sha256:` first)")
            }
            Self::Length(n) => write!(f, "a SHA-256 fingerprint has 64 hex digits, this has {n}"),
        }
    }
}

impl core::error::Error for FingerprintError {}

impl FromStr for Fingerprint {
    type Err = FingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let lower_prefix = |p: &str| {
            s.get(..p.len())
                .filter(|h| h.eq_ignore_ascii_case(p))
                .map(|_| &s[p.len()..])
        };
        let hex = lower_prefix("sha256 fingerprint=")
            .or_else(|| lower_prefix("sha256:"))
            .or_else(|| lower_prefix("sha256="))
            .unwrap_or(s);
        let colons = hex.contains(':');
        let mut out = [0u8; 32];
        let mut digits = 0usize;
        let mut since_colon = 0usize;
        for c in hex.bytes() {
            if c == b':' && colons {
                if since_colon != 2 {
                    return Err(FingerprintError::NotHex);
                }
                since_colon = 0;
                continue;
            }
            let v = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return Err(FingerprintError::NotHex),
            };
            if digits < 64 {
                out[digits / 2] |= if digits.is_multiple_of(2) { v << 4 } else { v };
            }
            digits += 1;
            since_colon += 1;
        }
        if colons && since_colon != 2 {
            return Err(FingerprintError::NotHex);
        }
        if digits != 64 {
            return Err(FingerprintError::Length(digits));
        }
        Ok(Self(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn text_forms() {
        let fp = Fingerprint(core::array::from_fn(|i| i as u8 * 7));
        let canon = fp.to_string();
        assert!(canon.starts_with("sha256:0007"));
        assert_eq!(canon.len(), 7 + 64);
        assert_eq!(canon.parse::<Fingerprint>(), Ok(fp));
        assert_eq!(canon[7..].to_uppercase().parse::<Fingerprint>(), Ok(fp));
        let openssl: alloc::vec::Vec<alloc::string::String> =
            fp.0.iter().map(|b| alloc::format!("{b:02X}")).collect();
        let openssl = alloc::format!("sha256 Fingerprint={}", openssl.join(":"));
        assert_eq!(openssl.parse::<Fingerprint>(), Ok(fp));
        assert_eq!(
            "sha256:00".parse::<Fingerprint>(),
            Err(FingerprintError::Length(2))
        );
        assert_eq!(
            "zz".repeat(32).parse::<Fingerprint>(),
            Err(FingerprintError::NotHex)
        );
        assert!(
            canon[7..]
                .replace("07", "0:7")
                .parse::<Fingerprint>()
                .is_err()
        );
        assert_eq!(
            alloc::format!("{canon}00").parse::<Fingerprint>(),
            Err(FingerprintError::Length(66))
        );
    }
}
