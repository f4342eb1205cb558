//! The guest's boot image, from Debian's packages: the stock kernel (`linux-image-FLAVOUR` of
//! the board's Debian architecture), the modules it needs that are not built in (the NIC
//! driver; ramoops and its dependencies where the kernel has pstore as modules), busybox-static,
//! the agent, the test's `/init` (`qemu/init.sh`), the boards' init script
//! (`board-support/overlay/etc/init.d/S50blackbox`), the server's CA, the device identity and the
//! test's settings, in a newc cpio archive made by `cpio`. For `reserved-memory` boards the
//! machine's device tree, dumped by QEMU, gets the board's nodes (`dtc`).
//!
//! Downloads are cached in `target/debs` and unpacked once into `target/qemu/pkgs`.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use blackbox_board::{Board, Qemu, Reserve};

use crate::{apt, project_root, run_cmd, show};

/// What QEMU boots.
pub(crate) struct Image {
    /// The kernel image.
    pub(crate) kernel: PathBuf,
    /// The initramfs (an uncompressed newc cpio archive).
    pub(crate) initrd: PathBuf,
    /// The device tree with the board's `reserved-memory` nodes, for `DeviceTree` boards.
    pub(crate) dtb: Option<PathBuf>,
}

/// Whether the board's stock kernel has pstore/ramoops (as modules `/init` loads).
pub(crate) fn has_pstore(board: &Board, q: &Qemu) -> bool {
    q.stock_kernel_has_ramoops && board.ramoops.is_some()
}

/// What goes into the image besides the Debian packages.
pub(crate) struct Contents<'a> {
    /// The agent built for the board's CPU.
    pub(crate) agent: &'a Path,
    /// The server's CA certificate.
    pub(crate) ca: &'a Path,
    /// The agent's state directory on the host; its `identity/` is copied.
    pub(crate) state: &'a Path,
    /// `KEY=value` settings for `/init` (`/etc/qemu-test.env`).
    pub(crate) env: &'a [(&'a str, String)],
}

/// Logos limits that let the test's apps through (the defaults would drop most of the
/// footprint test's lines).
const AGENT_TOML: &str = "\
[logos.default]
burst_bytes = 67108864
daily_bytes = 67108864
";

/// `/etc/default/blackbox` for the init script: this image's agent is in /sbin.
const INIT_DEFAULTS: &str = "AGENT=/sbin/blackbox-agent\nRESPAWN_DELAY=2\n";

/// The kernel modules `/init` loads for the board's NIC (the first name is the transport,
/// where there is one).
fn nic_modules(nic: &str) -> Result<&'static [&'static str]> {
    Ok(match nic {
        "e1000" => &["e1000"],
        "virtio-net-pci" => &["virtio_pci", "virtio_net"],
        "pcnet" => &["pcnet32"],
        other => bail!("no kernel module known for the QEMU NIC {other:?}"),
    })
}

