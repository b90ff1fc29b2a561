//! CI checks of deploy/terraform: the files parse and are tidy (and `terraform fmt -check` where
//! terraform is installed), the agent's roles come from deploy/azure/vnet-cni-role.json with the
//! scopes Azure allows, and that file covers every action the cloud code can ask for.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::manifests::*;

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

fn repo_dir() -> PathBuf {
    deploy_dir().join("..")
}

/// deploy/azure/vnet-cni-role.json: the agent's custom role, the one list Terraform reads.
fn role_file() -> Option<Value> {
    let path = deploy_dir().join("azure/vnet-cni-role.json");
    let text = std::fs::read_to_string(&path).ok()?;
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// Subscription-level actions: polling Network's and Compute's long-running operations.
const OPERATIONS_ACTIONS: [&str; 2] = [
    "Microsoft.Network/locations/operations/read",
    "Microsoft.Compute/locations/operations/read",
];

/// Every string literal that is an Azure action in the non-test code of the ARM client
/// (cloud/src) and of the mock (cloud/mockcloud/src: its permission model maps each route to the
/// action it checks, and each reference on a NIC to its join action): what the code can ask for.
/// Test modules (from `#[cfg(test)]` on) are left out: they name actions a role must not have.
fn actions_in_cloud_code() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for dir in ["cloud/src", "cloud/mockcloud/src"] {
        for file in files_under(&repo_dir().join(dir), &[".rs"]) {
            let text = std::fs::read_to_string(&file).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for literal in code.split('"').skip(1).step_by(2) {
                let is_action = literal.starts_with("Microsoft.")
                    && !literal.contains(' ')
                    && !literal.contains('*')
                    && !literal.contains('{')
                    && literal.matches('/').count() >= 2
                    && ["/read", "/write", "/delete", "/action"]
                        .iter()
                        .any(|end| literal.ends_with(end));
                if is_action {
                    found.insert(literal.to_string());
                }
            }
        }
    }
    found
}

