//! The flood's baseline: nginx from Debian taking the same bodies by HTTP PUT into files
//! (the WebDAV module's `dav_methods PUT`), one file per chunk, with the same TLS (any client
//! certificate accepted) or plain HTTP.
//!
//! nginx writes each body to a temporary file and renames it into place; it does not fsync.
//! The receiver fsyncs each segment: the comparison is tilted towards nginx on durability.
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::procstat::{self, Usage};

/// A running nginx (master and workers) with its own configuration and directories.
pub struct Nginx {
    /// Port on 127.0.0.1.
    pub port: u16,
    /// Where PUT bodies land: `<store>/dav/<device>/<first>-<last>.gz`.
    pub store: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
}

/// The server's certificate and key, for TLS.
pub struct NginxTls<'a> {
    /// PEM certificate chain.
    pub cert: &'a Path,
    /// PEM key.
    pub key: &'a Path,
}

impl Nginx {
    /// Starts `nginx` (the binary at `bin`) in `dir` with `workers` worker processes, and waits
    /// until it accepts connections.
    pub fn start(
        bin: &Path,
        dir: &Path,
        workers: usize,
        tls: Option<NginxTls<'_>>,
    ) -> anyhow::Result<Self> {
        let port = crate::harness::free_port();
        let store = dir.join("store");
        let tmp = dir.join("tmp");
        for d in [&store, &tmp] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let ssl = match &tls {
            Some(t) => format!(
                "ssl;\n        ssl_certificate {};\n        ssl_certificate_key {};\n        \
                 ssl_verify_client optional_no_ca;\n        ssl_protocols TLSv1.2 TLSv1.3;",
                t.cert.display(),
                t.key.display()
            ),
            None => ";".to_owned(),
        };
        let d = dir.display();
        let conf = format!(
            "# Written by the flood load generator.\n\
             daemon off;\nmaster_process on;\nworker_processes {workers};\nuser root;\n\
             pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nworker_rlimit_nofile 20000;\n\
             events {{ worker_connections 16384; }}\n\
             http {{\n    access_log off;\n    client_body_temp_path {d}/tmp;\n    \
             proxy_temp_path {d}/tmp;\n    fastcgi_temp_path {d}/tmp;\n    uwsgi_temp_path {d}/tmp;\n    \
             scgi_temp_path {d}/tmp;\n    client_max_body_size 2m;\n    keepalive_timeout 10s;\n    \
             server {{\n        listen 127.0.0.1:{port} {ssl}\n        root {store};\n        \
             location /dav/ {{\n            dav_methods PUT;\n            create_full_put_path on;\n            \
             dav_access user:rw;\n        }}\n    }}\n}}\n",
            store = store.display(),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let log = std::fs::File::create(dir.join("stderr.log"))?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut n = Self {
            port,
            store,
            dir: dir.to_owned(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(c) = n.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                n.child = None;
                bail!("nginx exited with {st}: {}", n.log_text());
            }
            if Instant::now() > deadline {
                bail!("nginx does not accept connections: {}", n.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(n)
    }

    /// Its error logs.
    pub fn log_text(&self) -> String {
        ["stderr.log", "error.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Memory and CPU of the master and its workers together.
    pub fn usage(&self) -> Usage {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return Usage::default();
        };
        let mut pids = procstat::children(pid);
        pids.push(pid);
        Usage::sum(pids.into_iter().filter_map(procstat::usage))
    }

    /// The file a chunk was PUT to.
    pub fn path_of(&self, device: &str, first: u64, last: u64) -> PathBuf {
        self.store.join(format!("dav/{device}/{first}-{last}.gz"))
    }

    /// Stops nginx (SIGQUIT: workers finish their requests).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-QUIT", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}
