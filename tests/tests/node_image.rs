//! The node-image release and installer (deploy/node-image): builds the release tarball from the
//! binaries already in the target directory (`release.sh --bin-dir`, no release build), installs it
//! into temporary roots with `install.sh --destdir` and checks what a node image would then hold:
//! files, modes, checksums, idempotence, refusal of a tampered package, uninstall, upgrade and
//! rollback. Nothing here touches the host's own /etc, /opt or /usr, so no root is needed.
//! The unit and scripts: node_image_unit.rs; in the lab: node_image_lab.rs; under systemd:
//! node_image_systemd.rs.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

mod common;

use common::node_image::*;

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
