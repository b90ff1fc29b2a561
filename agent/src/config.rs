//! Agent configuration: a TOML file, then `VNET_AGENT_<KEY>` environment variables for top-level
//! keys, then command-line flags, each overriding the one before. Unknown keys are rejected so a
//! typo surfaces at start instead of silently falling back to a default. [`Config::validate`]
//! checks every value and names the key and what it allows.
//!
//! Every key, default and an example are documented in `docs/configuration.md`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::Parser;
use ipnetwork::Ipv4Network;
use serde::Deserialize;

/// Where the agent reads its configuration unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vnet-cni/agent.toml";
/// Secondary addresses one NIC can hold for pods: Azure's 256 ipConfigurations minus the primary.
pub const NIC_SECONDARY_LIMIT: u32 = 255;

/// The longest an allocation may wait for the pool. The plugin gives up on an allocation after
/// [`PLUGIN_ALLOCATE_WAIT_SECS`]; the agent must answer before that, with margin for the store
/// write and the reply, or its "try again later" reaches nobody.
pub const MAX_ALLOCATE_TIMEOUT_SECS: u64 = PLUGIN_ALLOCATE_WAIT_SECS - 5;
/// How long the vnet-cni plugin waits for an allocation (the contract's constant).
pub const PLUGIN_ALLOCATE_WAIT_SECS: u64 = vnet_api::ALLOCATE_WAIT_SECS;

/// The range rules of `pool.warm`, `pool.batch` and `pool.max`, shared by the configuration and
/// the per-node overrides. On failure: the offending key and why.
pub fn check_pool_sizes(warm: u32, batch: u32, max: u32) -> Result<(), (&'static str, String)> {
    check_pool_sizes_in(warm, batch, max, vnet_cloud::SINGLE_ADDRESS)
}

/// Addresses one ipConfiguration holds with entries of `prefix_len` (1, or 16 for a /28).
pub fn addresses_per_entry(prefix_len: u8) -> u32 {
    1 << (32 - u32::from(prefix_len.clamp(1, 32)))
}