/// The Terraform takes the agent's actions from deploy/azure/vnet-cni-role.json (hard-codes none
/// — the subscription-level polling actions get their own role, picked by their name), makes the custom role
/// assignable at resource groups only, gives polling its own subscription role, and the file
/// holds every action the cloud code can ask for and everything docs/cloud.md lists.
#[test]
fn terraform_grants_the_agent_the_role_file_and_the_role_file_covers_the_code() {
    let main_tf = std::fs::read_to_string(deploy_dir().join("terraform/main.tf")).unwrap();
    assert!(
        main_tf.contains("file(\"${path.module}/../azure/vnet-cni-role.json\")"),
        "main.tf must read the role from deploy/azure/vnet-cni-role.json"
    );
    assert_eq!(
        azure_actions_in(&main_tf),
        BTreeSet::new(),
        "main.tf hard-codes actions: take them from the role file"
    );
    let body = hcl::parse(&main_tf).unwrap();
    let block = |kind: &str, name: &str| -> &hcl::Block {
        body.blocks()
            .find(|b| {
                b.identifier() == "resource"
                    && b.labels().len() == 2
                    && b.labels()[0].as_str() == kind
                    && b.labels()[1].as_str() == name
            })
            .unwrap_or_else(|| panic!("no resource {kind}.{name} in main.tf"))
    };
    let attribute = |block: &hcl::Block, key: &str| -> String {
        block
            .body()
            .attributes()
            .find(|a| a.key() == key)
            .map(|a| a.expr().to_string())
            .unwrap_or_else(|| panic!("{:?} has no {key}", block.labels()))
    };
    let agent = block("azurerm_role_definition", "agent");
    assert_eq!(
        attribute(agent, "assignable_scopes"),
        "local.agent_assignable_scopes"
    );
    let operations = block("azurerm_role_definition", "agent_operations");
    assert!(attribute(operations, "assignable_scopes").contains("azurerm_subscription.current.id"));
    assert!(
        attribute(
            block("azurerm_role_assignment", "agent_operations"),
            "scope"
        )
        .contains("azurerm_subscription.current.id")
    );
    let locals: String = body
        .blocks()
        .filter(|b| b.identifier() == "locals")
        .flat_map(|b| b.body().attributes())
        .filter(|a| a.key() == "agent_assignable_scopes" || a.key() == "agent_assignment_scopes")
        .map(|a| a.expr().to_string())
        .collect();
    assert!(
        locals.contains("node_resource_group_id") && !locals.contains("subscription"),
        "the agent role is assignable and assigned at the node and VNet groups only: {locals}"
    );
    // The registry's pull is granted to the identity the nodes pull with.
    let pull = block("azurerm_role_assignment", "kubelet_pulls_image");
    assert_eq!(attribute(pull, "role_definition_name"), "\"AcrPull\"");

    let role = role_file().expect("deploy/azure/vnet-cni-role.json, the agents' custom role");
    let actions: BTreeSet<String> = role["Actions"]
        .as_array()
        .expect("Actions")
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    for action in OPERATIONS_ACTIONS {
        assert!(actions.contains(action), "the role lacks {action}");
    }
    let missing: Vec<_> = actions_in_cloud_code()
        .difference(&actions)
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "the cloud code can ask for actions the role lacks: {missing:?}"
    );
    let cloud_md = std::fs::read_to_string(repo_dir().join("docs/cloud.md")).unwrap();
    // The rows of its permission table: "| `Microsoft.X/y` | why | scope |".
    let documented: BTreeSet<String> = cloud_md
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`'))
        .map(|(action, _)| action.to_string())
        .filter(|action| action.starts_with("Microsoft."))
        .collect();
    let undocumented: Vec<_> = documented.difference(&actions).collect();
    assert!(
        undocumented.is_empty(),
        "docs/cloud.md lists actions deploy/azure/vnet-cni-role.json does not grant: {undocumented:?}"
    );
    // And every granted action has its row, saying why it is needed.
    let missing_rows: Vec<_> = actions.difference(&documented).collect();
    assert!(
        missing_rows.is_empty(),
        "docs/cloud.md's permission table lacks rows for: {missing_rows:?}"
    );
}

#[test]
fn terraform_takes_the_subscription_and_suggests_no_pod_subnet() {
    let variables = std::fs::read_to_string(deploy_dir().join("terraform/variables.tf")).unwrap();
    let versions = std::fs::read_to_string(deploy_dir().join("terraform/versions.tf")).unwrap();
    assert!(variables.contains("variable \"subscription_id\""));
    assert!(versions.contains("subscription_id = var.subscription_id"));
    for file in terraform_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for forbidden in ["pod_subnet", "azurerm_subnet\" \"pods\""] {
            assert!(!text.contains(forbidden), "{}: {forbidden}", file.display());
        }
    }
}

#[test]
fn the_action_scan_finds_actions_and_nothing_else() {
    let found = actions_in_cloud_code();
    for expected in [
        "Microsoft.Network/networkInterfaces/write",
        "Microsoft.Network/virtualNetworks/subnets/join/action",
        "Microsoft.Network/locations/operations/read",
    ] {
        assert!(
            found.contains(expected),
            "{expected} not found in {found:?}"
        );
    }
    assert!(
        found
            .iter()
            .all(|a| a.starts_with("Microsoft.") && !a.contains(' '))
    );
}

/// Every `<prefix><identifier>` in `text` (identifier: lowercase, digits, `_`), e.g. `var.name`.
fn references(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

/// What `terraform validate` would catch first, without the provider: every variable, local,
/// resource and data source the files refer to is declared (a typo in a name fails here).
#[test]
fn terraform_references_only_what_is_declared() {
    let mut text = String::new();
    let mut variables = BTreeSet::new();
    let mut locals = BTreeSet::new();
    let mut resources = BTreeSet::new();
    let mut data = BTreeSet::new();
    for file in terraform_files() {
        let source = std::fs::read_to_string(&file).unwrap();
        let body = hcl::parse(&source).unwrap();
        for block in body.blocks() {
            let labels: Vec<&str> = block.labels().iter().map(|l| l.as_str()).collect();
            match (block.identifier(), labels.as_slice()) {
                ("variable", [name]) => {
                    variables.insert(name.to_string());
                }
                ("locals", []) => {
                    locals.extend(block.body().attributes().map(|a| a.key().to_string()));
                }
                ("resource", [kind, name]) => {
                    resources.insert(format!("{kind}.{name}"));
                }
                ("data", [kind, name]) => {
                    data.insert(format!("{kind}.{name}"));
                }
                _ => {}
            }
        }
        text.push_str(&source);
        text.push('\n');
    }
    for name in references(&text, "var.") {
        assert!(variables.contains(&name), "var.{name} is not declared");
    }
    for name in references(&text, "local.") {
        assert!(locals.contains(&name), "local.{name} is not defined");
    }
    for name in references(&text, "data.") {
        // data.<type>.<name>: the scan stops at the first dot, so match by type prefix.
        assert!(
            data.iter().any(|d| d.starts_with(&format!("{name}."))),
            "data.{name} is not declared"
        );
    }
    for kind in references(&text, "azurerm_") {
        let kind = format!("azurerm_{kind}");
        // `azurerm_X.Y` references; a bare type after `resource "` is a declaration.
        let mut rest = text.as_str();
        while let Some(at) = rest.find(&format!("{kind}.")) {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + kind.len() + 1..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '"')
            {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let reference = format!("{kind}.{name}");
            assert!(
                resources.contains(&reference) || data.contains(&reference),
                "{reference} is not declared"
            );
        }
    }
    assert!(variables.contains("subscription_id") && locals.contains("image"));
}
