//! deploy/ as kustomize renders it: one kustomization names every image, deploy/render.sh feeds
//! it, a config edit rolls the agents, every rendered object passes kubernetes-validate --strict,
//! and the DaemonSet is scoped and rolled out as a production CNI's should be.
//!
//! Rendering needs kubectl (built-in kustomize) or kustomize; the validation installs PyPI's
//! kubernetes-validate with pip when it is missing. Without kubectl the rendering tests say so
//! and check what they can from the files alone.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use serde::Deserialize;
use serde_json::Value;
use support::manifests::*;

/// The one image name every manifest uses; deploy/kustomization.yaml maps it to a reference.
const PLACEHOLDER: &str = "vnet-cni";

fn yaml_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(&text).unwrap()).unwrap()
}

fn containers(doc: &Value) -> Vec<&Value> {
    let spec = &doc["spec"]["template"]["spec"];
    ["initContainers", "containers"]
        .into_iter()
        .filter_map(|key| spec[key].as_array())
        .flatten()
        .collect()
}

#[test]
fn every_manifest_names_its_image_only_through_the_kustomization() {
    let mut seen = 0;
    for (path, doc) in all_documents() {
        for container in containers(&doc) {
            seen += 1;
            assert_eq!(
                container["image"],
                PLACEHOLDER,
                "{} ({} {}) container {}: say `image: {PLACEHOLDER}`; deploy/kustomization.yaml sets the reference",
                path.display(),
                doc["kind"],
                doc["metadata"]["name"],
                container["name"]
            );
        }
    }
    // The agent's three containers, the uninstall DaemonSet, the kind mock and fabric.
    assert!(seen >= 6, "only {seen} containers found");

    let kustomization = yaml_file(&deploy_dir().join("kustomization.yaml"));
    let images = kustomization["images"].as_array().expect("an images block");
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(images[0]["name"], PLACEHOLDER);
    let new_name = images[0]["newName"].as_str().unwrap();
    assert!(
        new_name.contains('/') && new_name.ends_with("/vnet-cni"),
        "a registry-qualified name: {new_name}"
    );
    assert!(images[0]["newTag"].as_str().is_some_and(|t| !t.is_empty()));
    // render.sh edits the copy's images block in place and appends components.
    let text = std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap();
    let last_block = text
        .lines()
        .rfind(|l| !l.starts_with(' ') && !l.starts_with('#') && !l.is_empty())
        .unwrap();
    assert_eq!(last_block, "images:", "keep images the last block");
    assert!(kustomization.get("components").is_none());
}

/// Every manifest with a container reaches kustomize through deploy/kustomization.yaml: as one of
/// its resources, a Component's (kind), or render.sh --uninstall's.
#[test]
fn every_manifest_with_an_image_is_rendered_through_the_kustomization() {
    let deploy = deploy_dir();
    let mut covered: BTreeSet<PathBuf> = BTreeSet::new();
    let mut add = |dir: &Path| {
        let k = yaml_file(&dir.join("kustomization.yaml"));
        for resource in k["resources"].as_array().unwrap() {
            covered.insert(dir.join(resource.as_str().unwrap()).canonicalize().unwrap());
        }
    };
    add(&deploy);
    for entry in std::fs::read_dir(&deploy).unwrap() {
        let dir = entry.unwrap().path();
        if dir.join("kustomization.yaml").exists() {
            assert_eq!(
                yaml_file(&dir.join("kustomization.yaml"))["kind"],
                "Component",
                "{}: flavours are Components, so deploy/kustomization.yaml's images cover them",
                dir.display()
            );
            add(&dir);
        }
    }
    covered.insert(deploy.join("uninstall.yaml").canonicalize().unwrap());
    for (path, doc) in all_documents() {
        if !containers(&doc).is_empty() {
            assert!(
                covered.contains(&path.canonicalize().unwrap()),
                "{} is not rendered through deploy/kustomization.yaml",
                path.display()
            );
        }
    }
}

