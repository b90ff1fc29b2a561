//! Shared set-up of the node-image tests (node_image, node_image_unit, node_image_lab): the
//! release tarball built once per test binary from the workspace's binaries, installs into
//! temporary roots, and snapshots of what a root then holds.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

// Re-exported so each node-image test file needs one `use`; unused in the other test binaries.
#[allow(unused_imports)]
pub use super::{COMMAND_TIMEOUT_SECS, TempDir, repo_root, run, run_ok, sha256};

pub const BINARIES: [&str; 3] = ["vnet-cni", "vnet-agent", "vnetctl"];

/// (installed path below the root, file in the package, mode). The last two are configs: written
/// only when absent.
pub const INSTALLED_FILES: [(&str, &str, u32); 14] = [
    ("opt/cni/bin/vnet-cni", "bin/vnet-cni", 0o755),
    // Installed because an empty root has no loopback or portmap of its own.
    ("opt/cni/bin/loopback", "cni/loopback", 0o755),
    ("opt/cni/bin/portmap", "cni/portmap", 0o755),
    ("usr/local/bin/vnet-agent", "bin/vnet-agent", 0o755),
    ("usr/local/bin/vnetctl", "bin/vnetctl", 0o755),
    (
        "usr/local/libexec/vnet-cni/publish-conflist",
        "libexec/publish-conflist",
        0o755,
    ),
    ("usr/local/libexec/vnet-cni/install.sh", "install.sh", 0o755),
    ("usr/local/share/doc/vnet-cni/VERSION", "VERSION", 0o644),
    (
        "usr/local/share/doc/vnet-cni/install-node-image.md",
        "doc/install-node-image.md",
        0o644,
    ),
    (
        "etc/sysctl.d/90-vnet-cni.conf",
        "sysctl/90-vnet-cni.conf",
        0o644,
    ),
    (
        "etc/systemd/system/vnet-agent.service",
        "systemd/vnet-agent.service",
        0o644,
    ),
    ("etc/vnet-cni/agent.toml", "etc/agent.toml", 0o644),
    ("etc/vnet-cni/agent.env", "etc/agent.env", 0o644),
    (
        "etc/vnet-cni/00-vnet-cni.conflist",
        "etc/00-vnet-cni.conflist",
        0o644,
    ),
];
pub const WANTS_LINK: &str = "etc/systemd/system/multi-user.target.wants/vnet-agent.service";
pub const UNIT_PATH: &str = "/etc/systemd/system/vnet-agent.service";
pub const MANIFEST: &str = "var/lib/vnet-cni/install-manifest";
pub const STATE_DIR: &str = "var/lib/vnet-cni";

pub fn node_image_dir() -> PathBuf {
    repo_root().join("deploy/node-image")
}

pub fn have(tool: &str) -> bool {
    run("sh", &["-c", &format!("command -v {tool}")], &[])
        .status
        .success()
}

pub fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The release tarball, built once per test run, and its unpacked directory.
pub struct Package {
    pub tarball: PathBuf,
    /// `.../vnet-cni-<version>-linux-amd64`
    pub dir: PathBuf,
    pub version: String,
}

/// Builds the package into `<target>/tmp/node-image-<pid>`: kept out of /tmp because of the
/// binaries' size, and left there after the run (statics are not dropped); the next run removes
/// the directories of processes that are gone.
pub fn package() -> &'static Package {
    static PACKAGE: OnceLock<Package> = OnceLock::new();
    PACKAGE.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_stale_package_dirs(base);
        let work = base.join(format!("node-image-{}", std::process::id()));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).expect("create package work dir");
        let bin_dir = binaries_to_package(&work);
        let out_dir = work.join("dist");
        let stdout = run_ok(
            "bash",
            &[
                node_image_dir().join("release.sh").to_str().expect("utf-8"),
                "--bin-dir",
                bin_dir.to_str().expect("utf-8"),
                "--out-dir",
                out_dir.to_str().expect("utf-8"),
            ],
            &[],
        );
        let tarball = PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("release.sh prints the tarball")
                .trim(),
        );
        let name = tarball
            .file_name()
            .and_then(|n| n.to_str())
            .expect("tarball name")
            .to_owned();
        let version = name
            .strip_prefix("vnet-cni-")
            .and_then(|n| n.strip_suffix("-linux-amd64.tar.gz"))
            .unwrap_or_else(|| {
                panic!("tarball {name} is not vnet-cni-<version>-linux-amd64.tar.gz")
            })
            .to_owned();
        let unpacked = work.join("unpacked");
        fs::create_dir_all(&unpacked).expect("create unpack dir");
        run_ok(
            "tar",
            &[
                "-xzf",
                tarball.to_str().expect("utf-8"),
                "-C",
                unpacked.to_str().expect("utf-8"),
            ],
            &[],
        );
        let dir = unpacked.join(name.trim_end_matches(".tar.gz"));
        assert!(dir.is_dir(), "the tarball unpacks into {}", dir.display());
        Package {
            tarball,
            dir,
            version,
        }
    })
}

