//! Validated names: container IDs, interface names, and the host veth names derived from them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{AttachmentKey, hex_digest};

/// Linux interface names hold at most 15 bytes (IFNAMSIZ is 16 with the NUL).
pub const IFNAME_MAX: usize = 15;
/// Host veth prefixes are at most this long, so at least 8 hex digits of hash remain
/// (a collision among a node's 250 pods then has odds below 1 in 10^5).
pub const HOST_VETH_PREFIX_MAX: usize = 7;
/// Prefix of host veths that DEL has handed to the agent for deletion. Fixed, so the agent and GC
/// can find tombstones whatever host prefix is configured.
pub const TOMBSTONE_PREFIX: &str = "vdel";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("container ID is empty")]
    EmptyContainerId,
    #[error(
        "container ID {0:?} is invalid: it must start with a letter or digit and contain only letters, digits, '_', '.' and '-'"
    )]
    InvalidContainerId(String),
    #[error("interface name is empty")]
    EmptyIfName,
    #[error("interface name {0:?} is longer than {IFNAME_MAX} bytes")]
    IfNameTooLong(String),
    #[error(
        "interface name {0:?} is invalid: it must not be '.' or '..' nor contain '/', ':' or whitespace"
    )]
    InvalidIfName(String),
    #[error(
        "host veth prefix {0:?} is invalid: use 1 to {HOST_VETH_PREFIX_MAX} lowercase letters or digits, starting with a letter, not starting with {TOMBSTONE_PREFIX:?}"
    )]
    InvalidVethPrefix(String),
    #[error("expected <container id>/<ifname>")]
    MissingSeparator,
}

/// A container ID as the CNI spec allows it: an alphanumeric first character, then
/// `[A-Za-z0-9_.-]`. It ends up in file names and veth-name hashes, so nothing else gets through.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContainerId(String);

impl ContainerId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ContainerId {
    type Error = NameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        let mut chars = s.chars();
        match chars.next() {
            None => return Err(NameError::EmptyContainerId),
            Some(c) if !c.is_ascii_alphanumeric() => return Err(NameError::InvalidContainerId(s)),
            Some(_) => {}
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
            return Err(NameError::InvalidContainerId(s));
        }
        Ok(ContainerId(s))
    }
}

impl FromStr for ContainerId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(s.to_owned())
    }
}

impl From<ContainerId> for String {
    fn from(id: ContainerId) -> String {
        id.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An interface name the kernel will accept: 1 to 15 bytes, not `.` or `..`, no `/`, `:` or
/// whitespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IfName(String);

impl IfName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for IfName {
    type Error = NameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.is_empty() {
            return Err(NameError::EmptyIfName);
        }
        if s.len() > IFNAME_MAX {
            return Err(NameError::IfNameTooLong(s));
        }
        if s == "." || s == ".." || s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
            return Err(NameError::InvalidIfName(s));
        }
        Ok(IfName(s))
    }
}

impl FromStr for IfName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(s.to_owned())
    }
}

