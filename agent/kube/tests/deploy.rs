//! CI checks of deploy/: every Kubernetes manifest deserializes into its k8s-openapi type without
//! losing a field (a misspelled or misplaced key fails), the checked-in CRD is what the Rust types
//! generate, the agent configs use only keys the agent knows, and the Terraform files parse and
//! are tidy.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn files_under(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if !name.starts_with('.') {
                    pending.push(path);
                }
            } else if extensions.iter().any(|ext| name.ends_with(ext)) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Kubernetes manifests: deploy/crds, deploy/manifests, deploy/kind (but its kind cluster config)
/// and deploy/*.yaml. deploy/node-image (cloud-init for image builders) and deploy/terraform are
/// not Kubernetes objects.
fn manifest_files() -> Vec<PathBuf> {
    let deploy = deploy_dir();
    let top_level = std::fs::read_dir(&deploy)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    let mut files: Vec<PathBuf> = ["crds", "manifests", "kind"]
        .into_iter()
        .flat_map(|dir| files_under(&deploy.join(dir), &[".yaml", ".yml"]))
        .chain(top_level)
        .filter(|p| p.file_name().unwrap() != "kind-config.yaml")
        .collect();
    files.sort();
    files
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let yaml = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            serde_json::to_value(yaml).unwrap()
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The first place where `a` and `b` differ, as a JSON path.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(xv), Some(yv)) => first_difference(xv, yv, &format!("{path}.{k}")),
                (Some(_), None) => {
                    Some(format!("{path}.{k} (dropped: unknown or misplaced field)"))
                }
                (None, Some(_)) => Some(format!("{path}.{k} (added)")),
                (None, None) => None,
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (xv, yv))| first_difference(xv, yv, &format!("{path}[{i}]"))),
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => None,
        _ if a == b => None,
        _ => Some(format!("{path}: {a} != {b}")),
    }
}

/// Deserializes into `T` and back: a field k8s-openapi does not know is dropped and reported.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let value: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&value).unwrap();
    match first_difference(doc, &back, "") {
        None => Ok(value),
        Some(difference) => Err(difference),
    }
}

fn check_document(doc: &Value) -> Result<(), String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("apps/v1", "DaemonSet") => typed::<DaemonSet>(doc).map(drop),
        ("apps/v1", "Deployment") => typed::<Deployment>(doc).map(drop),
        ("v1", "ConfigMap") => typed::<ConfigMap>(doc).map(drop),
        ("v1", "Service") => typed::<Service>(doc).map(drop),
        ("v1", "ServiceAccount") => typed::<ServiceAccount>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => typed::<ClusterRole>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            typed::<ClusterRoleBinding>(doc).map(drop)
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            typed::<CustomResourceDefinition>(doc).map(drop)
        }
        _ => Err(format!("no check for {api_version} {kind}: add one")),
    }
}

fn all_documents() -> Vec<(PathBuf, Value)> {
    manifest_files()
        .into_iter()
        .flat_map(|path| {
            documents(&path)
                .into_iter()
                .map(move |doc| (path.clone(), doc))
        })
        .collect()
}

fn find(kind: &str, name: &str) -> Value {
    all_documents()
        .into_iter()
        .map(|(_, doc)| doc)
        .find(|doc| doc["kind"] == kind && doc["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/"))
}

#[test]
fn every_manifest_is_a_valid_kubernetes_object() {
    let files = manifest_files();
    assert!(files.len() >= 6, "too few manifests found: {files:?}");
    let mut failures = Vec::new();
    let mut kinds = BTreeSet::new();
    for (path, doc) in all_documents() {
        kinds.insert(doc["kind"].as_str().unwrap_or_default().to_string());
        if let Err(e) = check_document(&doc) {
            failures.push(format!(
                "{} ({} {}): {e}",
                path.display(),
                doc["kind"],
                doc["metadata"]["name"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "invalid manifests:\n{}",
        failures.join("\n")
    );
    for kind in [
        "CustomResourceDefinition",
        "DaemonSet",
        "ConfigMap",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.contains(kind), "no {kind} in deploy/");
    }
}

#[test]
fn the_check_catches_a_misspelled_field() {
    let doc = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x", "namespce": "kube-system"},
    });
    let err = check_document(&doc).unwrap_err();
    assert!(err.contains("metadata.namespce"), "{err}");
}

#[test]
fn checked_in_crd_is_what_the_types_generate() {
    let path = deploy_dir().join("crds/nodeippool.yaml");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == vnet_kube::crd_yaml(),
        "{} is stale: run `cargo run -p vnet-kube --bin crdgen > deploy/crds/nodeippool.yaml`",
        path.display()
    );
}