pub fn remove_stale_package_dirs(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("node-image-")
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The workspace's own (debug) binaries when all of them are built (tests/run.sh builds them
/// first); otherwise small stand-ins, since what is tested here is packaging and installing.
pub fn binaries_to_package(work: &Path) -> PathBuf {
    let target_bin_dir = Path::new(env!("CARGO_BIN_EXE_vnetctl"))
        .parent()
        .expect("vnetctl has a directory")
        .to_path_buf();
    if BINARIES.iter().all(|b| target_bin_dir.join(b).is_file()) {
        // Without their debug info (five times smaller), so packing and hashing stay quick.
        let stripped = work.join("bin");
        fs::create_dir_all(&stripped).expect("create bin dir");
        for bin in BINARIES {
            let (src, dst) = (target_bin_dir.join(bin), stripped.join(bin));
            let strip = run(
                "strip",
                &[
                    "--strip-debug",
                    "-o",
                    dst.to_str().expect("utf-8"),
                    src.to_str().expect("utf-8"),
                ],
                &[],
            );
            if !strip.status.success() {
                fs::copy(&src, &dst).expect("copy binary");
            }
        }
        return stripped;
    }
    eprintln!(
        "node_image: {} lacks some of {BINARIES:?}; packaging stand-ins \
         (run `cargo build --workspace --bins` to package the real debug binaries)",
        target_bin_dir.display()
    );
    let stand_ins = work.join("stand-in-bin");
    fs::create_dir_all(&stand_ins).expect("create stand-in dir");
    for bin in BINARIES {
        let path = stand_ins.join(bin);
        fs::write(&path, format!("#!/bin/sh\necho '{bin} stand-in'\n")).expect("write stand-in");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod stand-in");
    }
    stand_ins
}

/// A private copy of the unpacked package, for tests that change it.
pub fn copy_of_package(into: &Path) -> PathBuf {
    let copy = into.join("package");
    run_ok(
        "cp",
        &[
            "-a",
            package().dir.to_str().expect("utf-8"),
            copy.to_str().expect("utf-8"),
        ],
        &[],
    );
    copy
}

pub fn install_sh(package_dir: &Path, args: &[&str]) -> Output {
    let script = package_dir.join("install.sh");
    let mut all = vec![script.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    // Plain `sh` (dash on Debian): the installer must not need bash.
    run("sh", &all, &[])
}

pub fn install_ok(package_dir: &Path, root: &Path, extra: &[&str]) -> String {
    let mut args = vec!["install", "--destdir", root.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    let out = install_sh(package_dir, &args);
    assert!(
        out.status.success(),
        "install.sh failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn uninstall_ok(package_dir: &Path, root: &Path, extra: &[&str]) -> String {
    let mut args = vec!["uninstall", "--destdir", root.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    let out = install_sh(package_dir, &args);
    assert!(
        out.status.success(),
        "install.sh uninstall failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File { sha256: String },
    Link { target: PathBuf },
}

/// Everything a user could see change about a path: content, mode, owner, inode and times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub inode: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

/// Every path below `root` (relative, without the root itself).
pub fn snapshot(root: &Path) -> BTreeMap<String, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("dir entry").path();
            let meta = fs::symlink_metadata(&path).expect("metadata");
            let kind = if meta.file_type().is_symlink() {
                Kind::Link {
                    target: fs::read_link(&path).expect("readlink"),
                }
            } else if meta.is_dir() {
                Kind::Dir
            } else {
                Kind::File {
                    sha256: sha256(&path),
                }
            };
            let rel = path
                .strip_prefix(root)
                .expect("below root")
                .to_string_lossy()
                .into_owned();
            out.insert(
                rel,
                Entry {
                    kind: kind.clone(),
                    mode: meta.permissions().mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    inode: meta.ino(),
                    mtime: (meta.mtime(), meta.mtime_nsec()),
                    ctime: (meta.ctime(), meta.ctime_nsec()),
                },
            );
            if kind == Kind::Dir {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Every directory leading to `paths` (for an install into an empty root).
pub fn parents_of<'a>(paths: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    let mut dirs = BTreeSet::new();
    for path in paths {
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(dir.to_string_lossy().into_owned());
            parent = dir.parent();
        }
    }
    dirs
}

pub fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

pub fn expected_sums(package_dir: &Path) -> BTreeMap<String, String> {
    fs::read_to_string(package_dir.join("SHA256SUMS"))
        .expect("read SHA256SUMS")
        .lines()
        .map(|line| {
            let (sum, path) = line.split_once("  ").expect("sha256sum line");
            (path.to_owned(), sum.to_owned())
        })
        .collect()
}

/// A "new release": the plugin binary changed, SHA256SUMS and VERSION regenerated.
pub fn next_release(into: &Path) -> PathBuf {
    let next = copy_of_package(into);
    let mut plugin = fs::OpenOptions::new()
        .append(true)
        .open(next.join("bin/vnet-cni"))
        .unwrap();
    plugin.write_all(b"\nnext release\n").unwrap();
    drop(plugin);
    fs::write(next.join("VERSION"), "vnet-cni 9.9.9-gnext\n").unwrap();
    run_ok(
        "sh",
        &[
            "-c",
            &format!(
                "cd '{}' && find . -type f ! -name SHA256SUMS | sed 's|^\\./||' | LC_ALL=C sort | xargs sha256sum > SHA256SUMS",
                next.display()
            ),
        ],
        &[],
    );
    next
}
