//! Sending one sealed chunk and classifying the answer.
use std::time::Duration;

/// What the server's answer means for the chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Durably stored (201) or recognised as already stored (200).
    Acked {
        /// True when the server already had it.
        duplicate: bool,
    },
    /// Not stored; try again later. Every network error, timeout, refusal, 5xx and 503 lands
    /// here, as do 401/403 (a device not yet on the allowlist).
    Retry {
        /// The server's Retry-After, if it sent one.
        after: Option<Duration>,
        /// Why, for the log.
        why: String,
    },
    /// The server says the chunk itself is invalid (400, 413): no retry can help.
    Rejected {
        /// Status and body.
        why: String,
    },
}

/// An HTTP client for one server.
#[derive(Debug)]
pub struct Uploader {
    agent: ureq::Agent,
    url: String,
    device: String,
}

impl Uploader {
    /// A client for `server` (base URL), authenticating as `device`.
    pub fn new(server: &str, device: &str, timeout: Duration) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            agent,
            url: format!("{}/v1/chunks", server.trim_end_matches('/')),
            device: device.to_owned(),
        }
    }

    /// Sends one chunk.
    pub fn send(&self, bytes: &[u8]) -> Answer {
        let resp = self
            .agent
            .post(&self.url)
            .header("x-blackbox-device", &self.device)
            .header("content-type", "application/gzip")
            .send(bytes);
        let mut resp = match resp {
            Ok(r) => r,
            Err(e) => {
                return Answer::Retry {
                    after: None,
                    why: e.to_string(),
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
            .limit(4096)
            .read_to_string()
            .unwrap_or_default();
        match status {
            200 => Answer::Acked { duplicate: true },
            201 => Answer::Acked { duplicate: false },
            400 | 413 | 422 => Answer::Rejected {
                why: format!("{status}: {}", body.trim()),
            },
            _ => Answer::Retry {
                after,
                why: format!("{status}: {}", body.trim()),
            },
        }
    }
}
