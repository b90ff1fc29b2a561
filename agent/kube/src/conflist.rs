//! The CNI network configuration list the container runtime reads from its config directory.
//!
//! Kubelet reports the node network-ready as soon as a valid config is in that directory, so the
//! agent writes it only once it can serve an ADD, and removes it on uninstall. The write is atomic
//! (temp file in the same directory, fsync, rename): a runtime never reads half a file.
//!
//! Free of Kubernetes types: standalone agents (node images) use it too.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Value, json};

/// Runtimes (libcni's `ConfFiles`, used by containerd and CRI-O) load the first `.conf`,
/// `.conflist` or `.json` file of the directory in byte order. `00-` sorts before the names other
/// CNIs install (`05-cilium.conflist`, `10-aws.conflist`, `10-azure.conflist`,
/// `10-calico.conflist`, `10-flannel.conflist`, `10-kindnet.conflist`); a file that still sorts
/// first is reported by [`effective_conflist`].
pub const CONFLIST_FILE_NAME: &str = "00-vnet-cni.conflist";
/// Names earlier releases wrote; removed once the current file is in place (upgrade).
pub const LEGACY_CONFLIST_FILE_NAMES: &[&str] = &["10-vnet-cni.conflist"];
/// The extensions runtimes read from the config directory.
const CONFIG_EXTENSIONS: &[&str] = &["conf", "conflist", "json"];
/// Where runtimes look by default.
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const NETWORK_NAME: &str = "vnet-cni";

/// What varies in the conflist. Every field left `None` is omitted, so the plugin's defaults apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConflistOptions {
    pub agent_socket: Option<String>,
    /// Where the plugin spools releases it cannot deliver: must be the agent's own spool
    /// directory, or the agent never drains them.
    pub spool_dir: Option<String>,
    pub mtu: Option<u32>,
    pub host_veth_prefix: Option<String>,
    pub log_level: Option<String>,
}

/// The conflist: vnet-cni, then portmap for `hostPort`s (with SNAT so hairpin traffic returns).
pub fn conflist(options: &ConflistOptions) -> String {
    let mut plugin = json!({ "type": "vnet-cni" });
    let fields = [
        ("agentSocket", options.agent_socket.clone().map(Value::from)),
        ("spoolDir", options.spool_dir.clone().map(Value::from)),
        ("mtu", options.mtu.map(Value::from)),
        (
            "hostVethPrefix",
            options.host_veth_prefix.clone().map(Value::from),
        ),
        ("logLevel", options.log_level.clone().map(Value::from)),
    ];
    for (key, value) in fields {
        if let Some(value) = value {
            plugin[key] = value;
        }
    }
    let list = json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": NETWORK_NAME,
        "plugins": [
            plugin,
            { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true },
        ],
    });
    let mut text = serde_json::to_string_pretty(&list).expect("a JSON value always serializes");
    text.push('\n');
    text
}

/// Writes `content` to `<dir>/00-vnet-cni.conflist` atomically; does nothing when the file already
/// holds exactly `content` (so a restart does not make the runtime reload). Then removes the
/// files of earlier releases ([`LEGACY_CONFLIST_FILE_NAMES`]), only once the new one is durable,
/// so the node never has no vnet-cni config. Returns the path.
pub fn write_conflist(dir: &Path, content: &str) -> io::Result<PathBuf> {
    let path = dir.join(CONFLIST_FILE_NAME);
    if fs::read_to_string(&path).is_ok_and(|current| current == content) {
        remove_legacy(dir)?;
        record_published(dir);
        return Ok(path);
    }
    fs::create_dir_all(dir)?;
    // A dot-prefixed name without the .conflist suffix: runtimes ignore it while it is written.
    let temp = dir.join(format!(".{CONFLIST_FILE_NAME}.tmp.{}", std::process::id()));
    let result = write_synced(&temp, content).and_then(|()| fs::rename(&temp, &path));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result?;
    // The rename is durable only once the directory entry is.
    File::open(dir)?.sync_all()?;
    remove_legacy(dir)?;
    record_published(dir);
    Ok(path)
}

