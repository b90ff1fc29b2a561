//! Who is calling: per-caller permission sets keyed by the bearer token the caller sends, with
//! Azure RBAC's action matching (case-insensitive, `*` wildcards, `NotActions` subtracted).
//! Without principals configured the mock authorizes everything (unit tests that do not care).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::MockError;
use crate::model::ArmError;
use crate::rules;

/// A role definition as `az role definition create` takes it; only the action lists matter here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoleDefinition {
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "Actions", default)]
    pub actions: Vec<String>,
    #[serde(rename = "NotActions", default)]
    pub not_actions: Vec<String>,
}

/// One caller: its static bearer token, a display name and object ID for messages, its role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Principal {
    pub token: String,
    pub name: String,
    #[serde(default = "default_object_id")]
    pub object_id: String,
    pub role: RoleDefinition,
}

fn default_object_id() -> String {
    "00000000-0000-0000-0000-000000000000".to_string()
}

impl Principal {
    /// Whether the role grants `action`.
    pub fn allows(&self, action: &str) -> bool {
        let matches = |patterns: &[String]| patterns.iter().any(|p| wildcard(p, action));
        matches(&self.role.actions) && !matches(&self.role.not_actions)
    }
}

/// The callers the mock knows, by token.
#[derive(Debug, Clone, Default)]
pub struct Principals {
    by_token: HashMap<String, Principal>,
}

impl Principals {
    pub fn new(list: Vec<Principal>) -> Result<Principals, MockError> {
        let mut by_token = HashMap::new();
        for p in list {
            if p.token.is_empty() {
                return Err(MockError::Principals(format!("{}: empty token", p.name)));
            }
            if let Some(old) = by_token.insert(p.token.clone(), p) {
                return Err(MockError::Principals(format!(
                    "{}: token used twice",
                    old.name
                )));
            }
        }
        Ok(Principals { by_token })
    }

    /// `[{"token","name","object_id"?,"role":{"Actions":[...],"NotActions":[...]}}]`.
    pub fn from_json(text: &str) -> Result<Principals, MockError> {
        let list: Vec<Principal> =
            serde_json::from_str(text).map_err(|e| MockError::Principals(e.to_string()))?;
        Principals::new(list)
    }

    pub fn get(&self, token: &str) -> Option<&Principal> {
        self.by_token.get(token)
    }
}

/// 403 `AuthorizationFailed` in ARM's words.
pub fn authorization_failed(who: Option<&Principal>, action: &str, scope: &str) -> ArmError {
    let (name, object_id) = who
        .map(|p| (p.name.as_str(), p.object_id.as_str()))
        .unwrap_or(("mock-client", "00000000-0000-0000-0000-000000000000"));
    ArmError::new(
        403,
        "AuthorizationFailed",
        format!(
            "The client '{name}' with object id '{object_id}' does not have authorization to perform action '{action}' over scope '{scope}' or the scope is invalid. If access was recently granted, please refresh your credentials."
        ),
    )
}

/// 403 `LinkedAuthorizationFailed` when the caller may perform `write_action` on `scope` but
/// lacks `join` on a resource the request references (`refs`, from [`rules`]); every missing
/// action is listed, as ARM does. A scale-set instance update checks its references the same way.
pub fn check_linked_access(
    caller: Option<&Principal>,
    write_action: &str,
    scope: &str,
    refs: Vec<rules::LinkedRef>,
) -> Result<(), ArmError> {
    let Some(caller) = caller else {
        return Ok(());
    };
    let missing: Vec<rules::LinkedRef> = refs
        .into_iter()
        .filter(|r| !caller.allows(r.action))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let actions: Vec<&str> = missing.iter().map(|r| r.action).collect();
    let scopes: Vec<&str> = missing.iter().map(|r| r.scope.as_str()).collect();
    Err(ArmError::new(
        403,
        "LinkedAuthorizationFailed",
        format!(
            "The client '{}' with object id '{}' has permission to perform action '{write_action}' on scope '{scope}'; however, it does not have permission to perform action(s) '{}' on the linked scope(s) '{}' (respectively) or the linked scope(s) are invalid.",
            caller.name,
            caller.object_id,
            actions.join(","),
            scopes.join(","),
        ),
    ))
}

/// RBAC action matching: case-insensitive, `*` matches any run of characters.
fn wildcard(pattern: &str, text: &str) -> bool {
    let p = pattern.to_ascii_lowercase();
    let t = text.to_ascii_lowercase();
    let parts: Vec<&str> = p.split('*').collect();
    if parts.len() == 1 {
        return p == t;
    }
    let mut rest = t.as_str();
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(after) = rest.strip_prefix(part) else {
                return false;
            };
            rest = after;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(at) = rest.find(part) else {
                return false;
            };
            rest = &rest[at + part.len()..];
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_match_like_rbac() {
        let p = Principal {
            token: "t".into(),
            name: "n".into(),
            object_id: default_object_id(),
            role: RoleDefinition {
                name: String::new(),
                actions: vec![
                    "Microsoft.Network/networkInterfaces/*".into(),
                    "microsoft.compute/virtualmachines/read".into(),
                ],
                not_actions: vec!["Microsoft.Network/networkInterfaces/delete".into()],
            },
        };
        assert!(p.allows("Microsoft.Network/networkInterfaces/write"));
        assert!(p.allows("Microsoft.Compute/virtualMachines/read"));
        assert!(!p.allows("Microsoft.Network/networkInterfaces/delete"));
        assert!(!p.allows("Microsoft.Network/virtualNetworks/subnets/join/action"));
        assert!(wildcard("*", "x"));
        assert!(wildcard("a*/join/action", "a/b/join/action"));
    }
}