#[test]
fn agent_runs_with_least_privilege_and_api_independent_probes() {
    let ds: DaemonSet = typed(&find("DaemonSet", "vnet-cni-agent")).unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("vnet-cni-agent"));

    let agent = pod.containers.iter().find(|c| c.name == "agent").unwrap();
    let security = agent.security_context.as_ref().unwrap();
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let caps = security.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(caps.add.as_deref(), Some(&["NET_ADMIN".to_string()][..]));

    for (probe, path) in [
        (agent.liveness_probe.as_ref(), "/healthz"),
        (agent.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe.unwrap().http_get.as_ref().expect("an httpGet probe");
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9464)
        );
    }

    let host_paths: BTreeSet<String> = pod
        .volumes
        .unwrap()
        .into_iter()
        .filter_map(|v| v.host_path.map(|h| h.path))
        .collect();
    for dir in [
        "/run/vnet-cni",
        "/var/lib/vnet-cni",
        "/etc/cni/net.d",
        "/opt/cni/bin",
    ] {
        assert!(host_paths.contains(dir), "{dir} not mounted");
    }

    let install = pod
        .init_containers
        .unwrap()
        .into_iter()
        .find(|c| c.name == "install-cni")
        .unwrap();
    let script = install.command.unwrap().join(" ");
    assert!(
        script.contains(".tmp") && script.contains("mv -f"),
        "install-cni must copy to a temp file and rename: {script}"
    );
}

// The ClusterRole is checked against the calls the agent really makes in
// tests/integration.rs (`cluster_role_grants_exactly_what_the_scenarios_call`).

/// The agent rejects unknown keys: a ConfigMap with a typo would crash-loop on every node.
#[test]
fn agent_configs_use_only_keys_the_agent_knows() {
    let top: BTreeSet<&str> = [
        "node_name",
        "socket_path",
        "state_dir",
        "metrics_address",
        "mtu",
        "masquerade",
        "non_masquerade_cidrs",
        "host_veth_prefix",
        "log_format",
        "log_level",
        "cni_conf_dir",
        "cloud",
        "pool",
    ]
    .into();
    let cloud: BTreeSet<&str> = [
        "provider",
        "arm_endpoint",
        "imds_endpoint",
        "credential",
        "client_id",
        "tenant_id",
        "client_secret_file",
        "pod_subnet_id",
    ]
    .into();
    let pool: BTreeSet<&str> = [
        "warm",
        "batch",
        "max",
        "release_delay_secs",
        "cooldown_secs",
        "allocate_timeout_secs",
    ]
    .into();
    let mut seen = 0;
    for (path, doc) in all_documents() {
        let Some(text) = doc["data"]["agent.toml"].as_str() else {
            continue;
        };
        seen += 1;
        let config: toml::Table = text
            .parse()
            .unwrap_or_else(|e| panic!("{}: agent.toml: {e}", path.display()));
        for (key, value) in &config {
            assert!(
                top.contains(key.as_str()),
                "{}: unknown key {key}",
                path.display()
            );
            let allowed = match key.as_str() {
                "cloud" => &cloud,
                "pool" => &pool,
                _ => continue,
            };
            for sub in value.as_table().unwrap().keys() {
                assert!(
                    allowed.contains(sub.as_str()),
                    "{}: unknown key {key}.{sub}",
                    path.display()
                );
            }
        }
        // The probes use this port.
        assert!(
            config["metrics_address"]
                .as_str()
                .unwrap()
                .ends_with(":9464"),
            "{}: metrics_address must stay on port 9464 (the DaemonSet's probes)",
            path.display()
        );
    }
    assert_eq!(seen, 2, "expected the AKS and the kind agent configs");
}

#[test]
fn kind_setup_is_consistent() {
    let config = documents(&deploy_dir().join("kind/kind-config.yaml"));
    let config = &config[0];
    assert_eq!(config["kind"], "Cluster");
    assert_eq!(config["networking"]["disableDefaultCNI"], true);
    let roles: Vec<&str> = config["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["control-plane", "worker", "worker"]);

    // The agent reaches the mock through the Service's fixed ClusterIP (no DNS before the CNI).
    let service: Service = typed(&find("Service", "vnet-mockcloud")).unwrap();
    let spec = service.spec.unwrap();
    let endpoint = format!(
        "http://{}:{}",
        spec.cluster_ip.unwrap(),
        spec.ports.unwrap()[0].port
    );
    let kind_config = documents(&deploy_dir().join("kind/agent-config.yaml"));
    let agent: toml::Table = kind_config[0]["data"]["agent.toml"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        agent["cloud"]["arm_endpoint"].as_str(),
        Some(endpoint.as_str())
    );
    assert_eq!(
        agent["cloud"]["imds_endpoint"].as_str(),
        Some(endpoint.as_str())
    );
    assert_eq!(agent["cloud"]["provider"].as_str(), Some("mock"));
}

fn terraform_files() -> Vec<PathBuf> {
    files_under(&deploy_dir().join("terraform"), &[".tf"])
}

#[test]
fn terraform_files_parse_and_are_tidy() {
    let files = terraform_files();
    assert!(!files.is_empty(), "no .tf files in deploy/terraform");
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        if let Err(e) = hcl::parse(&text) {
            panic!("{}: not valid HCL: {e}", path.display());
        }
        for (number, line) in text.lines().enumerate() {
            assert!(
                !line.contains('\t'),
                "{}:{}: tab (terraform fmt uses two spaces)",
                path.display(),
                number + 1
            );
            assert_eq!(
                line.trim_end(),
                line,
                "{}:{}: trailing whitespace",
                path.display(),
                number + 1
            );
        }
        assert!(
            text.ends_with('\n') && !text.ends_with("\n\n"),
            "{}: must end with one newline",
            path.display()
        );
    }
}