/// The directory of the last successful [`write_conflist`] in this process: where the
/// Kubernetes integration looks for a config that would be loaded instead of ours.
static PUBLISHED_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Where this process last published the conflist, if it did.
pub fn published_dir() -> Option<PathBuf> {
    PUBLISHED_DIR.lock().map(|dir| dir.clone()).unwrap_or(None)
}

fn record_published(dir: &Path) {
    if let Ok(mut published) = PUBLISHED_DIR.lock() {
        *published = Some(dir.to_owned());
    }
    // Also without Kubernetes (node images): say at once when the runtime would load another file.
    if let Ok(Some(other)) = shadowing_conflist(dir) {
        tracing::warn!(
            config = %dir.join(&other).display(),
            "{other} sorts before {CONFLIST_FILE_NAME}: the container runtime gives new pods that network, not vnet-cni's; remove it (or the CNI that wrote it)"
        );
    }
}

/// Whether the file at `path` is a vnet-cni conflist (network name `vnet-cni`): a file of
/// another network that happens to carry an old name of ours is left alone.
fn is_ours(path: &Path) -> bool {
    fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .is_some_and(|conf| conf["name"] == NETWORK_NAME)
}

fn remove_legacy(dir: &Path) -> io::Result<()> {
    let mut removed = false;
    for name in LEGACY_CONFLIST_FILE_NAMES {
        let path = dir.join(name);
        if is_ours(&path) {
            removed |= remove_if_present(&path)?;
        }
    }
    if removed {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes the conflist (and any of ours left by an earlier release); `Ok(false)` when none
/// was there.
pub fn remove_conflist(dir: &Path) -> io::Result<bool> {
    let mut removed = remove_if_present(&dir.join(CONFLIST_FILE_NAME))?;
    for name in LEGACY_CONFLIST_FILE_NAMES {
        let path = dir.join(name);
        if is_ours(&path) {
            removed |= remove_if_present(&path)?;
        }
    }
    Ok(removed)
}

/// The file name the runtime would load from `dir`: the first `.conf`, `.conflist` or `.json`
/// file in byte order, as libcni's `ConfFiles` plus a sort (containerd, CRI-O). `None` when
/// there is none (or the directory does not exist).
pub fn effective_conflist(dir: &Path) -> io::Result<Option<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            continue;
        }
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let extension = Path::new(&name).extension().and_then(|e| e.to_str());
        if extension.is_some_and(|e| CONFIG_EXTENSIONS.contains(&e)) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names.into_iter().next())
}

/// Another CNI config that the runtime loads instead of ours, if any: `Some(name)` when `dir`
/// holds ours but a file sorting before it too.
pub fn shadowing_conflist(dir: &Path) -> io::Result<Option<String>> {
    if !dir.join(CONFLIST_FILE_NAME).exists() {
        return Ok(None);
    }
    Ok(effective_conflist(dir)?.filter(|name| name != CONFLIST_FILE_NAME))
}