fn kustomize_available() -> bool {
    ["kustomize", "kubectl"].into_iter().any(|tool| {
        Command::new(tool)
            .arg("version")
            .arg(if tool == "kubectl" {
                "--client"
            } else {
                "--short"
            })
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// `render.sh ARGS` from `deploy` (deploy/ or a copy of it): the objects, or its stderr.
fn render_in(deploy: &Path, args: &[&str]) -> Result<Vec<Value>, String> {
    let script = deploy.join("render.sh");
    let mut all = vec![script.to_str().unwrap()];
    all.extend(args);
    let output = run_with_timeout("bash", &all, "", &[]);
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let text = String::from_utf8(output.stdout).unwrap();
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap())
        .filter(|doc| !doc.is_null())
        .collect())
}

fn render(args: &[&str]) -> Vec<Value> {
    render_in(&deploy_dir(), args).unwrap_or_else(|e| panic!("render.sh {args:?}: {e}"))
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn images(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .flat_map(containers)
        .map(|c| c["image"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn render_feeds_one_image_into_every_flavour() {
    if !kustomize_available() {
        eprintln!("neither kubectl nor kustomize installed: rendering not checked");
        return;
    }
    let image = "myregistry.azurecr.io/team/vnet-cni:1.2.3";
    let default = render(&[]);
    let default_images = images(&default);
    assert_eq!(default_images.len(), 1, "{default_images:?}");
    assert!(
        default_images
            .iter()
            .all(|i| i.ends_with("/vnet-cni:0.1.0"))
    );

    for args in [
        vec!["--image", image],
        vec!["--image", image, "--component", "kind"],
        vec!["--image", image, "--component", "cluster-mode"],
        vec!["--image", image, "--uninstall"],
    ] {
        let docs = render(&args);
        assert_eq!(
            images(&docs),
            BTreeSet::from([image.to_string()]),
            "{args:?}"
        );
    }
    // A digest pins the image as well as a tag does.
    let pinned = "myregistry.azurecr.io/vnet-cni@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    assert_eq!(
        images(&render(&["--image", pinned])),
        BTreeSet::from([pinned.to_string()])
    );
    let kind = render(&["--image", image, "--component", "kind"]);
    named(&kind, "Deployment", "vnet-mockcloud");
    named(&kind, "DaemonSet", "vnet-kind-fabric");
    let uninstall = render(&["--uninstall"]);
    assert_eq!(uninstall.len(), 1);
    assert_eq!(uninstall[0]["metadata"]["name"], "vnet-cni-uninstall");

    // The mock flavour's config replaces the Azure one; the client id is fed into the Azure one.
    let config = |docs: &[Value]| -> toml::Table {
        let cm = docs
            .iter()
            .find(|d| d["kind"] == "ConfigMap")
            .expect("the agent's ConfigMap");
        cm["data"]["agent.toml"].as_str().unwrap().parse().unwrap()
    };
    assert_eq!(config(&kind)["cloud"]["provider"].as_str(), Some("mock"));
    let id = "0c5b7a8e-1d2f-4e3a-9b8c-7d6e5f4a3b2c";
    let aks = render(&["--client-id", id]);
    assert_eq!(config(&aks)["cloud"]["client_id"].as_str(), Some(id));
    assert_eq!(config(&aks)["cloud"]["provider"].as_str(), Some("azure"));
    // Cluster mode: the allocator and its roles, and the agents' config without a cloud
    // credential, the one the DaemonSet mounts.
    let cluster = render(&["--image", image, "--component", "cluster-mode"]);
    named(&cluster, "Deployment", "vnet-cni-allocator");
    named(&cluster, "PodDisruptionBudget", "vnet-cni-allocator");
    named(&cluster, "ClusterRole", "vnet-cni-allocator");
    named(&cluster, "Role", "vnet-cni-allocator");
    assert_eq!(
        config(&cluster)["cloud"]["provider"].as_str(),
        Some("cluster")
    );
    let ds = named(&cluster, "DaemonSet", "vnet-cni-agent");
    let mounted = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap()["configMap"]["name"]
        .clone();
    let cm = cluster.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    assert_eq!(cm["metadata"]["name"], mounted);

    for bad in [
        vec!["--image", "vnet-cni:1.0"],
        vec!["--image", "registry.example/vnet-cni:bad tag"],
        vec!["--client-id", "not-a-guid"],
        vec!["--component", "nonexistent"],
        vec!["--component", "kind", "--uninstall"],
        vec!["--frobnicate"],
    ] {
        let err = render_in(&deploy_dir(), &bad).expect_err(&format!("{bad:?} must fail"));
        assert!(err.starts_with("render.sh: "), "{bad:?}: {err}");
    }
}

/// The DaemonSet names the ConfigMap by a hash of its content, so a config edit applied with
/// kustomize changes the pod template (the agents roll) and an unchanged config does not.
#[test]
fn a_config_edit_rolls_the_agents() {
    if !kustomize_available() {
        eprintln!("neither kubectl nor kustomize installed: rendering not checked");
        return;
    }
    let config_name = |docs: &[Value]| -> String {
        let ds = named(docs, "DaemonSet", "vnet-cni-agent");
        let volumes = ds["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap();
        let name = volumes.iter().find(|v| v["name"] == "config").unwrap()["configMap"]["name"]
            .as_str()
            .unwrap()
            .to_string();
        named(docs, "ConfigMap", &name);
        name
    };
    let copy = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-R")
        .arg(deploy_dir().join("."))
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success());
    let before = config_name(&render_in(copy.path(), &[]).unwrap());
    assert!(before.starts_with("vnet-cni-config-"), "{before}");
    assert_eq!(before, config_name(&render_in(copy.path(), &[]).unwrap()));
    let agent_toml = copy.path().join("manifests/agent.toml");
    let text = std::fs::read_to_string(&agent_toml).unwrap();
    std::fs::write(&agent_toml, text.replace("warm = 8", "warm = 16")).unwrap();
    let after = config_name(&render_in(copy.path(), &[]).unwrap());
    assert_ne!(before, after, "a config edit must change the pod template");
}

/// PyPI's kubernetes-validate, installed with pip when missing; `None` when that fails.
fn kubernetes_validate() -> Option<PathBuf> {
    let find = || {
        let output = Command::new("python3")
            .args([
                "-c",
                "import shutil,sys; print(shutil.which('kubernetes-validate') or '')",
            ])
            .output()
            .ok()?;
        let path = String::from_utf8(output.stdout).ok()?.trim().to_string();
        (!path.is_empty()).then(|| PathBuf::from(path))
    };
    if let Some(path) = find() {
        return Some(path);
    }
    eprintln!("installing kubernetes-validate with pip");
    let installed = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "kubernetes-validate"])
        .status()
        .is_ok_and(|s| s.success());
    if installed { find() } else { None }
}

/// The Kubernetes version the manifests are validated against (k8s-openapi's feature, too).
const KUBERNETES_VERSION: &str = "1.33.0";

fn validate(tool: &Path, file: &Path) -> Result<(), String> {
    let output = run_with_timeout(
        tool.to_str().unwrap(),
        &[
            "--strict",
            "--quiet",
            "-k",
            KUBERNETES_VERSION,
            file.to_str().unwrap(),
        ],
        "",
        &[],
    );
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

#[test]
fn every_manifest_passes_kubernetes_validate_strict() {
    let tool = kubernetes_validate().expect(
        "kubernetes-validate is not installed and `python3 -m pip install kubernetes-validate` failed",
    );
    let work = tempfile::tempdir().unwrap();
    // The tool is strict: an unknown field fails.
    let bad = work.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: x\n  namespce: kube-system\n",
    )
    .unwrap();
    assert!(
        validate(&tool, &bad).is_err(),
        "--strict let an unknown field through"
    );

    let mut failures = Vec::new();
    for path in manifest_files() {
        if let Err(e) = validate(&tool, &path) {
            failures.push(format!("{}: {e}", path.display()));
        }
    }
    if kustomize_available() {
        for (label, args) in [
            ("aks", vec![]),
            ("kind", vec!["--component", "kind"]),
            ("cluster-mode", vec!["--component", "cluster-mode"]),
            ("uninstall", vec!["--uninstall"]),
        ] {
            let docs = render(&args);
            let file = work.path().join(format!("{label}.yaml"));
            let text: String = docs
                .iter()
                .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
                .collect();
            std::fs::write(&file, text).unwrap();
            if let Err(e) = validate(&tool, &file) {
                failures.push(format!("render.sh {args:?}: {e}"));
            }
        }
    } else {
        eprintln!("neither kubectl nor kustomize installed: rendered output not validated");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_agent_runs_on_linux_nodes_only_never_on_virtual_kubelet_and_rolls_by_percentage() {
    let ds: DaemonSet = typed(&find("DaemonSet", "vnet-cni-agent")).unwrap();
    let spec = ds.spec.unwrap();
    let rolling = spec.update_strategy.unwrap().rolling_update.unwrap();
    match rolling.max_unavailable.unwrap() {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(share) => {
            let percent: u32 = share.strip_suffix('%').unwrap().parse().unwrap();
            assert!((1..=50).contains(&percent), "{share}");
        }
        other => panic!("maxUnavailable must be a percentage, not {other:?}"),
    }
    let pod = spec.template.spec.unwrap();
    // The node's resolver: cluster DNS needs the CNI the agent provides.
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    assert_eq!(
        pod.node_selector
            .unwrap()
            .get("kubernetes.io/os")
            .map(String::as_str),
        Some("linux")
    );
    let terms = pod
        .affinity
        .unwrap()
        .node_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .unwrap()
        .node_selector_terms;
    // Every term (they are ORed) must exclude virtual-kubelet.
    assert!(!terms.is_empty());
    for term in &terms {
        assert!(
            term.match_expressions
                .iter()
                .flatten()
                .any(|e| e.key == "type"
                    && e.operator == "NotIn"
                    && e.values.iter().flatten().any(|v| v == "virtual-kubelet")),
            "{term:?}"
        );
    }
    // The agent stops within 10 s of SIGTERM; the grace leaves it that and a margin.
    let grace = pod.termination_grace_period_seconds.unwrap();
    assert!(
        (11..=30).contains(&grace),
        "terminationGracePeriodSeconds {grace}"
    );
}

/// `deploy/kind/up.sh` end to end against fake docker, kind and kubectl (the real kubectl only
/// renders): it creates the kind network first, gives kind that network's IPv4 subnet as
/// podSubnet, builds and loads IMAGE, and applies manifests whose every image is IMAGE.
#[test]
fn kind_up_feeds_the_network_subnet_and_the_image() {
    let Some(real_kubectl) = ["/usr/bin/kubectl", "/usr/local/bin/kubectl"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("kubectl not installed: up.sh not run");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let bin = work.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let fakes = [
        (
            "docker",
            r#"echo "docker $*" >> "$WORK/calls"
case "$1 $2" in
"network inspect")
    [ -f "$WORK/network" ] || exit 1
    echo "172.18.0.0/16 fc00:f853:ccd:e793::/64 " ;;
"network create") touch "$WORK/network" ;;
esac"#,
        ),
        (
            "kind",
            r#"echo "kind $*" >> "$WORK/calls"
case "$1" in
create) while [ $# -gt 0 ]; do [ "$1" = --config ] && cp "$2" "$WORK/kind-config.yaml"; shift; done ;;
esac"#,
        ),
        (
            "kubectl",
            r#"case "$1" in
kustomize) exec "$REAL_KUBECTL" "$@" ;;
get) [ "$2" = nodes ] && printf 'vnet-cni-control-plane 172.18.0.2\nvnet-cni-worker 172.18.0.3\n' ;;
create) echo "apiVersion: v1" ;;
apply) n=$(ls "$WORK" | grep -c '^applied') ; cat > "$WORK/applied$n.yaml" ;;
esac
echo "kubectl $*" >> "$WORK/calls""#,
        ),
    ];
    for (name, body) in fakes {
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let image = "registry.example:5000/dev/vnet-cni:abc123";
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = deploy_dir().join("kind/up.sh");
    let output = run_with_timeout(
        "bash",
        &[script.to_str().unwrap()],
        "",
        &[
            ("PATH", path),
            ("WORK", work.path().display().to_string()),
            ("REAL_KUBECTL", real_kubectl.to_string()),
            ("IMAGE", image.to_string()),
            // The real build needs root, debootstrap and a Docker engine.
            ("SKIP_BUILD", "1".to_string()),
        ],
    );
    let calls = std::fs::read_to_string(work.path().join("calls")).unwrap_or_default();
    assert!(
        output.status.success(),
        "{}{}\ncalls:\n{calls}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let position = |needle: &str| {
        calls
            .find(needle)
            .unwrap_or_else(|| panic!("no `{needle}` in:\n{calls}"))
    };
    assert!(position("docker network create") < position("kind create cluster"));
    let up_sh = std::fs::read_to_string(&script).unwrap();
    assert!(up_sh.contains(r#"deploy/image/build.sh --tag "$IMAGE""#));
    position(&format!("kind load docker-image {image}"));
    let config = yaml_file(&work.path().join("kind-config.yaml"));
    assert_eq!(config["networking"]["podSubnet"], "172.18.0.0/16");
    // The topology ConfigMap, then the rendered install.
    let install = work.path().join("applied1.yaml");
    let text = std::fs::read_to_string(&install).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap())
        .filter(|doc| !doc.is_null())
        .collect();
    assert_eq!(images(&docs), BTreeSet::from([image.to_string()]));
    named(&docs, "Deployment", "vnet-mockcloud");
    named(&docs, "DaemonSet", "vnet-cni-agent");
}