/// Builds the image for `board` in `dir`.
pub(crate) fn assemble(board: &Board, q: &Qemu, dir: &Path, with: &Contents<'_>) -> Result<Image> {
    let kernel_tree = kernel_package(q)?;
    let kernel = find_kernel_image(&kernel_tree)?;
    let modules = Modules::read(&kernel_tree)?;
    let busybox = unpacked(&apt::download("busybox-static", q.debian_arch)?)?.join("bin/busybox");

    let mut wanted: Vec<&str> = nic_modules(q.nic)?.to_vec();
    if has_pstore(board, q) {
        wanted.push("ramoops");
    }
    let load = modules.load_order(&wanted)?;

    let root = dir.join("initramfs");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "etc/blackbox",
        "etc/init.d",
        "etc/default",
        "lib/modules",
    ] {
        mkdir(&root.join(d), 0o755)?;
    }
    copy(
        &project_root().join("qemu/init.sh"),
        &root.join("init"),
        0o755,
    )?;
    copy(&busybox, &root.join("bin/busybox"), 0o755)?;
    copy(with.agent, &root.join("sbin/blackbox-agent"), 0o755)?;
    copy(with.ca, &root.join("etc/blackbox/ca.pem"), 0o644)?;
    write(&root.join("etc/blackbox/agent.toml"), AGENT_TOML, 0o644)?;
    // Boot 2 starts the agent with the boards' own init script, as a device does.
    copy(
        &project_root().join("board-support/overlay/etc/init.d/S50blackbox"),
        &root.join("etc/init.d/S50blackbox"),
        0o755,
    )?;
    write(&root.join("etc/default/blackbox"), INIT_DEFAULTS, 0o644)?;
    let mut env = String::new();
    for (k, v) in with.env {
        writeln!(env, "{k}={v}")?;
    }
    write(&root.join("etc/qemu-test.env"), &env, 0o644)?;

    let id_from = with.state.join("identity");
    let id_to = root.join("var/lib/blackbox/identity");
    mkdir(&id_to, 0o700)?;
    for entry in fs::read_dir(&id_from).with_context(|| format!("reading {}", id_from.display()))? {
        let path = entry?.path();
        if let Some(name) = path.file_name() {
            copy(&path, &id_to.join(name), 0o600)?;
        }
    }

    let mut list = String::new();
    for ko in &load {
        let name = ko.file_name().context("a module without a file name")?;
        copy(ko, &root.join("lib/modules").join(name), 0o644)?;
        list.push_str(&name.to_string_lossy());
        // busybox insmod does not read /proc/cmdline: a module's parameters go on its line.
        // ramoops finds a device-tree board's region in the device tree.
        if ko.file_stem().is_some_and(|s| s == "ramoops")
            && board.reserve == Reserve::Memmap
            && let Some(p) = board.ramoops_params()
        {
            write!(list, " {p}")?;
        }
        list.push('\n');
    }
    write(&root.join("lib/modules/load"), &list, 0o644)?;

    let initrd = dir.join("initrd.cpio");
    cpio(&root, &initrd)?;
    let dtb = match board.reserve {
        Reserve::DeviceTree => Some(device_tree(board, q, dir)?),
        Reserve::Memmap => None,
    };
    Ok(Image {
        kernel,
        initrd,
        dtb,
    })
}

/// The kernel package for the board's flavour, unpacked: the metapackage
/// (`linux-image-FLAVOUR`) names the versioned one in its Depends.
fn kernel_package(q: &Qemu) -> Result<PathBuf> {
    let meta = apt::download(&format!("linux-image-{}", q.kernel_flavour), q.debian_arch)?;
    let depends = apt::field(&meta, "Depends")?;
    let name = depends
        .split([',', ' ', '|'])
        .find(|w| w.starts_with("linux-image-"))
        .with_context(|| format!("{} depends on no linux-image-*: {depends}", meta.display()))?;
    unpacked(&apt::download(name, q.debian_arch)?)
}

/// `deb` unpacked under `target/qemu/pkgs/`.
fn unpacked(deb: &Path) -> Result<PathBuf> {
    let stem = deb.file_stem().context("a .deb without a name")?;
    let dest = project_root().join("target/qemu/pkgs").join(stem);
    fs::create_dir_all(project_root().join("target/qemu/pkgs"))?;
    apt::unpack(deb, &dest)?;
    Ok(dest)
}

/// `boot/vmlinuz-*` (or `boot/vmlinux-*`, as Malta's kernel is shipped).
fn find_kernel_image(tree: &Path) -> Result<PathBuf> {
    let boot = tree.join("boot");
    let mut found: Vec<PathBuf> = fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") || n.starts_with("vmlinux-"))
        })
        .collect();
    found.sort();
    found
        .pop()
        .with_context(|| format!("no vmlinuz-* or vmlinux-* in {}", boot.display()))
}

/// The kernel package's modules: where each is, which are built in, what each depends on.
struct Modules {
    files: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
}

/// A module's name as the kernel knows it: the file's stem with `-` as `_`.
fn module_name(file: &str) -> String {
    file.trim_end_matches(".ko").replace('-', "_")
}

