//! Mapping the ring's memory: reserved physical memory through `/dev/mem`, or a file.
//!
//! This is the only module with `unsafe` code. A [`Mapping`] owns its mapping: it cannot be
//! cloned, it is unmapped when dropped, and the ring borrows the bytes through it.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use rustix::mm::{MapFlags, MsyncFlags, ProtFlags};

use crate::ring::Region;

/// Where the ring lives (`--ring`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingSpec {
    /// Reserved physical memory at `addr`, `len` bytes, mapped through `/dev/mem`.
    Mem {
        /// Physical address (page aligned).
        addr: u64,
        /// Length (a multiple of the page size).
        len: usize,
    },
    /// A file of `len` bytes.
    File {
        /// Its path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
}

/// Parses a size: `4096`, `64K`, `1M`, `16M`, `1G`, or hexadecimal `0x100000`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n = match num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok()?,
        None => num.parse().ok()?,
    };
    n.checked_mul(mul)
}

impl std::str::FromStr for RingSpec {
    type Err = String;

    /// `mem:0x1e000000:1M` or `file:/run/blackbox/ring:4M`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected mem:ADDRESS:SIZE or file:PATH:SIZE");
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        let (what, size) = rest.rsplit_once(':').ok_or_else(bad)?;
        let len = parse_size(size).ok_or_else(|| format!("{s:?}: bad size {size:?}"))?;
        let len = usize::try_from(len).map_err(|_| format!("{s:?}: size too large"))?;
        match kind {
            "mem" => {
                let addr =
                    parse_size(what).ok_or_else(|| format!("{s:?}: bad address {what:?}"))?;
                Ok(Self::Mem { addr, len })
            }
            "file" if !what.is_empty() => Ok(Self::File {
                path: PathBuf::from(what),
                len,
            }),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for RingSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Mem { addr, len } => write!(f, "mem:{addr:#x}:{len}"),
            Self::File { path, len } => write!(f, "file:{}:{len}", path.display()),
        }
    }
}

/// A shared, writable mapping the ring lives in.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// Kept open for `msync`; the mapping stays valid without it.
    _file: File,
    spec: RingSpec,
}

// SAFETY: the mapping is owned by this value alone (no aliasing pointer is handed out except
// through `&self`/`&mut self` borrows), so moving it to another thread is sound.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps `spec`. `/dev/mem` is opened with `O_SYNC`, which gives an uncached mapping of the
    /// reserved region (as ramoops does), so every store reaches RAM before a panic can stop
    /// the CPU. A file is created (mode 0600) and sized if needed.
    pub fn open(spec: &RingSpec) -> std::io::Result<Self> {
        let page = rustix::param::page_size();
        let (file, offset, len) = match spec {
            RingSpec::Mem { addr, len } => {
                if addr % page as u64 != 0 || len % page != 0 || *len == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{spec}: address and size must be multiples of {page}"),
                    ));
                }
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(rustix::fs::OFlags::SYNC.bits() as i32)
                    .open("/dev/mem")?;
                (f, *addr, *len)
            }
            RingSpec::File { path, len } => {
                if *len == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{spec}: empty ring"),
                    ));
                }
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(path)?;
                if f.metadata()?.len() != *len as u64 {
                    f.set_len(*len as u64)?;
                }
                reserve(&f, path, *len)?;
                (f, 0, *len)
            }
        };
        // SAFETY: a fresh shared mapping chosen by the kernel (null hint), of `len` bytes of an
        // open file descriptor at a page-aligned offset. Nothing else in this process maps the
        // region; the pointer is owned by the returned `Mapping` and unmapped exactly once in
        // `Drop`. Other processes writing the same file or physical memory are outside the
        // ring's contract (the CRCs catch what they could do).
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                file.as_fd(),
                offset,
            )
        }?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null pointer"))?;
        Ok(Self {
            ptr,
            len,
            _file: file,
            spec: spec.clone(),
        })
    }

    /// What was mapped.
    pub fn spec(&self) -> &RingSpec {
        &self.spec
    }

    /// Asks the kernel to write a file mapping back (no-op for `/dev/mem`).
    pub fn flush(&self) -> std::io::Result<()> {
        if matches!(self.spec, RingSpec::Mem { .. }) {
            return Ok(());
        }
        // SAFETY: `ptr`/`len` are exactly the live mapping this value owns.
        unsafe { rustix::mm::msync(self.ptr.as_ptr().cast(), self.len, MsyncFlags::ASYNC) }?;
        Ok(())
    }

    fn slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes, readable, valid until `Drop`; every byte pattern
        // is a valid `u8`; the borrow of `self` keeps it alive and prevents a `&mut` alias.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `slice`, and the mapping is writable; `&mut self` makes this the only
        // reference into it for the borrow's duration.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Whether `path` is on a tmpfs/ramfs (gone after a reboot).
    pub fn on_tmpfs(path: &Path) -> bool {
        let dir = path.parent().unwrap_or(path);
        rustix::fs::statfs(dir).is_ok_and(|s| {
            let t = s.f_type as u64;
            t == 0x0102_1994 || t == 0x8584_58f6 // TMPFS_MAGIC, RAMFS_MAGIC
        })
    }
}