/// `terraform fmt -check` when terraform is installed; hcl-rs cannot check terraform's layout
/// (alignment of `=`), so without terraform only the tidiness test above runs.
#[test]
fn terraform_files_are_formatted_when_terraform_is_installed() {
    let Ok(mut child) = Command::new("terraform")
        .args(["fmt", "-check", "-diff", "-recursive"])
        .arg(deploy_dir().join("terraform"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!(
            "terraform is not installed: `terraform fmt -check` skipped (parse and tidiness still checked)"
        );
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("terraform fmt did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().unwrap();
    assert!(
        status.success(),
        "terraform fmt -check failed; run `terraform fmt -recursive deploy/terraform`:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every `"Microsoft.…/…"` string literal in a Terraform file.
fn azure_actions_in(text: &str) -> BTreeSet<String> {
    text.split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("Microsoft.") && s.contains('/') && !s.contains(' '))
        .map(String::from)
        .collect()
}

/// The agent's Azure role grants exactly the actions docs/cloud.md lists, no more, no fewer.
#[test]
fn terraform_grants_the_agent_exactly_the_actions_docs_cloud_md_lists() {
    let cloud_md = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/cloud.md");
    let doc =
        std::fs::read_to_string(&cloud_md).expect("docs/cloud.md lists the agent's permissions");
    // The rows of its permission table: "| `Microsoft.X/y` | why | scope |".
    let documented: BTreeSet<String> = doc
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`'))
        .map(|(action, _)| action.to_string())
        .filter(|action| action.starts_with("Microsoft."))
        .collect();
    assert!(
        documented.len() >= 5,
        "no permission table found in docs/cloud.md"
    );
    let main_tf = std::fs::read_to_string(deploy_dir().join("terraform/main.tf")).unwrap();
    assert_eq!(
        azure_actions_in(&main_tf),
        documented,
        "deploy/terraform/main.tf and docs/cloud.md disagree on the agent's permissions"
    );
}

/// Runs `program` with `args`, stdin and env, killing it after 30 s.
fn run_with_timeout(
    program: &str,
    args: &[&str],
    stdin: &str,
    env: &[(&str, String)],
) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{program} {args:?} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn kind_topology_lists_every_node_as_a_vm_in_the_node_subnet() {
    let script = deploy_dir().join("kind/topology.sh");
    let output = run_with_timeout(
        "bash",
        &[script.to_str().unwrap(), "172.18.0.0/16", "10.250.0.0/16"],
        "vnet-cni-control-plane 172.18.0.3\nvnet-cni-worker 172.18.0.2\nvnet-cni-worker2 172.18.0.4\n",
        &[],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let topology: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        topology["vnet"]["address_space"],
        serde_json::json!(["172.18.0.0/16", "10.250.0.0/16"])
    );
    assert_eq!(
        topology["subnets"],
        serde_json::json!([{"name": "nodes", "prefix": "172.18.0.0/16"},
                           {"name": "pods", "prefix": "10.250.0.0/16"}])
    );
    let vms = topology["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 3);
    assert_eq!(
        vms[2],
        serde_json::json!({"name": "vnet-cni-worker2", "subnet": "nodes", "primary_ip": "172.18.0.4"})
    );
    // The agent's pod_subnet_id names that "pods" subnet.
    let kind_config = documents(&deploy_dir().join("kind/agent-config.yaml"));
    let agent: toml::Table = kind_config[0]["data"]["agent.toml"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        agent["cloud"]["pod_subnet_id"]
            .as_str()
            .unwrap()
            .ends_with("/virtualNetworks/vnet/subnets/pods")
    );
}

/// The kind fabric's shell loop, run for two rounds against fake `wget`/`ip`/`sleep`: it routes
/// other nodes' pod addresses via their node, leaves its own node's alone, and removes the route of
/// a released address.
#[test]
fn kind_fabric_routes_other_nodes_pod_addresses_and_forgets_released_ones() {
    let ds = find("DaemonSet", "vnet-kind-fabric");
    let script = ds["spec"]["template"]["spec"]["containers"][0]["command"][2]
        .as_str()
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let work_dir = work.path().display().to_string();
    let script = script.replace("/tmp/", &format!("{work_dir}/"));
    let bin = work.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let fakes = [
        (
            "wget",
            r#"n=$(cat "$WORK/wget.count" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$WORK/wget.count"
while [ $# -gt 0 ]; do [ "$1" = -O ] && out=$2; shift; done
cp "$WORK/state$n.json" "$out""#,
        ),
        ("ip", r#"echo "$*" >> "$WORK/ip.log""#),
        (
            "sleep",
            r#"n=$(cat "$WORK/sleep.count" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$WORK/sleep.count"
[ "$n" -ge 2 ] && kill "$PPID"; exit 0"#,
        ),
    ];
    for (name, body) in fakes {
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The shape of the mock's GET /admin/state.
    let address = |ip: &str, vm: &str, primary: bool| {
        serde_json::json!({"ip": ip, "nic": format!("{vm}-nic"), "vm": vm, "ip_configuration": "c",
                           "subnet": if primary { "nodes" } else { "pods" }, "primary": primary, "pending": false})
    };
    let nics = serde_json::json!([{"name": "worker-nic", "vm": "worker", "etag": "1", "provisioning_state": "Succeeded", "ip_configurations": 2}]);
    let first = serde_json::json!({"addresses": [
        address("172.18.0.2", "worker", true), address("172.18.0.3", "worker2", true),
        address("10.250.0.5", "worker2", false), address("10.250.0.6", "worker", false),
        address("10.250.0.7", "worker2", false)], "nics": nics});
    let second = serde_json::json!({"addresses": [
        address("172.18.0.2", "worker", true), address("172.18.0.3", "worker2", true),
        address("10.250.0.6", "worker", false), address("10.250.0.7", "worker2", false)], "nics": nics});
    std::fs::write(work.path().join("state1.json"), first.to_string()).unwrap();
    std::fs::write(work.path().join("state2.json"), second.to_string()).unwrap();

    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run_with_timeout(
        "sh",
        &["-c", &script],
        "",
        &[
            ("PATH", path),
            ("WORK", work_dir.clone()),
            ("NODE_NAME", "worker".into()),
            ("MOCK", "http://mock".into()),
        ],
    );
    let log = std::fs::read_to_string(work.path().join("ip.log")).unwrap_or_default();
    let calls: Vec<&str> = log.lines().collect();
    assert_eq!(
        calls,
        [
            "route replace 10.250.0.5/32 via 172.18.0.3",
            "route replace 10.250.0.7/32 via 172.18.0.3",
            "route replace 10.250.0.7/32 via 172.18.0.3",
            "route del 10.250.0.5/32",
        ],
        "the fabric's ip calls"
    );
}

/// What the API server would only catch at apply time (or the kubelet at pod start): mounts of
/// undeclared volumes, ConfigMaps and ServiceAccounts that nothing in deploy/ creates.
#[test]
fn pod_templates_reference_only_what_exists() {
    let docs = all_documents();
    let names_of = |kind: &str| -> BTreeSet<String> {
        docs.iter()
            .filter(|(_, d)| d["kind"] == kind)
            .map(|(_, d)| d["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let config_maps = names_of("ConfigMap");
    let accounts = names_of("ServiceAccount");
    let mut templates = 0;
    for (path, doc) in &docs {
        let spec = &doc["spec"]["template"]["spec"];
        if spec.is_null() {
            continue;
        }
        templates += 1;
        let pod: k8s_openapi::api::core::v1::PodSpec =
            serde_json::from_value(spec.clone()).unwrap();
        let volumes: BTreeSet<String> = pod
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.clone())
            .collect();
        for container in pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
        {
            for mount in container.volume_mounts.iter().flatten() {
                assert!(
                    volumes.contains(&mount.name),
                    "{}: container {} mounts undeclared volume {}",
                    path.display(),
                    container.name,
                    mount.name
                );
            }
        }
        for volume in pod.volumes.iter().flatten() {
            if let Some(cm) = &volume.config_map {
                // The kind topology ConfigMap is generated by up.sh from the live nodes.
                assert!(
                    config_maps.contains(&cm.name) || cm.name == "vnet-mockcloud-topology",
                    "{}: ConfigMap {} is not defined in deploy/",
                    path.display(),
                    cm.name
                );
            }
        }
        if let Some(account) = &pod.service_account_name {
            assert!(
                accounts.contains(account),
                "{}: ServiceAccount {account} is not defined in deploy/",
                path.display()
            );
        }
    }
    assert!(
        templates >= 4,
        "expected the agent, uninstall, mock and fabric templates"
    );
}