impl Modules {
    fn read(tree: &Path) -> Result<Self> {
        let base = tree.join("lib/modules");
        let version = fs::read_dir(&base)
            .with_context(|| format!("reading {}", base.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.is_dir())
            .with_context(|| format!("no kernel version directory in {}", base.display()))?;
        let mut files = HashMap::new();
        let mut stack = vec![version.join("kernel")];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
                let path = e?.path();
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                match name {
                    _ if path.is_dir() => stack.push(path),
                    Some(n) if n.ends_with(".ko") => {
                        files.insert(module_name(&n), path);
                    }
                    Some(n) if n.contains(".ko.") => bail!(
                        "{} is compressed; this kernel package needs a decompression step",
                        path.display()
                    ),
                    _ => {}
                }
            }
        }
        let builtin_list = version.join("modules.builtin");
        let builtin = fs::read_to_string(&builtin_list)
            .with_context(|| format!("reading {}", builtin_list.display()))?
            .lines()
            .filter_map(|l| l.rsplit('/').next())
            .map(module_name)
            .collect();
        Ok(Self { files, builtin })
    }

    /// The module files to load for `wanted`, dependencies first; built-in ones are left out.
    fn load_order(&self, wanted: &[&str]) -> Result<Vec<PathBuf>> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        for name in wanted {
            self.visit(name, &mut done, &mut order, 0)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        done: &mut HashSet<String>,
        order: &mut Vec<PathBuf>,
        depth: usize,
    ) -> Result<()> {
        if depth > 32 {
            bail!("module dependencies nest too deep at {name}");
        }
        if self.builtin.contains(name) || !done.insert(name.to_owned()) {
            return Ok(());
        }
        let Some(path) = self.files.get(name) else {
            bail!("the kernel has {name} neither built in nor as a module");
        };
        for dep in depends(path)? {
            self.visit(&dep, done, order, depth + 1)?;
        }
        order.push(path.clone());
        Ok(())
    }
}

/// The `depends=` entry of a module's `.modinfo` section (NUL-separated `key=value` strings;
/// read from the file's bytes, so it works for any CPU's modules).
fn depends(ko: &Path) -> Result<Vec<String>> {
    let bytes = fs::read(ko).with_context(|| format!("reading {}", ko.display()))?;
    let key = b"\0depends=";
    let Some(at) = bytes.windows(key.len()).position(|w| w == key) else {
        return Ok(Vec::new());
    };
    let value = &bytes[at + key.len()..];
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    Ok(String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(module_name)
        .collect())
}

/// The machine's own device tree (QEMU's `dumpdtb`) with the board's `reserved-memory` nodes.
fn device_tree(board: &Board, q: &Qemu, dir: &Path) -> Result<PathBuf> {
    let fragment = board
        .dts_fragment()
        .context("a device-tree board without a fragment")?;
    let base = dir.join("machine.dtb");
    let mut dump = Command::new(q.system);
    dump.arg("-M")
        .arg(format!("{},dumpdtb={}", q.machine, base.display()))
        .args(["-m", &q.ram_mib.to_string(), "-display", "none"]);
    if let Some(cpu) = q.cpu {
        dump.args(["-cpu", cpu]);
    }
    run_cmd(dump.stdout(Stdio::null()))?;
    let dts = apt::output(
        Command::new("dtc")
            .args(["-q", "-I", "dtb", "-O", "dts"])
            .arg(&base),
    )?;
    let source = dir.join("board.dts");
    write(&source, &format!("{dts}\n{fragment}"), 0o644)?;
    let dtb = dir.join("board.dtb");
    run_cmd(
        Command::new("dtc")
            .args(["-q", "-I", "dts", "-O", "dtb", "-o"])
            .arg(&dtb)
            .arg(&source),
    )?;
    Ok(dtb)
}

/// Every file and directory under `root` into a newc archive, owned by root.
fn cpio(root: &Path, out: &Path) -> Result<()> {
    let mut names = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<PathBuf> = fs::read_dir(root.join(&rel))?
            .filter_map(|e| e.ok().map(|e| rel.join(e.file_name())))
            .collect();
        entries.sort();
        for e in entries {
            names.push(e.to_string_lossy().into_owned());
            if root.join(&e).is_dir() {
                stack.push(e);
            }
        }
    }
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut cmd = Command::new("cpio");
    cmd.args(["--quiet", "-o", "-H", "newc", "-R", "0:0"])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(file);
    let shown = show(&cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    let mut stdin = child.stdin.take().context("cpio's stdin")?;
    stdin.write_all((names.join("\n") + "\n").as_bytes())?;
    drop(stdin);
    let status = child.wait()?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

fn mkdir(dir: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", dir.display()))
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", to.display()))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}
