//! Just enough ELF to check what `dist` ships: the CPU, whether a dynamic loader is asked for
//! (PT_INTERP), whether a symbol table was left in. Every read is bounds-checked: a truncated
//! or foreign file is an error, never a panic.

use anyhow::{Context, Result, bail};

/// `e_ident[EI_CLASS]`.
const EI_CLASS: usize = 4;
/// `e_ident[EI_DATA]`.
const EI_DATA: usize = 5;
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ELFDATA2MSB: u8 = 2;
/// `e_machine`, the same offset in both classes.
const E_MACHINE: usize = 18;
/// Program header type of the dynamic loader's path.
const PT_INTERP: u32 = 3;
/// Section type of a full symbol table (what `strip` removes).
const SHT_SYMTAB: u32 = 2;
/// `sh_type`, the same offset in both classes.
const SH_TYPE: usize = 4;

/// Header offsets that differ between ELF32 and ELF64.
struct Layout {
    phoff: usize,
    shoff: usize,
    phentsize: usize,
    phnum: usize,
    shentsize: usize,
    shnum: usize,
}

const ELF32: Layout = Layout {
    phoff: 28,
    shoff: 32,
    phentsize: 42,
    phnum: 44,
    shentsize: 46,
    shnum: 48,
};

const ELF64: Layout = Layout {
    phoff: 32,
    shoff: 40,
    phentsize: 54,
    phnum: 56,
    shentsize: 58,
    shnum: 60,
};

/// What [`inspect`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Facts {
    /// `e_machine`.
    pub(crate) machine: u16,
    /// Whether a program header names a dynamic loader.
    pub(crate) interpreter: bool,
    /// Whether a section holds a full symbol table.
    pub(crate) symbols: bool,
}

/// The `e_machine` a binary for `target` carries.
pub(crate) fn machine_of(target: &str) -> Option<u16> {
    let arch = target.split('-').next()?;
    Some(match arch {
        "x86_64" => 62,
        "aarch64" => 183,
        a if a.starts_with("arm") => 40,
        "mips" | "mipsel" => 8,
        _ => return None,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    little: bool,
}

impl Reader<'_> {
    fn get<const N: usize>(&self, at: usize) -> Result<[u8; N]> {
        at.checked_add(N)
            .and_then(|end| self.bytes.get(at..end))
            .and_then(|s| <[u8; N]>::try_from(s).ok())
            .with_context(|| format!("truncated ELF file (reading {N} bytes at {at})"))
    }

    /// The unsigned `N`-byte number (N <= 8) at `at`, in the file's byte order.
    fn uint<const N: usize>(&self, at: usize) -> Result<u64> {
        let mut b = self.get::<N>(at)?;
        if self.little {
            b.reverse();
        }
        Ok(b.iter().fold(0, |v, &byte| v << 8 | u64::from(byte)))
    }

    /// A 2-byte count or size.
    fn half(&self, at: usize) -> Result<usize> {
        Ok(usize::try_from(self.uint::<2>(at)?)?)
    }

    /// A file offset: 4 bytes in ELF32, 8 in ELF64.
    fn offset(&self, at: usize, wide: bool) -> Result<usize> {
        let v = if wide {
            self.uint::<8>(at)?
        } else {
            self.uint::<4>(at)?
        };
        usize::try_from(v).context("ELF offset does not fit in memory")
    }

    /// Whether any of `num` table entries of `size` bytes from `start` has `want` in the u32
    /// at `field`.
    fn any_entry(
        &self,
        start: usize,
        size: usize,
        num: usize,
        field: usize,
        want: u32,
    ) -> Result<bool> {
        for i in 0..num {
            let at = i
                .checked_mul(size)
                .and_then(|o| o.checked_add(start))
                .and_then(|o| o.checked_add(field))
                .context("ELF table offset overflows")?;
            if self.uint::<4>(at)? == u64::from(want) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Reads the facts `dist` checks from an ELF file's bytes.
pub(crate) fn inspect(bytes: &[u8]) -> Result<Facts> {
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
        bail!("not an ELF file");
    }
    let wide = match bytes.get(EI_CLASS) {
        Some(&ELFCLASS32) => false,
        Some(&ELFCLASS64) => true,
        other => bail!("unknown ELF class {other:?}"),
    };
    let little = match bytes.get(EI_DATA) {
        Some(&ELFDATA2LSB) => true,
        Some(&ELFDATA2MSB) => false,
        other => bail!("unknown ELF byte order {other:?}"),
    };
    let r = Reader { bytes, little };
    let l = if wide { ELF64 } else { ELF32 };
    let machine = u16::try_from(r.uint::<2>(E_MACHINE)?)?;
    let interpreter = r.any_entry(
        r.offset(l.phoff, wide)?,
        r.half(l.phentsize)?,
        r.half(l.phnum)?,
        0,
        PT_INTERP,
    )?;
    let symbols = r.any_entry(
        r.offset(l.shoff, wide)?,
        r.half(l.shentsize)?,
        r.half(l.shnum)?,
        SH_TYPE,
        SHT_SYMTAB,
    )?;
    Ok(Facts {
        machine,
        interpreter,
        symbols,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn this_test_binary_is_dynamic_with_symbols() {
        // A debug test binary for the host: a loader and a symbol table.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let facts = inspect(&me).unwrap();
        assert_eq!(Some(facts.machine), machine_of(std::env::consts::ARCH));
        assert!(facts.interpreter);
        assert!(facts.symbols);
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        assert!(inspect(b"").is_err());
        assert!(inspect(b"#!/bin/sh\n").is_err());
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        for len in [4, 6, 20, 63, 64] {
            assert!(inspect(&me[..len]).is_err(), "{len} bytes");
        }
    }

    #[test]
    fn machines() {
        assert_eq!(machine_of("armv7-unknown-linux-musleabihf"), Some(40));
        assert_eq!(machine_of("mipsel-unknown-linux-musl"), Some(8));
        assert_eq!(machine_of("riscv64gc-unknown-linux-musl"), None);
    }
}