fn write_synced(path: &Path, content: &str) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(content.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_conflist_chains_vnet_cni_then_portmap() {
        let value: Value = serde_json::from_str(&conflist(&ConflistOptions::default())).unwrap();
        assert_eq!(value["cniVersion"], "1.0.0");
        assert_eq!(value["cniVersions"], json!(["1.0.0", "1.1.0"]));
        assert_eq!(value["plugins"][0], json!({"type": "vnet-cni"}));
        assert_eq!(value["plugins"][1]["type"], "portmap");
        assert_eq!(value["plugins"][1]["capabilities"]["portMappings"], true);
        assert_eq!(value["plugins"][1]["snat"], true);
    }

    #[test]
    fn options_become_plugin_keys() {
        let text = conflist(&ConflistOptions {
            agent_socket: Some("/run/x.sock".into()),
            spool_dir: Some("/var/lib/x/spool".into()),
            mtu: Some(1400),
            host_veth_prefix: None,
            log_level: Some("debug".into()),
        });
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value["plugins"][0],
            json!({"type": "vnet-cni", "agentSocket": "/run/x.sock", "spoolDir": "/var/lib/x/spool", "mtu": 1400, "logLevel": "debug"})
        );
    }

    #[test]
    fn write_is_complete_idempotent_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let conf_dir = dir.path().join("net.d");
        let content = conflist(&ConflistOptions::default());
        let path = write_conflist(&conf_dir, &content).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), content);
        let modified = fs::metadata(&path).unwrap().modified().unwrap();
        write_conflist(&conf_dir, &content).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), modified);

        let changed = conflist(&ConflistOptions {
            mtu: Some(1400),
            ..Default::default()
        });
        write_conflist(&conf_dir, &changed).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), changed);
        let names: Vec<_> = fs::read_dir(&conf_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![CONFLIST_FILE_NAME.to_string()]);
    }

    #[test]
    fn the_name_sorts_before_every_usual_cni_config() {
        for other in [
            "05-cilium.conflist",
            "10-aws.conflist",
            "10-azure.conflist",
            "10-calico.conflist",
            "10-flannel.conflist",
            "10-kindnet.conflist",
            "10-containerd-net.conflist",
            "87-podman-bridge.conflist",
            "99-loopback.conf",
        ] {
            assert!(CONFLIST_FILE_NAME < other, "{other} sorts before ours");
        }
    }

    #[test]
    fn an_upgrade_removes_the_old_file_only_after_the_new_one_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let content = conflist(&ConflistOptions::default());
        fs::write(dir.path().join("10-vnet-cni.conflist"), &content).unwrap();
        fs::write(dir.path().join("10-calico.conflist"), "{}").unwrap();
        write_conflist(dir.path(), &content).unwrap();
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["00-vnet-cni.conflist", "10-calico.conflist"]);
        // Also when the current file was already there (an agent restarted mid-upgrade).
        fs::write(dir.path().join("10-vnet-cni.conflist"), &content).unwrap();
        write_conflist(dir.path(), &content).unwrap();
        assert!(!dir.path().join("10-vnet-cni.conflist").exists());
        // Another network's file under our old name is not ours to remove.
        let theirs =
            r#"{"cniVersion":"1.0.0","name":"someone-elses","plugins":[{"type":"bridge"}]}"#;
        fs::write(dir.path().join("10-vnet-cni.conflist"), theirs).unwrap();
        write_conflist(dir.path(), &content).unwrap();
        assert!(remove_conflist(dir.path()).unwrap());
        assert_eq!(
            fs::read_to_string(dir.path().join("10-vnet-cni.conflist")).unwrap(),
            theirs
        );
    }

    #[test]
    fn the_runtime_picks_the_first_config_by_name() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            effective_conflist(&dir.path().join("missing")).unwrap(),
            None
        );
        assert_eq!(shadowing_conflist(dir.path()).unwrap(), None);
        write_conflist(dir.path(), &conflist(&ConflistOptions::default())).unwrap();
        // Ignored by runtimes: other extensions, hidden temp files, directories.
        fs::write(dir.path().join("000-notes.txt"), "").unwrap();
        fs::write(dir.path().join(".00-vnet-cni.conflist.tmp.1"), "").unwrap();
        fs::create_dir(dir.path().join("000.conf")).unwrap();
        fs::write(dir.path().join("10-calico.conflist"), "{}").unwrap();
        assert_eq!(
            effective_conflist(dir.path()).unwrap().as_deref(),
            Some(CONFLIST_FILE_NAME)
        );
        assert_eq!(shadowing_conflist(dir.path()).unwrap(), None);
        fs::write(dir.path().join("00-multus.conf"), "{}").unwrap();
        assert_eq!(
            shadowing_conflist(dir.path()).unwrap().as_deref(),
            Some("00-multus.conf")
        );
    }

    #[test]
    fn remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        write_conflist(dir.path(), "{}").unwrap();
        assert!(remove_conflist(dir.path()).unwrap());
        assert!(!dir.path().join(CONFLIST_FILE_NAME).exists());
        assert!(!remove_conflist(dir.path()).unwrap());
        fs::write(
            dir.path().join("10-vnet-cni.conflist"),
            conflist(&ConflistOptions::default()),
        )
        .unwrap();
        assert!(remove_conflist(dir.path()).unwrap());
        assert!(!dir.path().join("10-vnet-cni.conflist").exists());
    }
}
