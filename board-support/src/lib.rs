//! Board support: where each board keeps the agent's persistent RAM ring and the kernel's
//! ramoops region, and what the kernel must be told so that neither is used as ordinary RAM.
//!
//! One [`Board`] per board, all in [`BOARDS`]. The agent reads it for `--board NAME` (the ring's
//! physical address and size); `cargo xtask dist` writes the kernel command-line fragment and,
//! on device-tree boards, the `reserved-memory` nodes into the firmware overlay (the rest of the
//! overlay is templates in `overlay/`); `cargo xtask qemu` boots the QEMU boards with the same
//! numbers. Nothing here allocates: `no_std`, every text is produced through
//! [`core::fmt::Display`].
//!
//! # Adding a board
//! Add one `Board` constant and list it in [`BOARDS`]: pick two regions of RAM the bootloader and
//! kernel will not load anything into (the ring, 1 MiB is plenty for a router; the ramoops
//! region, if the kernel has `CONFIG_PSTORE_RAM`), say how they are reserved ([`Reserve`]), the
//! console and the panic settings. The tests below check that regions are page aligned, inside
//! RAM and do not overlap.
#![no_std]
#![forbid(unsafe_code)]

use core::fmt;

/// A physical memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Physical start address (page aligned).
    pub addr: u64,
    /// Length in bytes (a multiple of the page size).
    pub size: u64,
}

impl Region {
    /// One past the last byte.
    pub const fn end(&self) -> u64 {
        self.addr + self.size
    }

    /// Whether the two regions share a byte.
    pub const fn overlaps(&self, other: &Region) -> bool {
        self.addr < other.end() && other.addr < self.end()
    }
}

/// The kernel's ramoops (pstore/ram) settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ramoops {
    /// The reserved region ramoops uses.
    pub region: Region,
    /// Bytes per oops/panic dump record.
    pub record_size: u64,
    /// Bytes for the console log of the previous boot (0: none).
    pub console_size: u64,
    /// Bytes for pmsg (userspace messages through /dev/pmsg0; 0: none).
    pub pmsg_size: u64,
    /// Reed-Solomon ECC bytes per block (0: none; 16 is what `ramoops.ecc=1` picks).
    pub ecc_size: u32,
}

/// How the kernel learns not to use the reserved regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserve {
    /// `memmap=SIZE$ADDR` on the kernel command line (x86, MIPS).
    Memmap,
    /// `reserved-memory` nodes in the device tree (ARM): no `memmap=` there.
    DeviceTree,
}

/// How to boot the board under QEMU, for the boot test (only the QEMU boards have one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Qemu {
    /// The `qemu-system-*` binary.
    pub system: &'static str,
    /// The `qemu-*-static` user-mode binary that runs this CPU's programs on the build host.
    pub user: &'static str,
    /// `-M` value.
    pub machine: &'static str,
    /// `-cpu` value, if the machine's default is not wanted.
    pub cpu: Option<&'static str>,
    /// `-m` value, MiB.
    pub ram_mib: u32,
    /// Debian architecture of the kernel and busybox packages.
    pub debian_arch: &'static str,
    /// The Debian kernel flavour (`linux-image-*-FLAVOUR`).
    pub kernel_flavour: &'static str,
    /// QEMU NIC model for `-nic user,model=…`.
    pub nic: &'static str,
    /// Whether the stock Debian kernel has pstore/ramoops (as modules).
    pub stock_kernel_has_ramoops: bool,
    /// A spare page the boot test uses to tell the first boot from the second.
    pub scratch: Region,
}

