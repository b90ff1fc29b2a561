//! Reading deploy/: its manifests as JSON values, typed round trips that report dropped fields,
//! and running its scripts with a time limit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

pub fn files_under(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
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

/// Kubernetes manifests: deploy/crds, deploy/manifests, deploy/kind (but its kind cluster config),
/// deploy/cluster-mode
/// and deploy/*.yaml; kustomization.yaml files are kustomize's, not Kubernetes objects. deploy/node-image (cloud-init for image builders) and deploy/terraform are
/// not Kubernetes objects.
pub fn manifest_files() -> Vec<PathBuf> {
    let deploy = deploy_dir();
    let top_level = std::fs::read_dir(&deploy)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    let mut files: Vec<PathBuf> = ["crds", "manifests", "kind", "cluster-mode"]
        .into_iter()
        .flat_map(|dir| files_under(&deploy.join(dir), &[".yaml", ".yml"]))
        .chain(top_level)
        .filter(|p| {
            let name = p.file_name().unwrap();
            name != "kind-config.yaml" && name != "kustomization.yaml"
        })
        .collect();
    files.sort();
    files
}

pub fn documents(path: &Path) -> Vec<Value> {
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
pub fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
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
pub fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let value: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&value).unwrap();
    match first_difference(doc, &back, "") {
        None => Ok(value),
        Some(difference) => Err(difference),
    }
}

pub fn check_document(doc: &Value) -> Result<(), String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("apps/v1", "DaemonSet") => typed::<DaemonSet>(doc).map(drop),
        ("apps/v1", "Deployment") => typed::<Deployment>(doc).map(drop),
        ("policy/v1", "PodDisruptionBudget") => {
            typed::<k8s_openapi::api::policy::v1::PodDisruptionBudget>(doc).map(drop)
        }
        ("v1", "ConfigMap") => typed::<ConfigMap>(doc).map(drop),
        ("v1", "Service") => typed::<Service>(doc).map(drop),
        ("v1", "ServiceAccount") => typed::<ServiceAccount>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => typed::<ClusterRole>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            typed::<ClusterRoleBinding>(doc).map(drop)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => typed::<Role>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => typed::<RoleBinding>(doc).map(drop),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            typed::<CustomResourceDefinition>(doc).map(drop)
        }
        _ => Err(format!("no check for {api_version} {kind}: add one")),
    }
}

pub fn all_documents() -> Vec<(PathBuf, Value)> {
    manifest_files()
        .into_iter()
        .flat_map(|path| {
            documents(&path)
                .into_iter()
                .map(move |doc| (path.clone(), doc))
        })
        .collect()
}

pub fn find(kind: &str, name: &str) -> Value {
    all_documents()
        .into_iter()
        .map(|(_, doc)| doc)
        .find(|doc| doc["kind"] == kind && doc["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/"))
}

/// Runs `program` with `args`, stdin and env, killing it after 30 s.
pub fn run_with_timeout(
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
