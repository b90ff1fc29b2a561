//! The node-image release and installer (deploy/node-image): builds the release tarball from the
//! binaries already in the target directory (`release.sh --bin-dir`, no release build), installs it
//! into temporary roots with `install.sh --destdir` and checks what a node image would then hold.
//! Nothing here touches the host's own /etc, /opt or /usr, so no root is needed, except for the
//! last test: an in-place upgrade of one node of the lab (network namespaces) while its pods answer.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

mod common;

/// Every external command runs under coreutils `timeout` with this limit.
const COMMAND_TIMEOUT_SECS: u32 = 300;
const BINARIES: [&str; 3] = ["vnet-cni", "vnet-agent", "vnetctl"];

/// (installed path below the root, file in the package, mode). The last two are configs: written
/// only when absent.
const INSTALLED_FILES: [(&str, &str, u32); 14] = [
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
const WANTS_LINK: &str = "etc/systemd/system/multi-user.target.wants/vnet-agent.service";
const UNIT_PATH: &str = "/etc/systemd/system/vnet-agent.service";
const MANIFEST: &str = "var/lib/vnet-cni/install-manifest";
const STATE_DIR: &str = "var/lib/vnet-cni";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn node_image_dir() -> PathBuf {
    repo_root().join("deploy/node-image")
}

/// Runs `program args` under `timeout`, returning the output whatever the exit status.
fn run(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new("timeout")
        .arg(COMMAND_TIMEOUT_SECS.to_string())
        .arg(program)
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Like [`run`], but the command must succeed; returns its stdout.
fn run_ok(program: &str, args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = run(program, args, envs);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(tool: &str) -> bool {
    run("sh", &["-c", &format!("command -v {tool}")], &[])
        .status
        .success()
}

fn sha256(path: &Path) -> String {
    let out = run_ok("sha256sum", &[path.to_str().expect("utf-8 path")], &[]);
    out.split_whitespace()
        .next()
        .expect("sha256sum prints a hash")
        .to_owned()
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// A directory removed on drop, even when the test panics.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "vnet-node-image-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The release tarball, built once per test run, and its unpacked directory.
struct Package {
    tarball: PathBuf,
    /// `.../vnet-cni-<version>-linux-amd64`
    dir: PathBuf,
    version: String,
}

/// Builds the package into `<target>/tmp/node-image-<pid>`: kept out of /tmp because of the
/// binaries' size, and left there after the run (statics are not dropped); the next run removes
/// the directories of processes that are gone.
fn package() -> &'static Package {
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

fn remove_stale_package_dirs(base: &Path) {
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
fn binaries_to_package(work: &Path) -> PathBuf {
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
fn copy_of_package(into: &Path) -> PathBuf {
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

fn install_sh(package_dir: &Path, args: &[&str]) -> Output {
    let script = package_dir.join("install.sh");
    let mut all = vec![script.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    // Plain `sh` (dash on Debian): the installer must not need bash.
    run("sh", &all, &[])
}

fn install_ok(package_dir: &Path, root: &Path, extra: &[&str]) -> String {
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

fn uninstall_ok(package_dir: &Path, root: &Path, extra: &[&str]) -> String {
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
enum Kind {
    Dir,
    File { sha256: String },
    Link { target: PathBuf },
}

/// Everything a user could see change about a path: content, mode, owner, inode and times.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    inode: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// Every path below `root` (relative, without the root itself).
fn snapshot(root: &Path) -> BTreeMap<String, Entry> {
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
fn parents_of<'a>(paths: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
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

fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn expected_sums(package_dir: &Path) -> BTreeMap<String, String> {
    fs::read_to_string(package_dir.join("SHA256SUMS"))
        .expect("read SHA256SUMS")
        .lines()
        .map(|line| {
            let (sum, path) = line.split_once("  ").expect("sha256sum line");
            (path.to_owned(), sum.to_owned())
        })
        .collect()
}

#[test]
fn release_tarball_holds_every_artifact_with_checksums_that_verify() {
    let pkg = package();
    let workspace_version = env!("CARGO_PKG_VERSION");
    // <workspace version>-g<commit> in a git checkout (the tests run in one).
    let (crate_version, commit) = pkg
        .version
        .rsplit_once("-g")
        .unwrap_or_else(|| panic!("version {} is <workspace version>-g<commit>", pkg.version));
    assert_eq!(crate_version, workspace_version);
    assert!(
        commit.len() == 8 && commit.chars().all(|c| c.is_ascii_hexdigit()),
        "commit {commit}"
    );

    // The published checksum of the tarball itself.
    let out_dir = pkg.tarball.parent().expect("tarball dir");
    let sum_file = format!(
        "{}.sha256",
        pkg.tarball.file_name().unwrap().to_string_lossy()
    );
    let check = run(
        "sh",
        &[
            "-c",
            &format!(
                "cd '{}' && sha256sum --check --strict {sum_file}",
                out_dir.display()
            ),
        ],
        &[],
    );
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let listing = run_ok("tar", &["-tzf", pkg.tarball.to_str().unwrap()], &[]);
    let top = pkg.dir.file_name().unwrap().to_string_lossy().into_owned();
    let files: BTreeSet<String> = listing
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(|l| {
            l.strip_prefix(&format!("{top}/"))
                .unwrap_or_else(|| panic!("{l} outside {top}/"))
                .to_owned()
        })
        .collect();
    let expected: BTreeSet<String> = [
        "SHA256SUMS",
        "VERSION",
        "install.sh",
        "bin/vnet-cni",
        "bin/vnet-agent",
        "bin/vnetctl",
        "cni/loopback",
        "cni/portmap",
        "etc/agent.toml",
        "etc/agent.env",
        "etc/00-vnet-cni.conflist",
        "systemd/vnet-agent.service",
        "sysctl/90-vnet-cni.conf",
        "libexec/publish-conflist",
        "doc/install-node-image.md",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(files, expected, "tarball contents");
    assert!(
        !files.iter().any(|f| f.contains("mockcloud")),
        "vnet-mockcloud is not shipped"
    );

    // SHA256SUMS covers every other file, and every sum is right.
    let sums = expected_sums(&pkg.dir);
    let listed: BTreeSet<String> = sums.keys().cloned().collect();
    let mut without_sums = expected.clone();
    without_sums.remove("SHA256SUMS");
    assert_eq!(listed, without_sums, "SHA256SUMS lists every file");
    for (file, sum) in &sums {
        assert_eq!(&sha256(&pkg.dir.join(file)), sum, "checksum of {file}");
    }
    for exe in [
        "install.sh",
        "libexec/publish-conflist",
        "bin/vnet-cni",
        "bin/vnet-agent",
        "bin/vnetctl",
    ] {
        assert_eq!(mode(&pkg.dir.join(exe)), 0o755, "{exe} is executable");
    }

    let version_file = fs::read_to_string(pkg.dir.join("VERSION")).unwrap();
    assert_eq!(
        version_file.lines().next(),
        Some(format!("vnet-cni {}", pkg.version).as_str())
    );

    // The conflist template: vnet-cni, then portmap for hostPorts.
    let conflist: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(pkg.dir.join("etc/00-vnet-cni.conflist")).unwrap(),
    )
    .expect("conflist is JSON");
    assert_eq!(conflist["cniVersion"], "1.0.0");
    assert_eq!(
        conflist["cniVersions"],
        serde_json::json!(["1.0.0", "1.1.0"])
    );
    assert_eq!(conflist["name"], "vnet-cni");
    let plugins = conflist["plugins"].as_array().expect("plugins");
    assert_eq!(plugins.len(), 2);
    assert_eq!(plugins[0]["type"], "vnet-cni");
    assert_eq!(plugins[1]["type"], "portmap");
    assert_eq!(plugins[1]["capabilities"]["portMappings"], true);
    assert_eq!(plugins[1]["snat"], true);
}

#[test]
fn install_into_an_empty_root_puts_every_file_in_place_with_its_mode_and_checksum() {
    let pkg = package();
    let tmp = TempDir::new("install");
    let root = tmp.path().join("root");
    install_ok(&pkg.dir, &root, &[]);

    let tree = snapshot(&root);
    let sums = expected_sums(&pkg.dir);
    for (installed, source, want_mode) in INSTALLED_FILES {
        let entry = tree
            .get(installed)
            .unwrap_or_else(|| panic!("{installed} is installed"));
        assert_eq!(
            entry.kind,
            Kind::File {
                sha256: sums[source].clone()
            },
            "{installed} has the content of {source}"
        );
        assert_eq!(entry.mode, want_mode, "mode of {installed}");
        if running_as_root() {
            assert_eq!(
                (entry.uid, entry.gid),
                (0, 0),
                "{installed} is owned by root"
            );
        }
    }
    assert_eq!(
        tree[WANTS_LINK].kind,
        Kind::Link {
            target: PathBuf::from(UNIT_PATH)
        },
        "the unit is enabled for multi-user.target"
    );
    assert_eq!(
        tree[STATE_DIR].mode, 0o700,
        "the state directory is private"
    );
    assert_eq!(
        tree["etc/cni/net.d"].kind,
        Kind::Dir,
        "the CNI config directory exists"
    );
    assert!(
        !tree.contains_key("etc/cni/net.d/00-vnet-cni.conflist"),
        "the conflist is published by the agent when ready, not by the installer"
    );

    // Nothing else: the files, the link, the manifest and the directories holding them.
    let mut expected_paths: BTreeSet<String> = INSTALLED_FILES
        .iter()
        .map(|(p, _, _)| p.to_string())
        .collect();
    expected_paths.insert(WANTS_LINK.into());
    expected_paths.insert(MANIFEST.into());
    expected_paths.insert("etc/cni/net.d".into());
    let dirs = parents_of(expected_paths.iter().map(String::as_str));
    expected_paths.extend(dirs);
    let actual: BTreeSet<String> = tree.keys().cloned().collect();
    assert_eq!(actual, expected_paths, "the installed tree");

    // The manifest names every file it installed, with its checksum.
    let manifest = fs::read_to_string(root.join(MANIFEST)).unwrap();
    for (installed, source, _) in INSTALLED_FILES {
        assert!(
            manifest.contains(&format!("{} /{installed}\n", sums[source])),
            "manifest lists /{installed}:\n{manifest}"
        );
    }
}

#[test]
fn installing_twice_changes_nothing_and_keeps_the_operators_config() {
    let pkg = package();
    let tmp = TempDir::new("twice");
    let root = tmp.path().join("root");
    install_ok(&pkg.dir, &root, &[]);
    let first = snapshot(&root);

    let output = install_ok(&pkg.dir, &root, &[]);
    assert!(
        !output.contains("installed /") && !output.contains("wrote /"),
        "a second run writes nothing:\n{output}"
    );
    assert_eq!(snapshot(&root), first, "a second install changed the root");

    // An operator's edit survives a re-install (config is written only when absent).
    let config = root.join("etc/vnet-cni/agent.toml");
    let edited = "node_name = \"edited-by-operator\"\n";
    fs::write(&config, edited).unwrap();
    install_ok(&pkg.dir, &root, &[]);
    assert_eq!(fs::read_to_string(&config).unwrap(), edited);
}

#[test]
fn the_nodes_own_loopback_and_portmap_are_kept_and_survive_uninstall() {
    let pkg = package();
    let tmp = TempDir::new("own-plugins");
    let root = tmp.path().join("root");
    let bin = root.join("opt/cni/bin");
    fs::create_dir_all(&bin).unwrap();
    let own = "#!/bin/sh\necho the node's own portmap\n";
    fs::write(bin.join("portmap"), own).unwrap();
    fs::set_permissions(bin.join("portmap"), fs::Permissions::from_mode(0o755)).unwrap();

    let output = install_ok(&pkg.dir, &root, &[]);
    assert!(
        output.contains("kept the node's own /opt/cni/bin/portmap"),
        "{output}"
    );
    assert_eq!(fs::read_to_string(bin.join("portmap")).unwrap(), own);
    // loopback was missing: installed from the package.
    assert_eq!(
        sha256(&bin.join("loopback")),
        expected_sums(&pkg.dir)["cni/loopback"]
    );
    let manifest = fs::read_to_string(root.join(MANIFEST)).unwrap();
    assert!(manifest.contains(" /opt/cni/bin/loopback\n"), "{manifest}");
    assert!(!manifest.contains("/opt/cni/bin/portmap"), "{manifest}");

    // Uninstall removes only what it installed.
    uninstall_ok(&pkg.dir, &root, &[]);
    assert_eq!(fs::read_to_string(bin.join("portmap")).unwrap(), own);
    assert!(!bin.join("loopback").exists());
}

#[test]
fn upgrading_from_the_10_conflist_name_moves_the_template_to_00() {
    let pkg = package();
    let tmp = TempDir::new("legacy-name");
    for edited in [false, true] {
        let root = tmp.path().join(format!("root-{edited}"));
        install_ok(&pkg.dir, &root, &[]);
        // Make the root look like an earlier release's: the template under the old name.
        let conf = root.join("etc/vnet-cni");
        fs::rename(
            conf.join("00-vnet-cni.conflist"),
            conf.join("10-vnet-cni.conflist"),
        )
        .unwrap();
        let manifest_path = root.join(MANIFEST);
        let manifest = fs::read_to_string(&manifest_path).unwrap();
        fs::write(
            &manifest_path,
            manifest.replace(
                "/etc/vnet-cni/00-vnet-cni.conflist",
                "/etc/vnet-cni/10-vnet-cni.conflist",
            ),
        )
        .unwrap();
        let operators = "{\"name\": \"vnet-cni\", \"edited\": true}\n";
        if edited {
            fs::write(conf.join("10-vnet-cni.conflist"), operators).unwrap();
        }

        install_ok(&pkg.dir, &root, &[]);
        assert!(
            !conf.join("10-vnet-cni.conflist").exists(),
            "edited={edited}"
        );
        let new = fs::read_to_string(conf.join("00-vnet-cni.conflist")).unwrap();
        if edited {
            assert_eq!(new, operators, "the operator's edits move to the new name");
        } else {
            assert_eq!(
                new,
                fs::read_to_string(pkg.dir.join("etc/00-vnet-cni.conflist")).unwrap()
            );
        }
        let manifest = fs::read_to_string(&manifest_path).unwrap();
        assert!(!manifest.contains("10-vnet-cni"), "{manifest}");
        // A re-run changes nothing more.
        let before = snapshot(&root);
        install_ok(&pkg.dir, &root, &[]);
        assert_eq!(snapshot(&root), before);
        // An edited template is kept by uninstall, an unedited one goes.
        uninstall_ok(&pkg.dir, &root, &[]);
        assert_eq!(conf.join("00-vnet-cni.conflist").exists(), edited);
    }
}

#[test]
fn a_tampered_package_is_refused_before_anything_is_touched() {
    let tmp = TempDir::new("tampered");

    // A changed plugin binary: nothing at all is installed into an empty root.
    let changed = copy_of_package(tmp.path());
    let mut plugin = fs::OpenOptions::new()
        .append(true)
        .open(changed.join("bin/vnet-cni"))
        .unwrap();
    plugin.write_all(b"tampered").unwrap();
    drop(plugin);
    let empty_root = tmp.path().join("empty-root");
    let out = install_sh(&changed, &["--destdir", empty_root.to_str().unwrap()]);
    assert!(!out.status.success(), "install accepted a tampered package");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bin/vnet-cni: FAILED"),
        "names the bad file: {stderr}"
    );
    assert!(
        stderr.contains("refusing to install"),
        "says it refused: {stderr}"
    );
    assert!(
        snapshot(&empty_root).is_empty(),
        "a refused install wrote into the root"
    );

    // Over an existing install: the installed files stay exactly as they were.
    let root = tmp.path().join("root");
    install_ok(&package().dir, &root, &[]);
    let before = snapshot(&root);
    let out = install_sh(&changed, &["--destdir", root.to_str().unwrap()]);
    assert!(!out.status.success(), "install accepted a tampered package");
    assert_eq!(
        snapshot(&root),
        before,
        "a refused install changed the root"
    );

    // A file the checksums do not list is refused too.
    let extra = tmp.path().join("extra");
    run_ok(
        "cp",
        &[
            "-a",
            package().dir.to_str().unwrap(),
            extra.to_str().unwrap(),
        ],
        &[],
    );
    fs::write(extra.join("bin/unlisted"), "#!/bin/sh\n").unwrap();
    let out = install_sh(&extra, &["--destdir", empty_root.to_str().unwrap()]);
    assert!(!out.status.success(), "install accepted an unlisted file");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bin/unlisted"));
    assert!(snapshot(&empty_root).is_empty());
}

#[test]
fn uninstall_leaves_only_the_state_and_purge_removes_it() {
    let pkg = package();
    let tmp = TempDir::new("uninstall");
    let root = tmp.path().join("root");
    install_ok(&pkg.dir, &root, &[]);

    // What a running agent leaves: allocation state, a spooled release, the published conflist.
    let state = root.join(STATE_DIR);
    fs::create_dir_all(state.join("spool")).unwrap();
    fs::write(state.join("allocations.json"), "{\"allocations\":[]}\n").unwrap();
    fs::write(state.join("spool/release-1.json"), "{}\n").unwrap();
    fs::copy(
        root.join("etc/vnet-cni/00-vnet-cni.conflist"),
        root.join("etc/cni/net.d/00-vnet-cni.conflist"),
    )
    .unwrap();

    // Uninstall through the installed copy of install.sh, as an operator would later.
    let installed_installer = root.join("usr/local/libexec/vnet-cni");
    uninstall_ok(&installed_installer, &root, &[]);
    let left: BTreeSet<String> = snapshot(&root).into_keys().collect();
    let expected: BTreeSet<String> = [
        "var",
        "var/lib",
        STATE_DIR,
        "var/lib/vnet-cni/allocations.json",
        "var/lib/vnet-cni/spool",
        "var/lib/vnet-cni/spool/release-1.json",
        // What uninstall kept, so that a later --purge can still remove it.
        MANIFEST,
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(
        left, expected,
        "uninstall leaves the state and nothing else"
    );

    // Uninstalling again is harmless; purging removes the state too.
    uninstall_ok(&pkg.dir, &root, &[]);
    uninstall_ok(&pkg.dir, &root, &["--purge"]);
    assert!(
        snapshot(&root).is_empty(),
        "purge leaves nothing: {:?}",
        snapshot(&root).keys()
    );
}

#[test]
fn uninstall_keeps_an_edited_config_until_purged() {
    let pkg = package();
    let tmp = TempDir::new("edited");
    let root = tmp.path().join("root");
    install_ok(&pkg.dir, &root, &[]);
    let config = root.join("etc/vnet-cni/agent.toml");
    fs::write(&config, "log_level = \"debug\"\n").unwrap();

    let output = uninstall_ok(&pkg.dir, &root, &[]);
    assert!(output.contains("kept /etc/vnet-cni/agent.toml"), "{output}");
    assert_eq!(
        fs::read_to_string(&config).unwrap(),
        "log_level = \"debug\"\n"
    );
    let left: BTreeSet<String> = snapshot(&root).into_keys().collect();
    let expected: BTreeSet<String> = [
        "etc",
        "etc/vnet-cni",
        "etc/vnet-cni/agent.toml",
        "var",
        "var/lib",
        STATE_DIR,
        MANIFEST,
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(
        left, expected,
        "uninstall keeps the edited config (and a note of it)"
    );

    uninstall_ok(&pkg.dir, &root, &["--purge"]);
    assert!(
        snapshot(&root).is_empty(),
        "purge leaves nothing: {:?}",
        snapshot(&root).keys()
    );
}

/// A "new release": the plugin binary changed, SHA256SUMS and VERSION regenerated.
fn next_release(into: &Path) -> PathBuf {
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

#[test]
fn upgrade_replaces_binaries_by_rename_keeps_config_and_state_and_rolls_back() {
    let pkg = package();
    let tmp = TempDir::new("upgrade");
    let root = tmp.path().join("root");
    install_ok(&pkg.dir, &root, &[]);
    let plugin = root.join("opt/cni/bin/vnet-cni");
    let old_inode = fs::metadata(&plugin).unwrap().ino();
    let old_sum = sha256(&plugin);
    let config = root.join("etc/vnet-cni/agent.toml");
    fs::write(&config, "mtu = 1400\n").unwrap();
    let state_file = root.join(STATE_DIR).join("allocations.json");
    fs::write(&state_file, "{\"allocations\":[\"10.240.0.7\"]}\n").unwrap();
    let unchanged_agent = snapshot(&root)["usr/local/bin/vnet-agent"].clone();

    let next = next_release(tmp.path());
    let output = install_ok(&next, &root, &[]);
    assert!(
        output.contains("installed /opt/cni/bin/vnet-cni"),
        "{output}"
    );

    let new_sum = expected_sums(&next)["bin/vnet-cni"].clone();
    assert_eq!(sha256(&plugin), new_sum, "the plugin is the new release's");
    assert_ne!(
        fs::metadata(&plugin).unwrap().ino(),
        old_inode,
        "the plugin was replaced by a rename, not rewritten in place"
    );
    assert_eq!(mode(&plugin), 0o755);
    assert_eq!(
        snapshot(&root)["usr/local/bin/vnet-agent"],
        unchanged_agent,
        "an unchanged binary is not touched"
    );
    let leftovers: Vec<String> = snapshot(&root)
        .into_keys()
        .filter(|p| p.contains(".vnet-install."))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
    assert_eq!(
        fs::read_to_string(&config).unwrap(),
        "mtu = 1400\n",
        "config kept"
    );
    assert_eq!(
        fs::read_to_string(&state_file).unwrap(),
        "{\"allocations\":[\"10.240.0.7\"]}\n",
        "state kept"
    );
    let manifest = fs::read_to_string(root.join(MANIFEST)).unwrap();
    assert!(
        manifest.contains(&format!("{new_sum} /opt/cni/bin/vnet-cni")),
        "{manifest}"
    );

    // Rollback: the previous release's installer puts the previous binary back.
    install_ok(&pkg.dir, &root, &[]);
    assert_eq!(
        sha256(&plugin),
        old_sum,
        "rolled back to the previous plugin"
    );
    assert_eq!(
        fs::read_to_string(&config).unwrap(),
        "mtu = 1400\n",
        "config kept"
    );
}

#[test]
fn install_with_no_enable_leaves_the_unit_disabled() {
    let tmp = TempDir::new("no-enable");
    let root = tmp.path().join("root");
    install_ok(&package().dir, &root, &["--no-enable"]);
    assert!(
        !root.join(WANTS_LINK).exists() && fs::symlink_metadata(root.join(WANTS_LINK)).is_err()
    );
    assert!(root.join(UNIT_PATH.trim_start_matches('/')).is_file());
}

/// `Key=Value` lines of a unit file (later lines win, as for systemd's single-value settings).
fn unit_settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            settings
                .entry(key.to_owned())
                .or_default()
                .push(value.to_owned());
        }
    }
    settings
}

#[test]
fn the_unit_is_hardened_and_passes_systemd_analyze_verify() {
    let pkg = package();
    let unit_text = fs::read_to_string(pkg.dir.join("systemd/vnet-agent.service")).unwrap();
    let settings = unit_settings(&unit_text);
    let one = |key: &str| -> String {
        settings
            .get(key)
            .and_then(|v| v.last())
            .unwrap_or_else(|| panic!("the unit sets {key}"))
            .clone()
    };
    let words =
        |key: &str| -> BTreeSet<String> { one(key).split_whitespace().map(String::from).collect() };

    // What a reviewer of the unit checks.
    assert_eq!(one("Type"), "exec", "the agent has no sd_notify");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/vnet-agent --config /etc/vnet-cni/agent.toml $VNET_AGENT_ARGS",
        "extra flags (--kubeconfig) come from agent.env"
    );
    assert_eq!(one("EnvironmentFile"), "-/etc/vnet-cni/agent.env");
    // A slow cloud must not hold up the runtime, the kubelet or hostNetwork pods: the conflist
    // (published once the agent is ready) already keeps pods off the node.
    assert!(
        !settings.contains_key("Before"),
        "the unit orders itself before nothing: {:?}",
        settings.get("Before")
    );
    // The agent stops within 10 s of SIGTERM; systemd waits a little longer before SIGKILL.
    assert_eq!(one("TimeoutStopSec"), "15s");
    assert_eq!(one("LimitNOFILE"), "65536");
    assert!(words("After").contains("network-online.target"));
    assert!(words("Wants").contains("network-online.target"));
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(
        one("CapabilityBoundingSet"),
        "CAP_NET_ADMIN",
        "only CAP_NET_ADMIN"
    );
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_ADMIN");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(
        words("ReadWritePaths"),
        ["/var/lib/vnet-cni", "/run/vnet-cni", "-/etc/cni/net.d"]
            .into_iter()
            .map(String::from)
            .collect(),
        "writable: state, socket and CNI config directories only"
    );
    for (key, value) in [
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("StateDirectory", "vnet-cni"),
        ("RuntimeDirectory", "vnet-cni"),
        ("WantedBy", "multi-user.target"),
    ] {
        assert_eq!(one(key), value, "{key}");
    }
    assert_eq!(
        words("RestrictAddressFamilies"),
        ["AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    // Forwarding comes from the shipped sysctl drop-in, applied with full privileges.
    assert_eq!(
        one("ExecStartPre"),
        "+/usr/lib/systemd/systemd-sysctl /etc/sysctl.d/90-vnet-cni.conf"
    );
    let sysctl = fs::read_to_string(pkg.dir.join("sysctl/90-vnet-cni.conf")).unwrap();
    assert!(
        sysctl
            .lines()
            .any(|l| l.trim() == "net.ipv4.ip_forward = 1"),
        "{sysctl}"
    );

    if !have("systemd-analyze") {
        eprintln!(
            "node_image: SKIPPED only the `systemd-analyze verify` check: systemd-analyze is not \
             installed here (Debian package `systemd`)"
        );
        return;
    }
    // verify checks that every Exec binary exists, so the unit is checked as installed into a
    // temporary root, with its /usr/local paths pointing there.
    let tmp = TempDir::new("verify");
    let root = tmp.path().join("root");
    install_ok(&pkg.dir, &root, &[]);
    let installed = fs::read_to_string(root.join(UNIT_PATH.trim_start_matches('/'))).unwrap();
    let relocated = installed
        .lines()
        .map(|line| {
            if line.starts_with("Exec") {
                line.replace("/usr/local/", &format!("{}/usr/local/", root.display()))
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let unit_dir = tmp.path().join("units");
    fs::create_dir_all(&unit_dir).unwrap();
    let unit_file = unit_dir.join("vnet-agent.service");
    fs::write(&unit_file, relocated + "\n").unwrap();
    let out = run(
        "systemd-analyze",
        &["verify", "--man=no", unit_file.to_str().unwrap()],
        &[("SYSTEMD_LOG_COLOR", "0")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("vnet-agent.service:"),
        "systemd-analyze verify failed ({}):\n{stderr}",
        out.status
    );
    // The exposure score, for the record (reported, not asserted).
    let security = run(
        "systemd-analyze",
        &[
            "security",
            "--offline=yes",
            "--no-pager",
            unit_file.to_str().unwrap(),
        ],
        &[],
    );
    if let Some(score) = String::from_utf8_lossy(&security.stdout)
        .lines()
        .find(|l| l.contains("Overall exposure level"))
    {
        eprintln!("node_image: systemd-analyze security: {}", score.trim());
    }
}

/// `vnet-agent --config FILE --print-config`, without `VNET_AGENT_*` overrides from the caller.
fn agent_effective_config(agent: &Path, config: &Path) -> String {
    let mut command = Command::new("timeout");
    command
        .arg(COMMAND_TIMEOUT_SECS.to_string())
        .arg(agent)
        .arg("--config")
        .arg(config)
        .arg("--print-config");
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("VNET_AGENT_")) {
        command.env_remove(key);
    }
    let out = command.output().expect("run vnet-agent");
    assert!(
        out.status.success(),
        "vnet-agent rejects {}: {}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_shipped_agent_config_is_valid_and_states_the_agents_defaults() {
    let agent = vnet_lab::lab::default_bin_dir().join("vnet-agent");
    assert!(
        agent.is_file(),
        "vnet-agent not built at {}: run `cargo build --workspace --bins` first",
        agent.display()
    );
    let template = node_image_dir().join("agent.toml");
    let check = run(
        agent.to_str().unwrap(),
        &["--config", template.to_str().unwrap(), "--check-config"],
        &[],
    );
    assert!(
        check.status.success(),
        "vnet-agent --check-config rejects the shipped agent.toml: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    // The template says its values are the defaults: the agent must agree.
    assert_eq!(
        agent_effective_config(&agent, &template),
        agent_effective_config(&agent, Path::new("/dev/null")),
        "deploy/node-image/agent.toml differs from the agent's defaults"
    );
}

#[test]
fn the_scripts_are_valid_shell() {
    let dir = node_image_dir();
    for (shell, script) in [
        ("sh", "install.sh"),
        ("sh", "publish-conflist"),
        ("bash", "release.sh"),
    ] {
        run_ok(shell, &["-n", dir.join(script).to_str().unwrap()], &[]);
    }
    if have("shellcheck") {
        for script in ["install.sh", "publish-conflist", "release.sh"] {
            run_ok("shellcheck", &[dir.join(script).to_str().unwrap()], &[]);
        }
    } else {
        eprintln!("node_image: shellcheck is not installed; only `sh -n` syntax checks ran");
    }
    let help = run_ok(
        "sh",
        &[package().dir.join("install.sh").to_str().unwrap(), "--help"],
        &[],
    );
    assert!(
        help.contains("uninstall") && help.contains("--destdir"),
        "{help}"
    );
    let bad = install_sh(&package().dir, &["--frobnicate"]);
    assert!(!bad.status.success(), "an unknown option is an error");
}

/// A one-shot HTTP server on a Unix socket answering `GET /v1/health` with `ready`.
fn serve_health(listener: UnixListener, ready: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).unwrap_or(0);
            if n == 0 {
                // The test's wake-up connection: stop serving.
                return;
            }
            let body = format!("{{\"ready\":{ready},\"version\":\"test\"}}");
            let status = if ready {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })
}

#[test]
fn the_conflist_is_published_only_once_the_agent_is_ready() {
    let pkg = package();
    let tmp = TempDir::new("publish");
    let socket = tmp.path().join("agent.sock");
    let agent_config = tmp.path().join("agent.toml");
    fs::write(
        &agent_config,
        format!("socket_path = \"{}\"\n", socket.display()),
    )
    .unwrap();
    let net_d = tmp.path().join("net.d");
    fs::create_dir_all(&net_d).unwrap();
    let template = pkg.dir.join("etc/00-vnet-cni.conflist");
    let publish = pkg.dir.join("libexec/publish-conflist");
    let state_dir = tmp.path().join("state");
    fs::create_dir_all(&state_dir).unwrap();
    let envs = [
        ("VNET_STATE_DIR", state_dir.to_str().unwrap()),
        ("VNET_CONFLIST_TEMPLATE", template.to_str().unwrap()),
        ("VNET_CNI_CONF_DIR", net_d.to_str().unwrap()),
        ("VNET_AGENT_CONFIG", agent_config.to_str().unwrap()),
        ("VNET_PUBLISH_TIMEOUT", "2"),
    ];
    let published = net_d.join("00-vnet-cni.conflist");

    // No agent: nothing is published, and the unit's start fails (so systemd retries).
    let out = run("sh", &[publish.to_str().unwrap()], &envs);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not ready"));
    assert!(!published.exists());

    let with_curl = have("curl");
    if with_curl {
        // An agent that is up but not ready yet: still nothing.
        let listener = UnixListener::bind(&socket).unwrap();
        let server = serve_health(listener, false);
        let out = run("sh", &[publish.to_str().unwrap()], &envs);
        assert!(
            !out.status.success(),
            "published before the agent was ready"
        );
        assert!(!published.exists());
        let _ = std::os::unix::net::UnixStream::connect(&socket);
        server.join().unwrap();
        fs::remove_file(&socket).unwrap();
    } else {
        eprintln!(
            "node_image: curl is not installed; publish-conflist falls back to the socket's existence"
        );
    }

    // What an earlier release published under the old name, which sorts after other CNIs'.
    let legacy = net_d.join("10-vnet-cni.conflist");
    fs::copy(&template, &legacy).unwrap();

    // A ready agent: the conflist appears, identical to the template, the old one goes, and no
    // temp file stays.
    let listener = UnixListener::bind(&socket).unwrap();
    let server = serve_health(listener, true);
    run_ok("sh", &[publish.to_str().unwrap()], &envs);
    assert_eq!(fs::read(&published).unwrap(), fs::read(&template).unwrap());
    assert_eq!(mode(&published), 0o644);
    let names: Vec<_> = fs::read_dir(&net_d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["00-vnet-cni.conflist"]);

    // A new release's template replaces what this script published before.
    let new_template = tmp.path().join("00-vnet-cni.conflist");
    let new_text = fs::read_to_string(&template).unwrap().replace(
        "\"type\": \"vnet-cni\"",
        "\"type\": \"vnet-cni\",\n      \"logLevel\": \"info\"",
    );
    fs::write(&new_template, &new_text).unwrap();
    let mut new_envs = envs;
    new_envs[1] = ("VNET_CONFLIST_TEMPLATE", new_template.to_str().unwrap());
    run_ok("sh", &[publish.to_str().unwrap()], &new_envs);
    assert_eq!(fs::read_to_string(&published).unwrap(), new_text);

    // A conflist the agent (or an operator) wrote is theirs: left alone.
    let agents = "{\"cniVersion\":\"1.0.0\",\"name\":\"vnet-cni\",\"plugins\":[{\"type\":\"vnet-cni\",\"mtu\":1400}]}\n";
    fs::write(&published, agents).unwrap();
    let output = run_ok("sh", &[publish.to_str().unwrap()], &envs);
    assert!(output.contains("leaving it"), "{output}");
    assert_eq!(fs::read_to_string(&published).unwrap(), agents);

    // Another CNI's file that sorts first would win: the journal says so.
    fs::write(
        net_d.join("00-aaa-other.conflist"),
        "{\"name\":\"other\"}\n",
    )
    .unwrap();
    let out = run("sh", &[publish.to_str().unwrap()], &envs);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning")
            && stderr.contains("00-aaa-other.conflist sorts before 00-vnet-cni.conflist"),
        "{stderr}"
    );
    let _ = std::os::unix::net::UnixStream::connect(&socket);
    server.join().unwrap();
}

// --- In-place upgrade in the lab ------------------------------------------------------------------

/// SIGTERM: how systemd stops the agent on `systemctl restart`.
const SIGTERM: i32 = 15;

/// Probes `to` from `from_ns`, once more after a miss, so one delayed SYN on a loaded machine is
/// not taken for a pod that stopped answering.
fn answers(from_ns: &str, to: std::net::Ipv4Addr) -> Result<(), String> {
    let first = vnet_lab::probe::probe(from_ns, to);
    if first.ok() {
        return Ok(());
    }
    let second = vnet_lab::probe::probe(from_ns, to);
    if second.ok() {
        Ok(())
    } else {
        Err(format!("{to}: {:?} then {:?}", first.error, second.error))
    }
}

/// The node-image upgrade on one lab node: the lab runs the binaries that install.sh put into a
/// node root; a new release is installed over them and node-1's agent is restarted, as
/// `install.sh` does with `systemctl restart` on a real node, while pods on node-1 are probed
/// continuously from node-2. (The lab's nodes share one binary directory, so the new plugin
/// serves node-2 too; only node-1's agent is restarted.)
#[test]
fn lab_upgrade_in_place_keeps_pods_answering_and_loses_no_allocation() {
    use vnet_lab::lab::{Lab, LabConfig, LabGuard, PoolConfig, default_bin_dir, is_root};
    use vnet_lab::probe::Responder;

    assert!(
        is_root(),
        "needs root: the lab builds network namespaces (run `cargo test` as root)"
    );
    let target_bins = default_bin_dir();
    for bin in ["vnet-mockcloud", "vnet-agent", "vnet-cni"] {
        assert!(
            target_bins.join(bin).is_file(),
            "{bin} not built in {}: run `cargo build --workspace --bins` before this test",
            target_bins.display()
        );
    }
    let pkg = package();
    let real = fs::read_to_string(pkg.dir.join("VERSION")).unwrap();
    assert!(
        !real.contains("not-elf"),
        "the package holds stand-ins, not the real binaries:\n{real}"
    );

    // The node root, release 1, and a lab whose binaries are the ones installed there.
    let tmp = TempDir::new("lab-upgrade");
    let root = tmp.path().join("root");
    install_ok(&pkg.dir, &root, &["--no-enable"]);
    let lab_bin = tmp.path().join("lab-bin");
    fs::create_dir_all(&lab_bin).unwrap();
    for (name, installed) in [
        ("vnet-agent", root.join("usr/local/bin/vnet-agent")),
        ("vnet-cni", root.join("opt/cni/bin/vnet-cni")),
        ("vnet-mockcloud", target_bins.join("vnet-mockcloud")),
    ] {
        std::os::unix::fs::symlink(&installed, lab_bin.join(name)).unwrap();
    }
    let mut cfg = LabConfig::new(&format!("ni-upgrade-{}", std::process::id()));
    cfg.nodes = 2;
    cfg.bin_dir = lab_bin;
    cfg.pool = PoolConfig {
        warm: 4,
        batch: 4,
        ..PoolConfig::default()
    };
    assert!(
        cfg.cnitool.is_file(),
        "cnitool not found at {} (tests/tools/build-cnitool.sh, or set VNET_CNITOOL)",
        cfg.cnitool.display()
    );
    let lab: LabGuard = LabGuard::new(Lab::up(&cfg).unwrap_or_else(|e| panic!("lab up: {e}")));

    let client = lab.add_pod("node-2", "client").expect("client pod");
    let servers: Vec<_> = (0..3)
        .map(|i| {
            lab.add_pod("node-1", &format!("web{i}"))
                .expect("pod on node-1")
        })
        .collect();
    let _responders: Vec<Responder> = servers
        .iter()
        .map(|s| Responder::start(&s.ns).expect("responder"))
        .collect();
    for s in &servers {
        answers(&client.ns, s.ip).unwrap_or_else(|e| panic!("{} before the upgrade: {e}", s.name));
    }
    let allocations = |lab: &Lab| -> BTreeSet<(String, std::net::Ipv4Addr)> {
        lab.agent_allocations("node-1")
            .expect("node-1 allocations")
            .allocations
            .into_iter()
            .map(|a| (a.host_veth, a.ip))
            .collect()
    };
    let before = allocations(&lab);
    assert_eq!(
        before.len(),
        servers.len(),
        "one allocation per pod: {before:?}"
    );
    let old_agent = lab.agent_pid("node-1").expect("node-1 agent");

    // Probe node-1's pods from node-2 the whole time the upgrade runs.
    let next = next_release_of_agent_and_plugin(tmp.path());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (rounds, misses) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let mut rounds = 0u32;
            let mut misses = Vec::new();
            while !stop.load(Ordering::SeqCst) || rounds == 0 {
                for s in &servers {
                    if let Err(e) = answers(&client.ns, s.ip) {
                        misses.push(format!("{}: {e}", s.name));
                    }
                }
                rounds += 1;
            }
            (rounds, misses)
        });
        // The upgrade: new binaries renamed into place, then the agent restarted.
        let output = install_ok(&next, &root, &["--no-enable"]);
        assert!(
            output.contains("installed /usr/local/bin/vnet-agent"),
            "{output}"
        );
        assert!(
            output.contains("installed /opt/cni/bin/vnet-cni"),
            "{output}"
        );
        lab.signal_agent("node-1", SIGTERM)
            .expect("stop the old agent");
        lab.start_agent("node-1").expect("start the new agent");
        lab.wait_agent_ready("node-1", Duration::from_secs(120))
            .expect("the new agent gets ready");
        stop.store(true, Ordering::SeqCst);
        prober.join().expect("prober")
    });
    eprintln!("node_image: {rounds} probe rounds over the upgrade");
    assert!(
        misses.is_empty(),
        "pods stopped answering during the upgrade: {misses:?}"
    );

    // The new agent runs the new release's binary, and holds every allocation it had.
    let new_agent = lab.agent_pid("node-1").expect("node-1 agent");
    assert_ne!(new_agent, old_agent, "the agent was restarted");
    assert_eq!(
        sha256(&PathBuf::from(format!("/proc/{new_agent}/exe"))),
        expected_sums(&next)["bin/vnet-agent"],
        "node-1 runs the new agent"
    );
    assert_eq!(allocations(&lab), before, "allocations after the upgrade");

    // The upgraded node still serves new pods (through the new plugin), and nothing is doubled.
    let fresh = lab
        .add_pod("node-1", "fresh")
        .expect("ADD after the upgrade");
    assert!(
        !before.iter().any(|(_, ip)| *ip == fresh.ip),
        "{} reused",
        fresh.ip
    );
    let _fresh_responder = Responder::start(&fresh.ns).expect("responder");
    for s in servers.iter().chain(std::iter::once(&fresh)) {
        answers(&client.ns, s.ip).unwrap_or_else(|e| panic!("{} after the upgrade: {e}", s.name));
    }
    common::assert_ip_accounting(&lab);
    for pod in lab.state().pods {
        lab.del_pod(&pod.node, &pod.name).expect("delete pod");
    }
    common::assert_ip_accounting(&lab);
    common::assert_no_leftover_links(&lab);
}

/// The unit's privilege claims, without systemd: in a private network and mount namespace
/// (anonymous, gone with its processes), forwarding is switched on first (the unit's
/// `ExecStartPre=+systemd-sysctl`), `/proc/sys` is made read-only (`ProtectKernelTunables=yes`),
/// so is `/` except the agent's directories (`ProtectSystem=strict`, `ReadWritePaths=`), and the
/// packaged agent runs with CAP_NET_ADMIN as its only capability and no new privileges
/// (`CapabilityBoundingSet=CAP_NET_ADMIN`, `NoNewPrivileges=yes`) against vnet-mockcloud on
/// the namespace's loopback. It must get ready and install its nftables table.
#[test]
fn the_agent_gets_ready_with_only_cap_net_admin_and_a_read_only_system() {
    use vnet_lab::lab::{default_bin_dir, is_root};

    assert!(
        is_root(),
        "needs root: the test makes a private network namespace"
    );
    for tool in ["unshare", "setpriv", "nft", "curl"] {
        assert!(have(tool), "{tool} is needed for this test");
    }
    let mock = default_bin_dir().join("vnet-mockcloud");
    assert!(
        mock.is_file(),
        "vnet-mockcloud not built at {}: run `cargo build --workspace --bins` first",
        mock.display()
    );
    let pkg = package();
    let agent = pkg.dir.join("bin/vnet-agent");
    let version = fs::read_to_string(pkg.dir.join("VERSION")).unwrap();
    assert!(
        !version.contains("vnet-agent not-elf"),
        "the package holds a stand-in agent, not the real one:\n{version}"
    );

    let tmp = TempDir::new("caps");
    let dir = tmp.path();
    fs::write(
        dir.join("topology.json"),
        r#"{"subscription":"sub","resource_group":"rg","location":"westeurope",
            "vnet":{"name":"vnet","address_space":["10.240.0.0/16"]},
            "subnets":[{"name":"nodes","prefix":"10.240.0.0/16"}],
            "vms":[{"name":"node-1","subnet":"nodes","primary_ip":"10.240.0.4"}]}"#,
    )
    .unwrap();
    fs::write(
        dir.join("agent.toml"),
        format!(
            r#"socket_path = "{dir}/run/agent.sock"
state_dir = "{dir}/state"
metrics_address = "127.0.0.1:19464"
[cloud]
provider = "mock"
arm_endpoint = "http://127.0.0.1:18080"
imds_endpoint = "http://127.0.0.1:18080/vms/node-1"
credential = "none"
[pool]
warm = 2
batch = 2
"#,
            dir = dir.display()
        ),
    )
    .unwrap();
    // Children are stopped on every exit path of the script; the namespaces die with them.
    let script = r#"
set -eu
dir=$1 mock=$2 agent=$3
pids=
trap 'for p in $pids; do kill $p 2>/dev/null || true; done; wait' EXIT
ip link set lo up
echo 1 > /proc/sys/net/ipv4/ip_forward
mount --make-rprivate /
mount --bind -o ro /proc/sys /proc/sys
# ProtectSystem=strict + ReadWritePaths: everything read-only but the test's directory (state,
# socket). Every other mount (/dev, /proc, /tmp if separate) is left as it is.
mount --bind "$dir" "$dir"
mount -o remount,bind,ro /
if touch /vnet-node-image-probe 2>/dev/null; then rm -f /vnet-node-image-probe; echo "/ is writable"; exit 1; fi
"$mock" --listen 127.0.0.1:18080 --topology "$dir/topology.json" >"$dir/mock.log" 2>&1 &
pids="$pids $!"
setpriv --bounding-set=-all,+net_admin --inh-caps=-all --no-new-privs     "$agent" --config "$dir/agent.toml" >"$dir/agent.log" 2>&1 &
agent_pid=$!
pids="$pids $agent_pid"
tries=0
until curl -fsS --max-time 2 --unix-socket "$dir/run/agent.sock" http://agent/v1/health 2>/dev/null | grep -q '"ready":true'; do
    kill -0 "$agent_pid" 2>/dev/null || { echo "agent exited"; exit 1; }
    tries=$((tries + 1))
    [ "$tries" -lt 120 ] || { echo "agent not ready"; exit 1; }
    sleep 0.5
done
echo "ready"
grep CapEff /proc/"$agent_pid"/status
nft list table ip vnet-cni >/dev/null && echo "nft table present"
"#;
    let out = run(
        "unshare",
        &[
            "--net",
            "--mount",
            "sh",
            "-c",
            script,
            "sh",
            dir.to_str().unwrap(),
            mock.to_str().unwrap(),
            agent.to_str().unwrap(),
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    assert!(
        out.status.success() && stdout.contains("ready\n"),
        "the agent did not get ready with CAP_NET_ADMIN only ({}):\n{stdout}{}\nagent log:\n{log}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // CAP_NET_ADMIN is bit 12: the agent held nothing else.
    assert!(stdout.contains("CapEff:\t0000000000001000"), "{stdout}");
    assert!(
        stdout.contains("nft table present"),
        "{stdout}\nagent log:\n{log}"
    );
}

/// A new release whose agent and plugin binaries differ from the installed ones (a byte appended
/// after the ELF image changes the file, not what runs).
fn next_release_of_agent_and_plugin(into: &Path) -> PathBuf {
    let next = next_release(into);
    let mut agent = fs::OpenOptions::new()
        .append(true)
        .open(next.join("bin/vnet-agent"))
        .unwrap();
    agent.write_all(b"\nnext release\n").unwrap();
    drop(agent);
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