/// One board.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Board {
    /// The name `--board` takes.
    pub name: &'static str,
    /// One line for people.
    pub description: &'static str,
    /// The Rust target the agent is built for.
    pub rust_target: &'static str,
    /// RAM as the kernel sees it (for the checks below).
    pub ram: Region,
    /// The agent's persistent ring.
    pub ring: Region,
    /// The kernel's ramoops region, if the board's kernel has pstore/ram.
    pub ramoops: Option<Ramoops>,
    /// How the regions are reserved.
    pub reserve: Reserve,
    /// The console device (`console=`).
    pub console: &'static str,
    /// Seconds before the kernel reboots after a panic (`panic=`); must be non-zero, or a
    /// panicked device hangs until someone power-cycles it.
    pub panic_reboot_secs: u32,
    /// Whether an oops is a panic (`oops=panic`): the state after an oops is not to be trusted,
    /// and a reboot saves the story.
    pub oops_panics: bool,
    /// QEMU settings, for the QEMU boards.
    pub qemu: Option<Qemu>,
}

const MIB: u64 = 1 << 20;

/// A standard PC under QEMU (`-M pc`, 512 MiB). QEMU puts the initrd at the top of RAM, so the
/// regions sit below it.
pub const QEMU_X86_64: Board = Board {
    name: "qemu-x86_64",
    description: "QEMU PC (x86_64), 512 MiB, stock Debian amd64 kernel",
    rust_target: "x86_64-unknown-linux-musl",
    ram: Region {
        addr: 0,
        size: 512 * MIB,
    },
    ring: Region {
        addr: 0x1e00_0000,
        size: MIB,
    },
    ramoops: Some(Ramoops {
        region: Region {
            addr: 0x1f00_0000,
            size: MIB,
        },
        record_size: 0x1_0000,
        console_size: 0x4_0000,
        pmsg_size: 0,
        ecc_size: 16,
    }),
    reserve: Reserve::Memmap,
    console: "ttyS0",
    panic_reboot_secs: 1,
    oops_panics: true,
    qemu: Some(Qemu {
        system: "qemu-system-x86_64",
        user: "qemu-x86_64-static",
        machine: "pc",
        cpu: None,
        ram_mib: 512,
        debian_arch: "amd64",
        kernel_flavour: "amd64",
        nic: "e1000",
        stock_kernel_has_ramoops: true,
        scratch: Region {
            addr: 0x1d00_0000,
            size: 0x1000,
        },
    }),
};

/// QEMU's ARM `virt` board with a 64-bit CPU, 512 MiB from 0x4000_0000.
pub const QEMU_AARCH64_VIRT: Board = Board {
    name: "qemu-aarch64-virt",
    description: "QEMU virt (aarch64, cortex-a57), 512 MiB, stock Debian arm64 kernel",
    rust_target: "aarch64-unknown-linux-musl",
    ram: Region {
        addr: 0x4000_0000,
        size: 512 * MIB,
    },
    ring: Region {
        addr: 0x5e00_0000,
        size: MIB,
    },
    ramoops: Some(Ramoops {
        region: Region {
            addr: 0x5f00_0000,
            size: MIB,
        },
        record_size: 0x1_0000,
        console_size: 0x4_0000,
        pmsg_size: 0,
        ecc_size: 16,
    }),
    reserve: Reserve::DeviceTree,
    console: "ttyAMA0",
    panic_reboot_secs: 1,
    oops_panics: true,
    qemu: Some(Qemu {
        system: "qemu-system-aarch64",
        user: "qemu-aarch64-static",
        machine: "virt",
        cpu: Some("cortex-a57"),
        ram_mib: 512,
        debian_arch: "arm64",
        kernel_flavour: "arm64",
        nic: "virtio-net-pci",
        stock_kernel_has_ramoops: true,
        scratch: Region {
            addr: 0x5d00_0000,
            size: 0x1000,
        },
    }),
};