/// [`check_pool_sizes`] for a pool whose entries have `prefix_len` (32: address mode). All
/// three count addresses in both modes; in prefix mode the NIC's 255 secondary
/// ipConfigurations hold 255 blocks.
pub fn check_pool_sizes_in(
    warm: u32,
    batch: u32,
    max: u32,
    prefix_len: u8,
) -> Result<(), (&'static str, String)> {
    let limit = NIC_SECONDARY_LIMIT * addresses_per_entry(prefix_len);
    if max == 0 || max > limit {
        let why = if prefix_len < vnet_cloud::SINGLE_ADDRESS {
            format!(
                "a NIC holds 256 IP configurations including the primary, so 255 blocks of {} addresses",
                addresses_per_entry(prefix_len)
            )
        } else {
            "a NIC holds 256 addresses including the primary".to_string()
        };
        return Err((
            "pool.max",
            format!("{max} is out of range; use 1 to {limit} ({why})"),
        ));
    }
    if batch == 0 || batch > max {
        return Err((
            "pool.batch",
            format!("{batch} is out of range; use 1 to pool.max ({max})"),
        ));
    }
    if warm > max {
        return Err((
            "pool.warm",
            format!("{warm} is out of range; use 0 to pool.max ({max})"),
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// `vnet-agent` command line. Flags override the file and the environment.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "vnet-agent",
    version,
    about = "vnet-cni node agent: VNet IP pool and allocation API for the vnet-cni plugin"
)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Unix socket the plugin talks to.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// Directory of the allocation store and the release spool.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Address of the Prometheus metrics listener (HTTP).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_address: Option<String>,
    /// Node name (default: the VM name from discovery).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Kubernetes client credentials. Without it the agent uses the in-cluster service account
    /// when `KUBERNETES_SERVICE_HOST` is set, and otherwise runs standalone.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// trace, debug, info, warn or error (or an EnvFilter directive).
    #[arg(long)]
    pub log_level: Option<String>,
    /// text or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Check the configuration and exit (0 when valid).
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Azure Resource Manager + IMDS.
    Azure,
    /// The Azure client against `vnet-mockcloud` endpoints (plain HTTP allowed; no credential,
    /// or the mock's static `test_token`).
    Mock,
    /// Cluster mode: no ARM call from the node. The agent asks the cluster allocator (a
    /// Deployment) through its NodeIPPool's status; only IMDS is read here. Needs a Kubernetes
    /// client.
    Cluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    ManagedIdentity,
    WorkloadIdentity,
    ClientSecret,
    /// A fixed bearer token (`test_token`) the mock maps to a permission set: mock provider only.
    TestToken,
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node_name: Option<String>,
    pub socket_path: PathBuf,
    pub state_dir: PathBuf,
    pub metrics_address: String,
    pub mtu: u32,
    pub masquerade: bool,
    pub non_masquerade_cidrs: Vec<String>,
    /// `false` (the default): pod traffic to IMDS (169.254.169.254) is dropped, so a pod cannot
    /// get the node identity's token. `true` for clusters whose pods need IMDS.
    pub pod_imds_access: bool,
    pub host_veth_prefix: String,
    pub log_format: LogFormat,
    pub log_level: String,
    /// `false`: leave the host alone (no ip_forward, no nftables, no veth deletion). For tests and
    /// runs without root; not for production.
    pub manage_host: bool,
    /// Where to write the CNI conflist once the agent is ready (`None`: write nothing).
    pub cni_conf_dir: Option<PathBuf>,
    pub cloud: CloudConfig,
    pub pool: PoolConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    pub provider: ProviderKind,
    pub arm_endpoint: String,
    pub imds_endpoint: String,
    pub credential: CredentialKind,
    pub client_id: String,
    pub tenant_id: String,
    pub client_secret_file: String,
    /// With `credential = "test_token"`: the bearer token sent to vnet-mockcloud.
    pub test_token: String,
    /// `provider = "cluster"`: how long the agent waits for the allocator's answer to one
    /// request before it withdraws the request and treats the call as failed (retried).
    pub cluster_answer_timeout_secs: u64,
    /// Not supported: must be empty. Azure refuses a NIC whose ipConfigurations are in different
    /// subnets, so pod addresses come from the node NIC's subnet (kept so that a config which
    /// still names it gets a clear error instead of "unknown key").
    pub pod_subnet_id: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// `address`: one address per ipConfiguration; `prefix`: a /28 block per ipConfiguration
    /// (16 addresses; docs/configuration.md).
    pub mode: PoolMode,
    pub warm: u32,
    pub batch: u32,
    pub max: u32,
    pub release_delay_secs: u64,
    pub cooldown_secs: u64,
    pub allocate_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_name: None,
            socket_path: PathBuf::from(vnet_api::DEFAULT_SOCKET_PATH),
            state_dir: PathBuf::from("/var/lib/vnet-cni"),
            metrics_address: "127.0.0.1:9464".into(),
            mtu: 1500,
            masquerade: true,
            non_masquerade_cidrs: Vec::new(),
            pod_imds_access: false,
            host_veth_prefix: vnet_api::DEFAULT_HOST_VETH_PREFIX.into(),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            manage_host: true,
            cni_conf_dir: None,
            cloud: CloudConfig::default(),
            pool: PoolConfig::default(),
        }
    }
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            provider: ProviderKind::Azure,
            // Empty: the cloud IMDS names (compute.azEnvironment).
            arm_endpoint: String::new(),
            imds_endpoint: "http://169.254.169.254".into(),
            credential: CredentialKind::ManagedIdentity,
            client_id: String::new(),
            tenant_id: String::new(),
            client_secret_file: String::new(),
            test_token: String::new(),
            cluster_answer_timeout_secs: 120,
            pod_subnet_id: String::new(),
        }
    }
}

