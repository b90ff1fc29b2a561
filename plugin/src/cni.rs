//! CNI types: the network config on stdin, `CNI_ARGS`, and the result in every supported version.

use std::net::Ipv4Addr;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use vnet_api::{AttachmentKey, ContainerId, IfName, PodRef};

use crate::error::{CniError, CniResult, Code};
use crate::logging::Level;

/// Versions we speak, oldest first. Ordered so `>=` comparisons work on the enum.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub const LATEST: Version = Version::V1_1_0;

    pub fn parse(s: &str) -> Option<Version> {
        Some(match s {
            "0.3.0" => Version::V0_3_0,
            "0.3.1" => Version::V0_3_1,
            "0.4.0" => Version::V0_4_0,
            "1.0.0" => Version::V1_0_0,
            "1.1.0" => Version::V1_1_0,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        SUPPORTED_VERSIONS[self as usize]
    }
}

/// The network config, validated. Unknown keys are ignored, as the spec requires.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: Version,
    pub name: String,
    pub plugin_type: String,
    pub agent_socket: String,
    pub mtu: Option<u32>,
    pub host_veth_prefix: String,
    pub spool_dir: String,
    pub log_level: Level,
    pub log_file: Option<String>,
    pub del_timeout_ms: u64,
    pub prev_result: Option<Value>,
    /// GC: `cni.dev/valid-attachments` (or the older `cni.dev/attachments`), when present.
    pub valid_attachments: Option<Vec<GcAttachment>>,
}

/// One entry of `cni.dev/valid-attachments`. Validated later so a bad entry is reported, not fatal.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct GcAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

pub const DEFAULT_DEL_TIMEOUT_MS: u64 = 2000;
/// `delTimeoutMs` bounds: below 100 ms a loaded agent would miss it and every DEL would take the
/// slow path; above 30 s the runtime's own DEL timeout would fire first.
pub const DEL_TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=30_000;

/// Raw shape, for type checking only; every field optional so missing ones get a precise message.
#[derive(Deserialize)]
struct RawConf {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    #[serde(rename = "agentSocket")]
    agent_socket: Option<String>,
    mtu: Option<u32>,
    #[serde(rename = "hostVethPrefix")]
    host_veth_prefix: Option<String>,
    #[serde(rename = "spoolDir")]
    spool_dir: Option<String>,
    #[serde(rename = "logLevel")]
    log_level: Option<String>,
    #[serde(rename = "logFile")]
    log_file: Option<String>,
    #[serde(rename = "delTimeoutMs")]
    del_timeout_ms: Option<u64>,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<GcAttachment>>,
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<Vec<GcAttachment>>,
}

/// Reads `cniVersion` only, so even a config that fails validation gets its error rendered in the
/// version the runtime asked for.
pub fn peek_version(stdin: &[u8]) -> Option<Version> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    Version::parse(v.get("cniVersion")?.as_str()?)
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> CniResult<NetConf> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(Code::Decode, "network config on stdin is not valid JSON")
                .with_details(e.to_string())
        })?;
        if !value.is_object() {
            return Err(CniError::new(
                Code::Decode,
                "network config on stdin must be a JSON object",
            ));
        }
        let raw: RawConf = serde_json::from_value(value).map_err(|e| {
            CniError::config("network config has a field of the wrong type")
                .with_details(e.to_string())
        })?;
        let version = raw
            .cni_version
            .ok_or_else(|| CniError::config("network config has no cniVersion"))?;
        let cni_version = Version::parse(&version).ok_or_else(|| {
            CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "cniVersion {version:?} is not supported; use one of {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            )
        })?;
        let name = raw
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| CniError::config("network config has no name"))?;
        let plugin_type = raw
            .plugin_type
            .filter(|t| !t.is_empty())
            .ok_or_else(|| CniError::config("network config has no type"))?;
        let host_veth_prefix = raw
            .host_veth_prefix
            .unwrap_or_else(|| vnet_api::DEFAULT_HOST_VETH_PREFIX.to_owned());
        vnet_api::validate_veth_prefix(&host_veth_prefix)
            .map_err(|e| CniError::config(format!("hostVethPrefix: {e}")))?;
        let log_level = match raw.log_level {
            Some(l) => l.parse().map_err(CniError::config)?,
            None => Level::Warn,
        };
        if let Some(mtu) = raw.mtu
            && !(68..=65535).contains(&mtu)
        {
            return Err(CniError::config(format!(
                "mtu {mtu} is out of range 68..65535"
            )));
        }
        let del_timeout_ms = raw.del_timeout_ms.unwrap_or(DEFAULT_DEL_TIMEOUT_MS);
        if !DEL_TIMEOUT_MS_RANGE.contains(&del_timeout_ms) {
            return Err(CniError::config(format!(
                "delTimeoutMs {del_timeout_ms} is out of range {}..{} (milliseconds DEL waits for the agent)",
                DEL_TIMEOUT_MS_RANGE.start(),
                DEL_TIMEOUT_MS_RANGE.end()
            )));
        }
        let agent_socket = absolute_path("agentSocket", raw.agent_socket)?
            .unwrap_or_else(|| vnet_api::DEFAULT_SOCKET_PATH.to_owned());
        let spool_dir = absolute_path("spoolDir", raw.spool_dir)?
            .unwrap_or_else(|| vnet_api::DEFAULT_SPOOL_DIR.to_owned());
        // An empty logFile has always meant "stderr only".
        let log_file = absolute_path("logFile", raw.log_file.filter(|f| !f.is_empty()))?;
        Ok(NetConf {
            cni_version,
            name,
            plugin_type,
            agent_socket,
            mtu: raw.mtu,
            host_veth_prefix,
            spool_dir,
            log_level,
            log_file,
            del_timeout_ms,
            prev_result: raw.prev_result,
            valid_attachments: raw.valid_attachments.or(raw.attachments),
        })
    }
}

