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

use serde_json::{Value, json};

/// Sorts first among usual CNI configs, so the runtime picks vnet-cni.
pub const CONFLIST_FILE_NAME: &str = "10-vnet-cni.conflist";
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

/// Writes `content` to `<dir>/10-vnet-cni.conflist` atomically; does nothing when the file already
/// holds exactly `content` (so a restart does not make the runtime reload). Returns the path.
pub fn write_conflist(dir: &Path, content: &str) -> io::Result<PathBuf> {
    let path = dir.join(CONFLIST_FILE_NAME);
    if fs::read_to_string(&path).is_ok_and(|current| current == content) {
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
    Ok(path)
}

/// Removes the conflist; `Ok(false)` when it was not there.
pub fn remove_conflist(dir: &Path) -> io::Result<bool> {
    match fs::remove_file(dir.join(CONFLIST_FILE_NAME)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
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
    fn remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        write_conflist(dir.path(), "{}").unwrap();
        assert!(remove_conflist(dir.path()).unwrap());
        assert!(!dir.path().join(CONFLIST_FILE_NAME).exists());
        assert!(!remove_conflist(dir.path()).unwrap());
    }
}
