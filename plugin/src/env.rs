//! The `CNI_*` environment, validated per command. Only `main` reads the real environment; everything
//! here takes a map so tests can feed it directly.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

use vnet_api::{AttachmentKey, ContainerId, IfName};

use crate::cni::CniArgs;
use crate::error::{CniError, CniResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

/// The validated environment of one call.
#[derive(Debug, Clone)]
pub struct CniEnv {
    pub command: Command,
    /// Set for ADD, CHECK and DEL.
    pub key: Option<AttachmentKey>,
    /// Required for ADD and CHECK; DEL may have none (the netns is already gone).
    pub netns: Option<String>,
    pub args: CniArgs,
}

impl CniEnv {
    /// The attachment key; only called by commands whose validation guaranteed it.
    pub fn key(&self) -> &AttachmentKey {
        self.key
            .as_ref()
            .expect("ADD, CHECK and DEL always carry a validated key")
    }
}

/// Keeps the `CNI_*` variables of a process environment. Any other variable is ignored whatever
/// its bytes; a `CNI_*` name or value that is not UTF-8 is an invalid environment (code 4) rather
/// than a panic (`std::env::vars` panics on it).
pub fn cni_vars(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> CniResult<HashMap<String, String>> {
    let mut env = HashMap::new();
    for (name, value) in vars {
        if !name.as_bytes().starts_with(b"CNI_") {
            continue;
        }
        let lossy = name.to_string_lossy().into_owned();
        let name = name.into_string().map_err(|_| {
            CniError::env(format!("environment variable name {lossy:?} is not UTF-8"))
        })?;
        let value = value
            .into_string()
            .map_err(|_| CniError::env(format!("{name} is not UTF-8")))?;
        env.insert(name, value);
    }
    Ok(env)
}

/// Reads just the command, so `main` can answer VERSION before anything else is validated.
pub fn command(env: &HashMap<String, String>) -> CniResult<Command> {
    match env.get("CNI_COMMAND").map(String::as_str) {
        Some("ADD") => Ok(Command::Add),
        Some("DEL") => Ok(Command::Del),
        Some("CHECK") => Ok(Command::Check),
        Some("STATUS") => Ok(Command::Status),
        Some("GC") => Ok(Command::Gc),
        Some("VERSION") => Ok(Command::Version),
        Some(other) => Err(CniError::env(format!(
            "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"
        ))),
        None => Err(CniError::env("CNI_COMMAND is not set")),
    }
}

fn non_empty<'a>(env: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    env.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

fn required<'a>(
    env: &'a HashMap<String, String>,
    name: &str,
    command: Command,
) -> CniResult<&'a str> {
    non_empty(env, name)
        .ok_or_else(|| CniError::env(format!("{name} is required for {}", command.as_str())))
}

/// Validates the variables the spec requires for the command: ADD and CHECK need CONTAINERID,
/// NETNS, IFNAME and PATH; DEL the same except NETNS; GC and STATUS only PATH.
pub fn parse(env: &HashMap<String, String>) -> CniResult<CniEnv> {
    let command = command(env)?;
    let needs_key = matches!(command, Command::Add | Command::Check | Command::Del);
    if command != Command::Version {
        required(env, "CNI_PATH", command)?;
    }
    let key = if needs_key {
        let container_id: ContainerId = required(env, "CNI_CONTAINERID", command)?
            .parse()
            .map_err(|e| CniError::env(format!("CNI_CONTAINERID: {e}")))?;
        let ifname: IfName = required(env, "CNI_IFNAME", command)?
            .parse()
            .map_err(|e| CniError::env(format!("CNI_IFNAME: {e}")))?;
        Some(AttachmentKey {
            container_id,
            ifname,
        })
    } else {
        None
    };
    let netns = match command {
        Command::Add | Command::Check => Some(required(env, "CNI_NETNS", command)?.to_owned()),
        Command::Del => non_empty(env, "CNI_NETNS").map(str::to_owned),
        _ => None,
    };
    let args = if needs_key {
        CniArgs::parse(env.get("CNI_ARGS").map_or("", String::as_str))?
    } else {
        CniArgs::default()
    };
    Ok(CniEnv {
        command,
        key,
        netns,
        args,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn add_env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
    }

    #[test]
    fn add_needs_every_variable() {
        assert!(parse(&env(&add_env())).is_ok());
        for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"] {
            let e: Vec<_> = add_env()
                .into_iter()
                .filter(|(k, _)| *k != missing)
                .collect();
            let err = parse(&env(&e)).unwrap_err();
            assert_eq!(err.code, Code::InvalidEnvironment, "{missing}");
            assert!(err.msg.contains(missing), "{}", err.msg);
        }
    }

    #[test]
    fn bad_names_are_invalid_environment() {
        let mut e = add_env();
        e[1] = ("CNI_CONTAINERID", "../etc");
        assert_eq!(parse(&env(&e)).unwrap_err().code, Code::InvalidEnvironment);
        let mut e = add_env();
        e[3] = ("CNI_IFNAME", "averyveryverylongname");
        assert_eq!(parse(&env(&e)).unwrap_err().code, Code::InvalidEnvironment);
    }

    #[test]
    fn only_cni_variables_are_kept_and_must_be_utf8() {
        use std::os::unix::ffi::OsStringExt;
        let os = |s: &[u8]| OsString::from_vec(s.to_vec());
        let vars = cni_vars([
            (os(b"CNI_COMMAND"), os(b"ADD")),
            (os(b"HOME"), os(b"/root")),
            (os(b"JUNK"), os(b"\xff\xfe")),
        ])
        .unwrap();
        assert_eq!(vars.len(), 1);
        assert_eq!(vars["CNI_COMMAND"], "ADD");
        let err = cni_vars([(os(b"CNI_IFNAME"), os(b"eth\xff"))]).unwrap_err();
        assert_eq!(err.code, Code::InvalidEnvironment);
        assert!(err.msg.contains("CNI_IFNAME"), "{}", err.msg);
        let err = cni_vars([(os(b"CNI_\xff"), os(b"x"))]).unwrap_err();
        assert_eq!(err.code, Code::InvalidEnvironment);
    }

    #[test]
    fn del_allows_no_netns_and_status_needs_only_path() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", ""),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/x"),
        ]);
        assert_eq!(parse(&e).unwrap().netns, None);
        assert!(parse(&env(&[("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/x")])).is_ok());
        assert!(parse(&env(&[("CNI_COMMAND", "GC")])).is_err());
        assert!(parse(&env(&[("CNI_COMMAND", "VERSION")])).is_ok());
        assert!(parse(&env(&[("CNI_COMMAND", "FROB")])).is_err());
    }
}