/// A path from the config must be absolute: the runtime starts the plugin in whatever working
/// directory it has, so a relative one would land somewhere different on every node and runtime.
fn absolute_path(field: &str, value: Option<String>) -> CniResult<Option<String>> {
    match value {
        Some(p) if !std::path::Path::new(&p).is_absolute() => Err(CniError::config(format!(
            "{field} {p:?} must be an absolute path (the plugin's working directory is whatever the runtime gives it)"
        ))),
        other => Ok(other),
    }
}

/// `CNI_ARGS`: `K=V;K=V`. Unknown keys are an error unless `IgnoreUnknown` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod: PodRef,
    pub infra_container_id: Option<String>,
}

impl CniArgs {
    pub fn parse(s: &str) -> CniResult<CniArgs> {
        let mut args = CniArgs::default();
        let mut unknown = Vec::new();
        let mut ignore_unknown = false;
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                CniError::env(format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"))
            })?;
            let value = Some(v.to_owned()).filter(|v| !v.is_empty());
            match k {
                "IgnoreUnknown" => {
                    ignore_unknown = matches!(v.to_ascii_lowercase().as_str(), "1" | "true")
                }
                "K8S_POD_NAMESPACE" => args.pod.namespace = value,
                "K8S_POD_NAME" => args.pod.name = value,
                "K8S_POD_UID" => args.pod.uid = value,
                "K8S_POD_INFRA_CONTAINER_ID" => args.infra_container_id = value,
                other => unknown.push(other.to_owned()),
            }
        }
        if !unknown.is_empty() && !ignore_unknown {
            return Err(CniError::env(format!(
                "CNI_ARGS has unknown keys {} (set IgnoreUnknown=1 to allow them)",
                unknown.join(", ")
            )));
        }
        Ok(args)
    }
}

/// An interface in the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub sandbox: Option<String>,
}