impl From<IfName> for String {
    fn from(name: IfName) -> String {
        name.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a configured host veth prefix (see [`NameError::InvalidVethPrefix`] for the rule).
pub fn validate_veth_prefix(prefix: &str) -> Result<(), NameError> {
    let valid = (1..=HOST_VETH_PREFIX_MAX).contains(&prefix.len())
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && !prefix.starts_with(TOMBSTONE_PREFIX)
        && !TOMBSTONE_PREFIX.starts_with(prefix);
    if valid {
        Ok(())
    } else {
        Err(NameError::InvalidVethPrefix(prefix.to_owned()))
    }
}

/// The host-side veth name of an attachment: `prefix` followed by hex digits of
/// SHA-256(container ID, ifname), 15 bytes in all. Deterministic, so DEL finds the link without the
/// pod's netns, and GC can map every link back to an attachment. The prefix must have passed
/// [`validate_veth_prefix`].
pub fn host_veth_name(prefix: &str, key: &AttachmentKey) -> String {
    let digest = hex_digest(&[key.container_id.as_str(), key.ifname.as_str()]);
    let hex_len = IFNAME_MAX.saturating_sub(prefix.len());
    format!("{prefix}{}", &digest[..hex_len])
}

/// The name a host veth is renamed to when DEL hands it over for deletion in the background. The
/// rename frees the deterministic name at once, so a new ADD for the same pod cannot collide with
/// the dying link. The name is derived from the host veth name alone, so a DEL that runs again
/// after a crash between the rename and the release finds the tombstone and hands it over again,
/// instead of letting the address be reused while the old link still exists.
pub fn tombstone_veth_name(host_veth: &str) -> String {
    let digest = hex_digest(&["tombstone", host_veth]);
    format!(
        "{TOMBSTONE_PREFIX}{}",
        &digest[..IFNAME_MAX - TOMBSTONE_PREFIX.len()]
    )
}

/// Whether `name` is a tombstone made by [`tombstone_veth_name`]: the prefix and lowercase hex
/// digits, 15 bytes in all. The agent accepts only such names in a release, and GC removes only
/// such links, so nothing else on the host is ever deleted as a tombstone.
pub fn is_tombstone_name(name: &str) -> bool {
    name.len() == IFNAME_MAX
        && name
            .strip_prefix(TOMBSTONE_PREFIX)
            .is_some_and(|hex| hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')))
}

/// Longest file name Linux file systems take (NAME_MAX).
const FILE_NAME_MAX: usize = 255;
/// How much of a long container ID a hashed spool file name keeps, for a person reading the dir.
const SPOOL_ID_PREFIX: usize = 64;

/// A release the plugin could not deliver, stored as `<spool dir>/<container id>:<ifname>.json`.
/// The file name makes a repeated DEL idempotent (`:` appears in neither name, so no two keys share
/// a file); the agent deletes the file once the release is durable in its own store, and applies a
/// key's spooled release before it allocates for that key again.
///
/// The spec sets no length limit on container IDs, but a file name holds at most 255 bytes. A key
/// whose plain name would not fit gets `<first 64 bytes of the ID>+<SHA-256 of (ID, ifname)>:
/// <ifname>.json` (150 bytes at most). `+` never appears in a container ID, so a hashed name never
/// equals a plain one, and every name an older plugin could write keeps its plain form. The file's
/// content carries the full key either way; the drain reads every `*.json` whatever its name.
pub fn spool_file_name(key: &AttachmentKey) -> String {
    let plain = format!("{}:{}.json", key.container_id, key.ifname);
    if plain.len() <= FILE_NAME_MAX {
        return plain;
    }
    let id = key.container_id.as_str();
    // Container IDs are ASCII, so any byte offset is a char boundary.
    let digest = hex_digest(&["spool", id, key.ifname.as_str()]);
    format!("{}+{digest}:{}.json", &id[..SPOOL_ID_PREFIX], key.ifname)
}

/// Longest interface alias the kernel takes (IFALIASZ is 256 with the NUL).
pub const LINK_ALIAS_MAX: usize = 255;
/// What every alias the plugin puts on a host veth starts with.
pub const LINK_ALIAS_PREFIX: &str = "vnet-cni ";

/// The interface alias (`IFLA_IFALIAS`, `ip link show` prints it) that marks a host veth as the
/// one vnet-cni made for this attachment: `vnet-cni <container id>/<ifname>`. The host veth name
/// is a short hash, so two attachments can share it; ADD removes and DEL retires a link holding
/// the name only when it carries this mark (or no alias at all: links made before the mark
/// existed). An ID too long for the alias is shortened as in [`spool_file_name`]:
/// `vnet-cni <first 64 bytes>+<SHA-256 of (ID, ifname)>/<ifname>`.
pub fn link_alias(key: &AttachmentKey) -> String {
    let plain = format!("{LINK_ALIAS_PREFIX}{}/{}", key.container_id, key.ifname);
    if plain.len() <= LINK_ALIAS_MAX {
        return plain;
    }
    let id = key.container_id.as_str();
    let digest = hex_digest(&["alias", id, key.ifname.as_str()]);
    format!(
        "{LINK_ALIAS_PREFIX}{}+{digest}/{}",
        &id[..SPOOL_ID_PREFIX],
        key.ifname
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, ifname: &str) -> AttachmentKey {
        AttachmentKey {
            container_id: id.parse().unwrap(),
            ifname: ifname.parse().unwrap(),
        }
    }

    #[test]
    fn container_ids_follow_the_spec() {
        for ok in ["a", "0abc", "abc_def.ghi-jkl", &"f".repeat(64)] {
            assert!(ok.parse::<ContainerId>().is_ok(), "{ok}");
        }
        for bad in ["", "-abc", ".abc", "_abc", "a/b", "a b", "a;b", "../x", "ä"] {
            assert!(bad.parse::<ContainerId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ifnames_follow_the_kernel() {
        for ok in ["eth0", "net1", "a", "abcdefghijklmno"] {
            assert!(ok.parse::<IfName>().is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "abcdefghijklmnop"] {
            assert!(bad.parse::<IfName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn host_veth_names_are_deterministic_and_fit_the_kernel() {
        let a = host_veth_name("vnet", &key("abc", "eth0"));
        assert_eq!(a, host_veth_name("vnet", &key("abc", "eth0")));
        assert_eq!(a.len(), IFNAME_MAX);
        assert!(a.starts_with("vnet"));
        assert!(a[4..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, host_veth_name("vnet", &key("abc", "eth1")));
        assert_ne!(a, host_veth_name("vnet", &key("abd", "eth0")));
        // The separator keeps differently split inputs apart.
        assert_ne!(
            host_veth_name("vnet", &key("ab", "ceth0")),
            host_veth_name("vnet", &key("abc", "eth0"))
        );
        assert_eq!(host_veth_name("v", &key("abc", "eth0")).len(), IFNAME_MAX);
    }

    #[test]
    fn host_veth_name_is_stable_across_releases() {
        // Pods created by one version are deleted by the next: this value must never change.
        assert_eq!(
            host_veth_name("vnet", &key("abc", "eth0")),
            format!("vnet{}", &hex_digest(&["abc", "eth0"])[..11])
        );
    }

    #[test]
    fn veth_prefixes_are_checked() {
        for ok in ["vnet", "azv", "eni", "p1234567"[..7].as_ref()] {
            assert!(validate_veth_prefix(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "VNET", "1abc", "toolong1", "vdel", "vdelx", "vde", "v-x",
        ] {
            assert!(validate_veth_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spool_file_names_fit_any_file_system_for_any_id_length() {
        // The plain form, unchanged for every ID whose name fits (files older plugins wrote).
        assert_eq!(spool_file_name(&key("abc123", "eth0")), "abc123:eth0.json");
        let fits = "a".repeat(FILE_NAME_MAX - ":abcdefghijklmno.json".len());
        let name = spool_file_name(&key(&fits, "abcdefghijklmno"));
        assert_eq!(name, format!("{fits}:abcdefghijklmno.json"));
        assert_eq!(name.len(), FILE_NAME_MAX);
        // One byte more, and any longer ID: hashed, short, still per attachment.
        for len in [fits.len() + 1, 500, 4096, 100_000] {
            let id = format!("c{}", "0123456789abcdef-_.".repeat(len / 19 + 1))[..len].to_owned();
            let name = spool_file_name(&key(&id, "abcdefghijklmno"));
            assert!(name.len() <= 150, "{len}: {} bytes", name.len());
            assert!(name.starts_with(&id[..64]) && name.contains('+'), "{name}");
            assert!(name.ends_with(":abcdefghijklmno.json"), "{name}");
            assert_eq!(name, spool_file_name(&key(&id, "abcdefghijklmno")));
            assert_ne!(name, spool_file_name(&key(&id, "eth0")));
            let mut other = id.clone();
            other.replace_range(len - 1.., "z");
            assert_ne!(name, spool_file_name(&key(&other, "abcdefghijklmno")));
        }
    }

    #[test]
    fn link_aliases_name_the_attachment_and_fit_the_kernel() {
        assert_eq!(link_alias(&key("abc123", "eth0")), "vnet-cni abc123/eth0");
        assert_ne!(
            link_alias(&key("abc123", "eth0")),
            link_alias(&key("abc123", "eth1"))
        );
        for len in [200, 246, 247, 500, 10_000] {
            let id = format!("c{}", "0123456789abcdef".repeat(len / 16 + 1))[..len].to_owned();
            let alias = link_alias(&key(&id, "eth0"));
            assert!(alias.len() <= LINK_ALIAS_MAX, "{len}: {}", alias.len());
            assert!(alias.starts_with(LINK_ALIAS_PREFIX) && alias.ends_with("/eth0"));
            assert_eq!(alias, link_alias(&key(&id, "eth0")));
            let mut other = id.clone();
            other.replace_range(len - 1.., "z");
            assert_ne!(alias, link_alias(&key(&other, "eth0")));
        }
    }

    #[test]
    fn tombstones_are_per_veth_stable_and_recognisable() {
        let a = tombstone_veth_name("vnet0123456789a");
        assert_eq!(a, tombstone_veth_name("vnet0123456789a"));
        assert_ne!(a, tombstone_veth_name("vnet0123456789b"));
        assert_eq!(a.len(), IFNAME_MAX);
        assert!(is_tombstone_name(&a));
        for not in [
            "vdel",
            "vdel0123456789",
            "vdel0123456789A",
            "vnet0123456789a",
            "vdelxxxxxxxxxxx",
        ] {
            assert!(!is_tombstone_name(not), "{not}");
        }
    }
}