/// Allocates every block of a ring file now. A file made by `set_len` is sparse: the first
/// store into a page of a hole allocates it, and on a full filesystem that store is a SIGBUS
/// that kills the agent. Reserved up front, a disk that fills later costs nothing, and one
/// already full is a clear error at start. Filesystems without `fallocate` (UBIFS, JFFS2)
/// keep the sparse file, with a warning.
fn reserve(f: &File, path: &Path, len: usize) -> std::io::Result<()> {
    match rustix::fs::fallocate(f, rustix::fs::FallocateFlags::empty(), 0, len as u64) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
            eprintln!(
                "blackbox-agent: warning: cannot reserve the ring file {} in full (its filesystem \
                 has no fallocate): should that filesystem fill up, a write into the ring can \
                 kill the agent; a ring on tmpfs or reserved memory avoids that",
                path.display()
            );
            Ok(())
        }
        Err(e) => Err(std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!(
                "reserving {len} bytes for the ring file {}: {e} (free some space, or give \
                 --ring a smaller size or another place)",
                path.display()
            ),
        )),
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `open`; no borrow of it can outlive
        // `self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl Region for Mapping {
    fn bytes(&self) -> &[u8] {
        self.slice()
    }

    fn write(&mut self, off: usize, data: &[u8]) {
        if let Some(d) = self
            .slice_mut()
            .get_mut(off..off.saturating_add(data.len()))
        {
            d.copy_from_slice(data);
        }
    }

    fn zero(&mut self, off: usize, len: usize) {
        if let Some(d) = self.slice_mut().get_mut(off..off.saturating_add(len)) {
            d.fill(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            "mem:0x1e000000:1M".parse::<RingSpec>(),
            Ok(RingSpec::Mem {
                addr: 0x1e00_0000,
                len: 1 << 20
            })
        );
        assert_eq!(
            "file:/run/bb/ring:64K".parse::<RingSpec>(),
            Ok(RingSpec::File {
                path: "/run/bb/ring".into(),
                len: 65536
            })
        );
        assert!("mem:xyz:1M".parse::<RingSpec>().is_err());
        assert!("disk:/x:1M".parse::<RingSpec>().is_err());
        assert!("file::1M".parse::<RingSpec>().is_err());
        assert_eq!(parse_size("0x100000"), Some(1 << 20));
        assert_eq!(parse_size("99999999999G"), None);
    }

    #[test]
    fn a_file_mapping_keeps_what_was_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = RingSpec::File {
            path: dir.path().join("ring"),
            len: 8192,
        };
        {
            let mut m = Mapping::open(&spec).expect("map");
            m.write(100, b"persist");
            m.flush().expect("msync");
        }
        let m = Mapping::open(&spec).expect("map again");
        assert_eq!(&m.bytes()[100..107], b"persist");
        assert_eq!(m.bytes().len(), 8192);
    }
}