/// QEMU's ARM `virt` board with a 32-bit CPU, 512 MiB from 0x4000_0000. The stock Debian armhf
/// kernel has no pstore: the agent's own ring is what survives the panic.
pub const QEMU_ARMV7_VIRT: Board = Board {
    name: "qemu-armv7-virt",
    description: "QEMU virt (armv7, cortex-a15), 512 MiB, stock Debian armhf (armmp) kernel",
    rust_target: "armv7-unknown-linux-musleabihf",
    ram: Region {
        addr: 0x4000_0000,
        size: 512 * MIB,
    },
    ring: Region {
        addr: 0x5e00_0000,
        size: MIB,
    },
    ramoops: None,
    reserve: Reserve::DeviceTree,
    console: "ttyAMA0",
    panic_reboot_secs: 1,
    oops_panics: true,
    qemu: Some(Qemu {
        system: "qemu-system-arm",
        user: "qemu-arm-static",
        // The default (highmem=on) puts the PCIe ECAM above 4 GiB, which the armmp kernel (no
        // LPAE) cannot reach: no PCI, so no virtio NIC.
        machine: "virt,highmem=off",
        cpu: Some("cortex-a15"),
        ram_mib: 512,
        debian_arch: "armhf",
        kernel_flavour: "armmp",
        nic: "virtio-net-pci",
        stock_kernel_has_ramoops: false,
        scratch: Region {
            addr: 0x5d00_0000,
            size: 0x1000,
        },
    }),
};

/// QEMU's MIPS Malta (little endian), 256 MiB. Malta cuts the kernel command line at 255
/// characters, so the fragment stays short. The stock Debian kernel has no pstore.
pub const QEMU_MIPSEL_MALTA: Board = Board {
    name: "qemu-mipsel-malta",
    description: "QEMU Malta (mipsel, 24Kf), 256 MiB, stock Debian 4kc-malta kernel",
    rust_target: "mipsel-unknown-linux-musl",
    ram: Region {
        addr: 0,
        size: 256 * MIB,
    },
    ring: Region {
        addr: 0x0e00_0000,
        size: MIB,
    },
    ramoops: None,
    reserve: Reserve::Memmap,
    console: "ttyS0",
    panic_reboot_secs: 1,
    oops_panics: true,
    qemu: Some(Qemu {
        system: "qemu-system-mipsel",
        user: "qemu-mipsel-static",
        machine: "malta",
        cpu: None,
        ram_mib: 256,
        debian_arch: "mipsel",
        kernel_flavour: "4kc-malta",
        nic: "pcnet",
        stock_kernel_has_ramoops: false,
        scratch: Region {
            addr: 0x0d00_0000,
            size: 0x1000,
        },
    }),
};

/// Every board, by name.
pub const BOARDS: &[Board] = &[
    QEMU_X86_64,
    QEMU_AARCH64_VIRT,
    QEMU_ARMV7_VIRT,
    QEMU_MIPSEL_MALTA,
];

/// The board called `name`.
pub fn board(name: &str) -> Option<&'static Board> {
    BOARDS.iter().find(|b| b.name == name)
}

impl Board {
    /// The kernel command-line fragment: console, panic settings and, on `memmap=` boards,
    /// the reserved regions and the ramoops parameters.
    pub fn cmdline(&self) -> Cmdline<'_> {
        Cmdline(self)
    }

    /// The `ramoops` module parameters (for `insmod ramoops.ko …`: busybox's insmod does not
    /// read them from the command line), if the board has a ramoops region.
    pub fn ramoops_params(&self) -> Option<RamoopsParams> {
        self.ramoops.map(|r| RamoopsParams(r, ""))
    }

    /// The device-tree `reserved-memory` node (dts source) for `DeviceTree` boards.
    pub fn dts_fragment(&self) -> Option<DtsFragment<'_>> {
        (self.reserve == Reserve::DeviceTree).then_some(DtsFragment(self))
    }

    /// The regions the kernel must not use: the ring, ramoops and (QEMU) the scratch page.
    pub fn reserved(&self) -> impl Iterator<Item = Region> + '_ {
        [
            Some(self.ring),
            self.ramoops.map(|r| r.region),
            self.qemu.map(|q| q.scratch),
        ]
        .into_iter()
        .flatten()
    }

    /// The agent's `--ring` value for this board.
    pub fn ring_spec(&self) -> RingSpec {
        RingSpec(self.ring)
    }
}