/// What one ipConfiguration of the pool holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    #[default]
    Address,
    Prefix,
}

impl PoolMode {
    /// The prefix length of the pool's entries.
    pub fn prefix_len(self) -> u8 {
        match self {
            PoolMode::Address => vnet_cloud::SINGLE_ADDRESS,
            PoolMode::Prefix => vnet_cloud::AZURE_PREFIX_LENGTH,
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Address,
            warm: 8,
            batch: 8,
            max: 250,
            release_delay_secs: 300,
            cooldown_secs: 30,
            allocate_timeout_secs: 30,
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not allowed; use one of: text, json")),
        }
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(format!("{other:?} is not a boolean; use true or false")),
    }
}

impl Config {
    /// Loads file, environment and flags in that order. A missing file is an error unless it is
    /// the default path (then the defaults apply).
    pub fn load(cli: &Cli, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let path = cli
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => Config::from_toml(&text).map_err(|message| ConfigError::Parse {
                path: path.clone(),
                message,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && cli.config.is_none() => {
                Config::default()
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        config.apply_env(env)?;
        config.apply_cli(cli)?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn err(var: &str, message: String) -> ConfigError {
            ConfigError::Env {
                var: var.to_owned(),
                message,
            }
        }
        let get = |key: &str| {
            let var = format!("VNET_AGENT_{}", key.to_ascii_uppercase());
            env(&var).map(|value| (var, value))
        };
        if let Some((_, v)) = get("node_name") {
            self.node_name = Some(v);
        }
        if let Some((_, v)) = get("socket_path") {
            self.socket_path = v.into();
        }
        if let Some((_, v)) = get("state_dir") {
            self.state_dir = v.into();
        }
        if let Some((_, v)) = get("metrics_address") {
            self.metrics_address = v;
        }
        if let Some((var, v)) = get("mtu") {
            self.mtu = v
                .parse()
                .map_err(|e| err(&var, format!("{v:?} is not a number: {e}")))?;
        }
        if let Some((var, v)) = get("masquerade") {
            self.masquerade = parse_bool(&v).map_err(|m| err(&var, m))?;
        }
        if let Some((var, v)) = get("pod_imds_access") {
            self.pod_imds_access = parse_bool(&v).map_err(|m| err(&var, m))?;
        }
        if let Some((_, v)) = get("non_masquerade_cidrs") {
            self.non_masquerade_cidrs = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some((_, v)) = get("host_veth_prefix") {
            self.host_veth_prefix = v;
        }
        if let Some((var, v)) = get("log_format") {
            self.log_format = v.parse().map_err(|m| err(&var, m))?;
        }
        if let Some((_, v)) = get("log_level") {
            self.log_level = v;
        }
        if let Some((var, v)) = get("manage_host") {
            self.manage_host = parse_bool(&v).map_err(|m| err(&var, m))?;
        }
        if let Some((_, v)) = get("cni_conf_dir") {
            // Empty unsets a directory the file names.
            self.cni_conf_dir = (!v.is_empty()).then(|| v.into());
        }
        Ok(())
    }

    fn apply_cli(&mut self, cli: &Cli) -> Result<(), ConfigError> {
        if let Some(v) = &cli.socket_path {
            self.socket_path = v.clone();
        }
        if let Some(v) = &cli.state_dir {
            self.state_dir = v.clone();
        }
        if let Some(v) = &cli.metrics_address {
            self.metrics_address = v.clone();
        }
        if let Some(v) = &cli.node_name {
            self.node_name = Some(v.clone());
        }
        if let Some(v) = &cli.log_level {
            self.log_level = v.clone();
        }
        if let Some(v) = &cli.log_format {
            self.log_format = v.parse().map_err(|m: String| invalid("log_format", m))?;
        }
        Ok(())
    }

    /// Checks every value; the error names the key and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(name) = &self.node_name
            && (name.is_empty() || name.len() > 253)
        {
            return Err(invalid("node_name", "must be 1 to 253 characters"));
        }
        if !self.socket_path.is_absolute() {
            return Err(invalid("socket_path", "must be an absolute path"));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path"));
        }
        if let Some(dir) = &self.cni_conf_dir
            && !dir.is_absolute()
        {
            return Err(invalid("cni_conf_dir", "must be an absolute path"));
        }
        self.metrics_socket_addr()?;
        if !(576..=9000).contains(&self.mtu) {
            return Err(invalid(
                "mtu",
                format!("{} is out of range; use 576 to 9000", self.mtu),
            ));
        }
        self.non_masquerade_networks()?;
        vnet_api::validate_veth_prefix(&self.host_veth_prefix)
            .map_err(|e| invalid("host_veth_prefix", e.to_string()))?;
        tracing_subscriber::EnvFilter::try_new(&self.log_level).map_err(|e| {
            invalid(
                "log_level",
                format!(
                    "{:?} is not a level or filter ({e}); use trace, debug, info, warn or error",
                    self.log_level
                ),
            )
        })?;
        self.validate_cloud()?;
        let pool = &self.pool;
        check_pool_sizes_in(pool.warm, pool.batch, pool.max, pool.mode.prefix_len())
            .map_err(|(key, message)| invalid(key, message))?;
        if pool.allocate_timeout_secs == 0 || pool.allocate_timeout_secs > MAX_ALLOCATE_TIMEOUT_SECS
        {
            return Err(invalid(
                "pool.allocate_timeout_secs",
                format!(
                    "{} is out of range; use 1 to {MAX_ALLOCATE_TIMEOUT_SECS} (the plugin waits {} s for an allocation, so a longer wait would answer nobody)",
                    pool.allocate_timeout_secs, PLUGIN_ALLOCATE_WAIT_SECS
                ),
            ));
        }
        if pool.cooldown_secs > 3600 {
            return Err(invalid(
                "pool.cooldown_secs",
                format!("{} is out of range; use 0 to 3600", pool.cooldown_secs),
            ));
        }
        Ok(())
    }

    pub fn metrics_socket_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.metrics_address.parse().map_err(|_| {
            invalid(
                "metrics_address",
                format!(
                    "{:?} is not an address; use IP:PORT, e.g. 127.0.0.1:9464",
                    self.metrics_address
                ),
            )
        })
    }

    /// The configured non-masquerade CIDRs (empty: use the VNet's address space).
    pub fn non_masquerade_networks(&self) -> Result<Vec<Ipv4Network>, ConfigError> {
        self.non_masquerade_cidrs
            .iter()
            .map(|s| {
                s.parse::<Ipv4Network>().map_err(|_| {
                    invalid(
                        "non_masquerade_cidrs",
                        format!("{s:?} is not an IPv4 CIDR such as 10.240.0.0/16"),
                    )
                })
            })
            .collect()
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

impl Config {
    /// The `[cloud]` section: endpoints, credential kinds and what each provider allows.
    fn validate_cloud(&self) -> Result<(), ConfigError> {
        let cloud = &self.cloud;
        let mock = cloud.provider == ProviderKind::Mock;
        if cloud.cluster_answer_timeout_secs == 0 || cloud.cluster_answer_timeout_secs > 3600 {
            return Err(invalid(
                "cloud.cluster_answer_timeout_secs",
                format!(
                    "{} is out of range; use 1 to 3600",
                    cloud.cluster_answer_timeout_secs
                ),
            ));
        }
        if cloud.provider == ProviderKind::Cluster && !cloud.arm_endpoint.is_empty() {
            return Err(invalid(
                "cloud.arm_endpoint",
                "not used with provider = \"cluster\" (the node makes no ARM call; the allocator has the ARM settings): remove it",
            ));
        }
        if !cloud.pod_subnet_id.trim().is_empty() {
            return Err(invalid(
                "cloud.pod_subnet_id",
                format!(
                    "{:?}: not supported. Azure requires every ipConfiguration of a NIC to be in one subnet (\"IPConfigurations on a Nic cannot belong to different subnets\"), so pods take addresses from the node NIC's own subnet; remove the key (pods from a NIC of their own are a later capability)",
                    cloud.pod_subnet_id
                ),
            ));
        }
        if cloud.arm_endpoint.is_empty() {
            if mock {
                return Err(invalid(
                    "cloud.arm_endpoint",
                    "required with provider = \"mock\" (the vnet-mockcloud URL)",
                ));
            }
        } else if cloud.arm_endpoint.starts_with("http://") {
            if !mock {
                return Err(invalid(
                    "cloud.arm_endpoint",
                    format!(
                        "{:?}: plain http:// would send the ARM token unencrypted; use https:// (http:// is for provider = \"mock\" only), or leave it empty for the cloud IMDS names",
                        cloud.arm_endpoint
                    ),
                ));
            }
        } else if !cloud.arm_endpoint.starts_with("https://") {
            return Err(invalid(
                "cloud.arm_endpoint",
                format!("{:?} must be an https:// URL", cloud.arm_endpoint),
            ));
        }
        if !(cloud.imds_endpoint.starts_with("http://")
            || cloud.imds_endpoint.starts_with("https://"))
        {
            return Err(invalid(
                "cloud.imds_endpoint",
                format!(
                    "{:?} must be an http:// or https:// URL",
                    cloud.imds_endpoint
                ),
            ));
        }
        let needs = |key: &'static str, kind: &str| {
            invalid(key, format!("required when cloud.credential = \"{kind}\""))
        };
        match cloud.credential {
            CredentialKind::ClientSecret => {
                if cloud.tenant_id.is_empty() {
                    return Err(needs("cloud.tenant_id", "client_secret"));
                }
                if cloud.client_id.is_empty() {
                    return Err(needs("cloud.client_id", "client_secret"));
                }
                if cloud.client_secret_file.is_empty() {
                    return Err(needs("cloud.client_secret_file", "client_secret"));
                }
            }
            CredentialKind::WorkloadIdentity if cloud.tenant_id.is_empty() => {
                return Err(needs("cloud.tenant_id", "workload_identity"));
            }
            CredentialKind::TestToken => {
                if !mock {
                    return Err(invalid(
                        "cloud.credential",
                        "\"test_token\" is vnet-mockcloud's test credential: allowed only with provider = \"mock\"",
                    ));
                }
                if cloud.test_token.is_empty() {
                    return Err(needs("cloud.test_token", "test_token"));
                }
            }
            _ => {}
        }
        if !cloud.test_token.is_empty() && cloud.credential != CredentialKind::TestToken {
            return Err(invalid(
                "cloud.test_token",
                "only used with credential = \"test_token\"",
            ));
        }
        Ok(())
    }
}

/// Reads a secret file's content, trimmed (used for `cloud.client_secret_file`).
pub fn read_secret(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
node_name = "node-1"
socket_path = "/run/vnet-cni/agent.sock"
state_dir = "/var/lib/vnet-cni"
metrics_address = "127.0.0.1:9464"
mtu = 1500
masquerade = true
non_masquerade_cidrs = []
host_veth_prefix = "vnet"
log_format = "text"
log_level = "info"
[cloud]
provider = "azure"
arm_endpoint = ""
imds_endpoint = "http://169.254.169.254"
credential = "managed_identity"
client_id = ""
tenant_id = ""
client_secret_file = ""
test_token = ""
cluster_answer_timeout_secs = 120
pod_subnet_id = ""
[pool]
mode = "address"
warm = 8
batch = 8
max = 250
release_delay_secs = 300
cooldown_secs = 30
allocate_timeout_secs = 30
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_documented_example_parses_to_the_defaults() {
        let config = Config::from_toml(FULL).unwrap();
        config.validate().unwrap();
        let defaults = Config {
            node_name: Some("node-1".into()),
            ..Config::default()
        };
        assert_eq!(config, defaults);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::from_toml("[pool]\nwram = 3\n").unwrap_err();
        assert!(err.contains("wram"), "{err}");
        let err = Config::from_toml("sokcet_path = \"/x\"\n").unwrap_err();
        assert!(err.contains("sokcet_path"), "{err}");
    }

    #[test]
    fn enum_values_list_what_is_allowed() {
        let err = Config::from_toml("[cloud]\nprovider = \"aws\"\n").unwrap_err();
        assert!(err.contains("azure") && err.contains("mock"), "{err}");
        let err = Config::from_toml("log_format = \"xml\"\n").unwrap_err();
        assert!(err.contains("json"), "{err}");
    }

    #[test]
    fn prefix_mode_counts_addresses_up_to_255_blocks() {
        let ok =
            Config::from_toml("[pool]\nmode = \"prefix\"\nmax = 4080\nwarm = 16\nbatch = 16\n")
                .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.pool.mode, PoolMode::Prefix);
        assert_eq!(ok.pool.mode.prefix_len(), 28);
        // 256 addresses are too many for address mode and fine for prefix mode.
        let address = Config::from_toml("[pool]\nmax = 256\n").unwrap();
        assert!(
            address
                .validate()
                .unwrap_err()
                .to_string()
                .contains("pool.max")
        );
        let err = Config::from_toml("[pool]\nmode = \"prefix\"\nmax = 4081\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pool.max") && err.contains("4080") && err.contains("255 blocks of 16"),
            "{err}"
        );
        let err = Config::from_toml("[pool]\nmode = \"block\"\n").unwrap_err();
        assert!(err.contains("address") && err.contains("prefix"), "{err}");
    }

    #[test]
    fn validation_names_the_key_and_the_range() {
        let cases: &[(&str, &str)] = &[
            ("[pool]\nmax = 300\n", "pool.max"),
            ("[pool]\nbatch = 0\n", "pool.batch"),
            ("[pool]\nwarm = 251\n", "pool.warm"),
            (
                "[pool]\nallocate_timeout_secs = 0\n",
                "pool.allocate_timeout_secs",
            ),
            (
                "[pool]\nallocate_timeout_secs = 31\n",
                "pool.allocate_timeout_secs",
            ),
            ("mtu = 100\n", "mtu"),
            ("metrics_address = \"localhost\"\n", "metrics_address"),
            (
                "non_masquerade_cidrs = [\"10.0.0.0/33\"]\n",
                "non_masquerade_cidrs",
            ),
            ("host_veth_prefix = \"vdel\"\n", "host_veth_prefix"),
            ("socket_path = \"relative.sock\"\n", "socket_path"),
            ("cni_conf_dir = \"net.d\"\n", "cni_conf_dir"),
            ("log_level = \"loud[\"\n", "log_level"),
            (
                "[cloud]\ncredential = \"client_secret\"\n",
                "cloud.tenant_id",
            ),
            (
                "[cloud]\narm_endpoint = \"ftp://x\"\n",
                "cloud.arm_endpoint",
            ),
            (
                "[cloud]\narm_endpoint = \"http://127.0.0.1:1\"\n",
                "cloud.arm_endpoint",
            ),
            ("[cloud]\nprovider = \"mock\"\n", "cloud.arm_endpoint"),
            (
                "[cloud]\ncredential = \"test_token\"\ntest_token = \"t\"\n",
                "cloud.credential",
            ),
            (
                "[cloud]\nprovider = \"mock\"\narm_endpoint = \"http://x\"\ncredential = \"test_token\"\n",
                "cloud.test_token",
            ),
        ];
        for (toml, key) in cases {
            let err = Config::from_toml(toml).unwrap().validate().unwrap_err();
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn cluster_mode_takes_no_arm_endpoint_and_a_bounded_answer_wait() {
        let ok = Config::from_toml("[cloud]\nprovider = \"cluster\"\n").unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.cloud.provider, ProviderKind::Cluster);
        assert_eq!(ok.cloud.cluster_answer_timeout_secs, 120);
        for (toml, key) in [
            (
                "[cloud]\nprovider = \"cluster\"\narm_endpoint = \"https://management.azure.com\"\n",
                "cloud.arm_endpoint",
            ),
            (
                "[cloud]\nprovider = \"cluster\"\ncluster_answer_timeout_secs = 0\n",
                "cloud.cluster_answer_timeout_secs",
            ),
        ] {
            let err = Config::from_toml(toml).unwrap().validate().unwrap_err();
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn a_pod_subnet_is_refused_naming_azures_one_subnet_rule() {
        let err = Config::from_toml(
            "[cloud]\npod_subnet_id = \"/subscriptions/s/resourceGroups/r/providers/Microsoft.Network/virtualNetworks/v/subnets/pods\"\n",
        )
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cloud.pod_subnet_id")
                && err.contains("IPConfigurations on a Nic cannot belong to different subnets"),
            "{err}"
        );
        assert!(
            Config::from_toml("[cloud]\npod_subnet_id = \"\"\n")
                .unwrap()
                .validate()
                .is_ok()
        );
        let mock = Config::from_toml(
            "[cloud]\nprovider = \"mock\"\narm_endpoint = \"http://127.0.0.1:1\"\ncredential = \"test_token\"\ntest_token = \"t\"\n",
        )
        .unwrap();
        assert!(mock.validate().is_ok());
    }

    #[test]
    fn an_allocation_wait_longer_than_the_plugins_is_refused() {
        let ok = Config::from_toml("[pool]\nallocate_timeout_secs = 30\n").unwrap();
        assert!(ok.validate().is_ok());
        let err = Config::from_toml("[pool]\nallocate_timeout_secs = 35\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pool.allocate_timeout_secs") && err.contains("use 1 to 30"),
            "{err}"
        );
    }

    #[test]
    fn env_overrides_the_file_and_flags_override_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "mtu = 1400\nlog_level = \"warn\"\n").unwrap();
        let cli = Cli {
            config: Some(path),
            log_level: Some("debug".into()),
            ..Cli::default()
        };
        let env = |var: &str| match var {
            "VNET_AGENT_MTU" => Some("9000".to_string()),
            "VNET_AGENT_LOG_LEVEL" => Some("error".to_string()),
            "VNET_AGENT_NON_MASQUERADE_CIDRS" => Some("10.0.0.0/8, 192.168.0.0/16".to_string()),
            "VNET_AGENT_MASQUERADE" => Some("false".to_string()),
            _ => None,
        };
        let config = Config::load(&cli, env).unwrap();
        assert_eq!(config.mtu, 9000);
        assert_eq!(config.log_level, "debug");
        assert!(!config.masquerade);
        assert_eq!(config.non_masquerade_networks().unwrap().len(), 2);
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "").unwrap();
        let cli = Cli {
            config: Some(path),
            ..Cli::default()
        };
        let err =
            Config::load(&cli, |v| (v == "VNET_AGENT_MTU").then(|| "big".into())).unwrap_err();
        assert!(err.to_string().contains("VNET_AGENT_MTU"), "{err}");
        let cli = Cli {
            log_format: Some("xml".into()),
            ..cli
        };
        let err = Config::load(&cli, no_env).unwrap_err();
        assert!(err.to_string().contains("log_format"), "{err}");
    }

    #[test]
    fn an_explicit_missing_file_is_an_error() {
        let cli = Cli {
            config: Some("/nonexistent/agent.toml".into()),
            ..Cli::default()
        };
        assert!(matches!(
            Config::load(&cli, no_env),
            Err(ConfigError::Read { .. })
        ));
    }
}