/// What ADD made, independent of the version it is rendered in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddResult {
    pub host: Interface,
    pub pod: Interface,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl AddResult {
    /// Renders the result in `version`: 0.3.x and 0.4.0 carry `ips[].version`; 1.1.0 adds the
    /// interface MTU and the route scope.
    pub fn render(&self, version: Version) -> Value {
        let iface = |i: &Interface| {
            let mut m = Map::new();
            m.insert("name".into(), json!(i.name));
            m.insert("mac".into(), json!(format_mac(&i.mac)));
            if version >= Version::V1_1_0 {
                m.insert("mtu".into(), json!(i.mtu));
            }
            if let Some(s) = &i.sandbox {
                m.insert("sandbox".into(), json!(s));
            }
            Value::Object(m)
        };
        let mut ip = Map::new();
        if version < Version::V1_0_0 {
            ip.insert("version".into(), json!("4"));
        }
        ip.insert("address".into(), json!(format!("{}/32", self.ip)));
        ip.insert("gateway".into(), json!(self.gateway.to_string()));
        // Index into `interfaces`: the pod end is second.
        ip.insert("interface".into(), json!(1));
        let mut link_route = Map::new();
        link_route.insert("dst".into(), json!(format!("{}/32", self.gateway)));
        if version >= Version::V1_1_0 {
            // RT_SCOPE_LINK
            link_route.insert("scope".into(), json!(253));
        }
        json!({
            "cniVersion": version.as_str(),
            "interfaces": [iface(&self.host), iface(&self.pod)],
            "ips": [Value::Object(ip)],
            "routes": [
                Value::Object(link_route),
                {"dst": "0.0.0.0/0", "gw": self.gateway.to_string()},
            ],
            "dns": {},
        })
    }
}