/// `mem:0xADDR:SIZE`, the agent's `--ring` syntax.
#[derive(Clone, Copy, Debug)]
pub struct RingSpec(Region);

impl fmt::Display for RingSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mem:{:#x}:{}", self.0.addr, Size(self.0.size))
    }
}

/// A size as `1M`, `64K` or bytes, whichever is exact.
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n != 0 && n.is_multiple_of(MIB) {
            write!(f, "{}M", n / MIB)
        } else if n != 0 && n.is_multiple_of(1024) {
            write!(f, "{}K", n / 1024)
        } else {
            write!(f, "{n}")
        }
    }
}

/// The kernel command-line fragment; see [`Board::cmdline`].
#[derive(Clone, Copy, Debug)]
pub struct Cmdline<'a>(&'a Board);

impl fmt::Display for Cmdline<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "console={} panic={}", b.console, b.panic_reboot_secs)?;
        if b.oops_panics {
            f.write_str(" oops=panic")?;
        }
        // Userspace writers of /dev/kmsg are rate-limited to 10 lines per 5 s otherwise.
        f.write_str(" printk.devkmsg=on")?;
        if b.reserve == Reserve::Memmap {
            for r in b.reserved() {
                write!(f, " memmap={}${:#x}", Size(r.size), r.addr)?;
            }
            if let Some(r) = b.ramoops {
                // For a kernel with ramoops built in (a module takes them on its insmod line).
                write!(f, " {}", RamoopsParams(r, "ramoops."))?;
            }
        }
        Ok(())
    }
}

/// `mem_address=… mem_size=… record_size=… console_size=… pmsg_size=… ecc=…`, each name after
/// a prefix (`ramoops.` on the kernel command line, nothing on an insmod line).
#[derive(Clone, Copy, Debug)]
pub struct RamoopsParams(Ramoops, &'static str);

impl fmt::Display for RamoopsParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (r, p) = (self.0, self.1);
        write!(
            f,
            "{p}mem_address={:#x} {p}mem_size={:#x} {p}record_size={:#x} {p}console_size={:#x} \
             {p}pmsg_size={:#x} {p}ecc={}",
            r.region.addr, r.region.size, r.record_size, r.console_size, r.pmsg_size, r.ecc_size
        )
    }
}

/// The `reserved-memory` node; see [`Board::dts_fragment`].
#[derive(Clone, Copy, Debug)]
pub struct DtsFragment<'a>(&'a Board);

impl fmt::Display for DtsFragment<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        let cells =
            |f: &mut fmt::Formatter<'_>, v: u64| write!(f, "{:#x} {:#x}", v >> 32, v & 0xffff_ffff);
        writeln!(f, "/ {{")?;
        writeln!(f, "\treserved-memory {{")?;
        writeln!(f, "\t\t#address-cells = <2>;")?;
        writeln!(f, "\t\t#size-cells = <2>;")?;
        writeln!(f, "\t\tranges;")?;
        let node = |f: &mut fmt::Formatter<'_>, label: &str, r: Region| -> fmt::Result {
            write!(f, "\t\t{label}@{:x} {{\n\t\t\treg = <", r.addr)?;
            cells(f, r.addr)?;
            f.write_str(" ")?;
            cells(f, r.size)?;
            f.write_str(">;\n")?;
            Ok(())
        };
        node(f, "blackbox-ring", b.ring)?;
        writeln!(f, "\t\t\tno-map;\n\t\t}};")?;
        if let Some(r) = b.ramoops {
            node(f, "ramoops", r.region)?;
            writeln!(f, "\t\t\tcompatible = \"ramoops\";")?;
            writeln!(f, "\t\t\trecord-size = <{:#x}>;", r.record_size)?;
            writeln!(f, "\t\t\tconsole-size = <{:#x}>;", r.console_size)?;
            writeln!(f, "\t\t\tpmsg-size = <{:#x}>;", r.pmsg_size)?;
            writeln!(f, "\t\t\tecc-size = <{}>;", r.ecc_size)?;
            writeln!(f, "\t\t\tno-map;\n\t\t}};")?;
        }
        if let Some(q) = b.qemu {
            node(f, "blackbox-scratch", q.scratch)?;
            writeln!(f, "\t\t\tno-map;\n\t\t}};")?;
        }
        writeln!(f, "\t}};")?;
        writeln!(f, "}};")
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::ToString;
    use std::vec::Vec;

    use super::*;

    const PAGE: u64 = 4096;

    #[test]
    fn regions_are_page_aligned_inside_ram_and_apart() {
        for b in BOARDS {
            let regions: Vec<Region> = b.reserved().collect();
            for r in &regions {
                assert_eq!(r.addr % PAGE, 0, "{}: {r:?} not page aligned", b.name);
                assert_eq!(r.size % PAGE, 0, "{}: {r:?} size not whole pages", b.name);
                assert!(r.size > 0, "{}: empty region", b.name);
                assert!(
                    r.addr >= b.ram.addr && r.end() <= b.ram.end(),
                    "{}: {r:?} outside RAM",
                    b.name
                );
            }
            for (i, a) in regions.iter().enumerate() {
                for c in &regions[i + 1..] {
                    assert!(!a.overlaps(c), "{}: {a:?} overlaps {c:?}", b.name);
                }
            }
            if let Some(r) = b.ramoops {
                assert!(r.record_size + r.console_size + r.pmsg_size <= r.region.size);
            }
        }
    }

    #[test]
    fn names_are_unique_and_found() {
        for (i, b) in BOARDS.iter().enumerate() {
            assert_eq!(board(b.name), Some(b));
            assert!(BOARDS[i + 1..].iter().all(|c| c.name != b.name));
        }
        assert_eq!(board("no-such-board"), None);
    }

    #[test]
    fn x86_cmdline_reserves_ring_ramoops_and_scratch() {
        let line = QEMU_X86_64.cmdline().to_string();
        assert_eq!(
            line,
            "console=ttyS0 panic=1 oops=panic printk.devkmsg=on memmap=1M$0x1e000000 \
             memmap=1M$0x1f000000 memmap=4K$0x1d000000 ramoops.mem_address=0x1f000000 \
             ramoops.mem_size=0x100000 ramoops.record_size=0x10000 \
             ramoops.console_size=0x40000 ramoops.pmsg_size=0x0 ramoops.ecc=16"
        );
        assert_eq!(QEMU_X86_64.ring_spec().to_string(), "mem:0x1e000000:1M");
    }

    #[test]
    fn malta_cmdline_fits_its_255_character_limit() {
        // QEMU adds `rd_start=0x… rd_size=…` (about 40 characters) and the boot test a few
        // words of its own.
        let line = QEMU_MIPSEL_MALTA.cmdline().to_string();
        assert!(line.len() < 160, "{} characters: {line}", line.len());
    }

    #[test]
    fn arm_boards_get_a_device_tree_fragment_and_no_memmap() {
        let b = QEMU_AARCH64_VIRT;
        assert!(!b.cmdline().to_string().contains("memmap"));
        let dts = b.dts_fragment().map(|d| d.to_string()).unwrap_or_default();
        assert!(dts.contains("blackbox-ring@5e000000"), "{dts}");
        assert!(
            dts.contains("reg = <0x0 0x5e000000 0x0 0x100000>;"),
            "{dts}"
        );
        assert!(dts.contains("compatible = \"ramoops\";"), "{dts}");
        assert!(QEMU_X86_64.dts_fragment().is_none());
        let armv7 = QEMU_ARMV7_VIRT.dts_fragment().map(|d| d.to_string());
        assert!(armv7.is_some_and(|d| !d.contains("ramoops")));
    }
}