/// The IPv4 addresses a prevResult (of any version) lists, without prefix length.
pub fn prev_result_ips(prev: &Value) -> Vec<Ipv4Addr> {
    prev.get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

/// Validates GC attachments into keys; invalid entries are returned as messages.
pub fn gc_keys(list: &[GcAttachment]) -> (Vec<AttachmentKey>, Vec<String>) {
    let mut keys = Vec::new();
    let mut bad = Vec::new();
    for a in list {
        match (
            a.container_id.parse::<ContainerId>(),
            a.ifname.parse::<IfName>(),
        ) {
            (Ok(container_id), Ok(ifname)) => keys.push(AttachmentKey {
                container_id,
                ifname,
            }),
            (Err(e), _) | (_, Err(e)) => bad.push(format!("valid attachment skipped: {e}")),
        }
    }
    (keys, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> CniResult<NetConf> {
        NetConf::parse(
            format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"vnet-cni"{extra}}}"#).as_bytes(),
        )
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c = conf(r#","someFutureKey":{"x":1},"runtimeConfig":{"portMappings":[]}"#).unwrap();
        assert_eq!(c.agent_socket, vnet_api::DEFAULT_SOCKET_PATH);
        assert_eq!(c.host_veth_prefix, "vnet");
        assert_eq!(c.spool_dir, vnet_api::DEFAULT_SPOOL_DIR);
        assert_eq!(c.log_level, Level::Warn);
        assert_eq!(c.mtu, None);
        let c = conf(
            r#","mtu":1400,"hostVethPrefix":"azv","logLevel":"debug","agentSocket":"/x.sock""#,
        )
        .unwrap();
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(c.host_veth_prefix, "azv");
        assert_eq!(c.agent_socket, "/x.sock");
    }

    #[test]
    fn config_errors_have_the_right_codes() {
        assert_eq!(NetConf::parse(b"nope").unwrap_err().code, Code::Decode);
        assert_eq!(NetConf::parse(b"[1]").unwrap_err().code, Code::Decode);
        assert_eq!(
            conf(r#","mtu":"big""#).unwrap_err().code,
            Code::InvalidConfig
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.0.0","type":"vnet-cni"}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n"}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"0.2.0","name":"n","type":"t"}"#)
                .unwrap_err()
                .code,
            Code::IncompatibleVersion
        );
        assert_eq!(
            conf(r#","hostVethPrefix":"vdel""#).unwrap_err().code,
            Code::InvalidConfig
        );
        assert_eq!(
            conf(r#","logLevel":"loud""#).unwrap_err().code,
            Code::InvalidConfig
        );
        for bad in ["0", "99", "30001", "-1", "\"2000\""] {
            let err = conf(&format!(r#","delTimeoutMs":{bad}"#)).unwrap_err();
            assert_eq!(err.code, Code::InvalidConfig, "{bad}");
        }
        let err = conf(r#","delTimeoutMs":5"#).unwrap_err();
        assert!(err.msg.contains("delTimeoutMs 5"), "{}", err.msg);
        assert_eq!(conf(r#","delTimeoutMs":100"#).unwrap().del_timeout_ms, 100);
        assert_eq!(
            conf(r#","delTimeoutMs":30000"#).unwrap().del_timeout_ms,
            30_000
        );
        assert_eq!(conf("").unwrap().del_timeout_ms, DEFAULT_DEL_TIMEOUT_MS);
    }

    #[test]
    fn relative_paths_are_code_7_naming_the_field() {
        for field in ["logFile", "spoolDir", "agentSocket"] {
            for bad in ["1.1.0", "log/x", "./agent.sock", "../spool"] {
                let err = conf(&format!(r#","{field}":"{bad}""#)).unwrap_err();
                assert_eq!(err.code, Code::InvalidConfig, "{field}={bad}");
                assert!(
                    err.msg.contains(field) && err.msg.contains("absolute"),
                    "{}",
                    err.msg
                );
            }
        }
        assert_eq!(
            conf(r#","spoolDir":"""#).unwrap_err().code,
            Code::InvalidConfig
        );
        assert_eq!(
            conf(r#","agentSocket":"""#).unwrap_err().code,
            Code::InvalidConfig
        );
        let c = conf(r#","logFile":"","spoolDir":"/s","agentSocket":"/a.sock""#).unwrap();
        assert_eq!(c.log_file, None);
        assert_eq!(c.spool_dir, "/s");
        let c = conf(r#","logFile":"/var/log/vnet-cni.log""#).unwrap();
        assert_eq!(c.log_file.as_deref(), Some("/var/log/vnet-cni.log"));
    }

    #[test]
    fn gc_attachments_accept_both_keys() {
        let c = conf(r#","cni.dev/attachments":[{"containerID":"a","ifname":"eth0"}]"#).unwrap();
        assert_eq!(c.valid_attachments.unwrap().len(), 1);
        let c = conf(r#","cni.dev/valid-attachments":[{"containerID":"b","ifname":"eth0"},{"containerID":"-x","ifname":"eth0"}]"#).unwrap();
        let (keys, bad) = gc_keys(&c.valid_attachments.unwrap());
        assert_eq!(keys.len(), 1);
        assert_eq!(bad.len(), 1);
    }

    #[test]
    fn cni_args_follow_ignore_unknown() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u1;FOO=bar",
        )
        .unwrap();
        assert_eq!(a.pod.namespace.as_deref(), Some("default"));
        assert_eq!(a.pod.name.as_deref(), Some("web-0"));
        assert_eq!(a.pod.uid.as_deref(), Some("u1"));
        assert_eq!(a.infra_container_id.as_deref(), Some("abc"));
        assert_eq!(
            CniArgs::parse("FOO=bar").unwrap_err().code,
            Code::InvalidEnvironment
        );
        assert_eq!(
            CniArgs::parse("FOO").unwrap_err().code,
            Code::InvalidEnvironment
        );
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
    }

    fn result() -> AddResult {
        AddResult {
            host: Interface {
                name: "vnet0123456789a".into(),
                mac: [2, 0, 0, 0, 0, 1],
                mtu: 1500,
                sandbox: None,
            },
            pod: Interface {
                name: "eth0".into(),
                mac: [2, 0, 0, 0, 0, 2],
                mtu: 1500,
                sandbox: Some("/var/run/netns/p".into()),
            },
            ip: Ipv4Addr::new(10, 240, 0, 9),
            gateway: vnet_api::POD_GATEWAY,
        }
    }

    #[test]
    fn results_follow_each_version() {
        for v in SUPPORTED_VERSIONS {
            let version = Version::parse(v).unwrap();
            let r = result().render(version);
            assert_eq!(r["cniVersion"], v);
            assert_eq!(r["interfaces"][1]["sandbox"], "/var/run/netns/p");
            assert_eq!(r["interfaces"][0]["mac"], "02:00:00:00:00:01");
            assert_eq!(r["ips"][0]["address"], "10.240.0.9/32");
            assert_eq!(r["ips"][0]["interface"], 1);
            assert_eq!(r["ips"][0]["gateway"], "169.254.1.1");
            assert_eq!(r["routes"][1]["gw"], "169.254.1.1");
            let has_version = r["ips"][0].get("version").is_some();
            assert_eq!(has_version, version < Version::V1_0_0, "{v}");
            assert_eq!(
                r["routes"][0].get("scope").is_some(),
                version == Version::V1_1_0
            );
            assert_eq!(prev_result_ips(&r), vec![Ipv4Addr::new(10, 240, 0, 9)]);
        }
    }
}
