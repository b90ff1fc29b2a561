//! Azure's rules for the ipConfigurations of one NIC, as pure functions over request JSON, so the
//! NIC PUT and a scale-set instance update (same property names) enforce them the same way:
//! one subnet per NIC, one set of application security groups per NIC, and the linked resources
//! a write references (each needs the caller's `join` permission). Error codes and messages live
//! here and only here; docs/cloud.md says which are quoted from Azure and which are unverified.

use serde_json::Value;

use crate::model::ArmError;

/// Code of the one-subnet rule. Unverified: public reports quote only the message.
pub const DIFFERENT_SUBNETS_CODE: &str = "IpConfigurationsOnNicCannotBelongToDifferentSubnets";
/// Azure's message, quoted in Azure/azure-sdk-for-java#1865.
pub const DIFFERENT_SUBNETS_MESSAGE: &str =
    "IPConfigurations on a Nic cannot belong to different subnets.";
/// Azure's code for the ASG rule, quoted in Azure/azure-cli#21551.
pub const ASG_MISMATCH_CODE: &str =
    "AllIpConfigurationsOnANicMustBelongToTheSameApplicationSecurityGroups";

/// RBAC actions of the linked access checks (Microsoft's resource provider operations list).
pub const JOIN_SUBNET: &str = "Microsoft.Network/virtualNetworks/subnets/join/action";
pub const JOIN_NSG: &str = "Microsoft.Network/networkSecurityGroups/join/action";
pub const JOIN_ASG: &str = "Microsoft.Network/applicationSecurityGroups/joinIpConfiguration/action";
pub const JOIN_LB_POOL: &str = "Microsoft.Network/loadBalancers/backendAddressPools/join/action";
pub const JOIN_LB_NAT_RULE: &str = "Microsoft.Network/loadBalancers/inboundNatRules/join/action";
/// NAT pools are referenced by scale-set ipConfigurations only (Microsoft: "NICs that are
/// associated with individual virtual machines cannot reference an inbound NAT pool").
pub const JOIN_LB_NAT_POOL: &str = "Microsoft.Network/loadBalancers/inboundNatPools/join/action";
pub const JOIN_PUBLIC_IP: &str = "Microsoft.Network/publicIPAddresses/join/action";
pub const JOIN_APPGW_POOL: &str =
    "Microsoft.Network/applicationGateways/backendAddressPools/join/action";

/// One ipConfiguration as the rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigRefs {
    /// Resource ID of the ipConfiguration (for messages).
    pub id: String,
    /// Subnet resource ID.
    pub subnet: String,
    /// Application security group IDs, lowercased and sorted.
    pub asgs: Vec<String>,
}

/// The ASG IDs an ipConfiguration (`{"properties": {"applicationSecurityGroups": [{"id"}]}}`)
/// names, lowercased and sorted (ARM compares resource IDs case-insensitively).
pub fn asg_ids(config: &Value) -> Vec<String> {
    let mut ids: Vec<String> = ids_of(&config["properties"]["applicationSecurityGroups"])
        .map(|id| id.to_ascii_lowercase())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// "IPConfigurations on a Nic cannot belong to different subnets."
pub fn check_one_subnet(configs: &[ConfigRefs]) -> Result<(), ArmError> {
    let Some(first) = configs.first() else {
        return Ok(());
    };
    if configs
        .iter()
        .any(|c| !c.subnet.eq_ignore_ascii_case(&first.subnet))
    {
        return Err(ArmError::bad_request(
            DIFFERENT_SUBNETS_CODE,
            DIFFERENT_SUBNETS_MESSAGE,
        ));
    }
    Ok(())
}

/// All ipConfigurations of a NIC reference the same set of application security groups.
pub fn check_same_asgs(configs: &[ConfigRefs]) -> Result<(), ArmError> {
    let Some(first) = configs.first() else {
        return Ok(());
    };
    if let Some(other) = configs.iter().find(|c| c.asgs != first.asgs) {
        return Err(ArmError::bad_request(
            ASG_MISMATCH_CODE,
            format!(
                "All IPConfigurations on a Network Interface should reference the same set of Application Security Groups. IPConfiguration {} references ASG(s) {}, wheras IPConfiguration {} references ASG(s) {}.",
                first.id,
                first.asgs.join(","),
                other.id,
                other.asgs.join(",")
            ),
        ));
    }
    Ok(())
}

/// One linked access check: the caller needs `action` on `scope`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedRef {
    pub action: &'static str,
    pub scope: String,
}

/// Every linked resource a NIC document references: its NSG and, per ipConfiguration, the
/// subnet, ASGs, load balancer pools and NAT rules, application gateway pools and public IP.
/// ARM checks all of them on every write, not only the ones that changed.
pub fn nic_linked_references(nic: &Value) -> Vec<LinkedRef> {
    let mut refs = Vec::new();
    if let Some(nsg) = nic["properties"]["networkSecurityGroup"]["id"].as_str() {
        push(&mut refs, JOIN_NSG, nsg);
    }
    if let Some(configs) = nic["properties"]["ipConfigurations"].as_array() {
        for config in configs {
            ip_config_linked_references(config, &mut refs);
        }
    }
    refs
}

/// The linked resources of one ipConfiguration (NIC or scale-set shape).
pub fn ip_config_linked_references(config: &Value, refs: &mut Vec<LinkedRef>) {
    let p = &config["properties"];
    if let Some(subnet) = p["subnet"]["id"].as_str() {
        push(refs, JOIN_SUBNET, subnet);
    }
    for id in ids_of(&p["applicationSecurityGroups"]) {
        push(refs, JOIN_ASG, id);
    }
    for id in ids_of(&p["loadBalancerBackendAddressPools"]) {
        push(refs, JOIN_LB_POOL, id);
    }
    for id in ids_of(&p["loadBalancerInboundNatRules"]) {
        push(refs, JOIN_LB_NAT_RULE, id);
    }
    for id in ids_of(&p["loadBalancerInboundNatPools"]) {
        push(refs, JOIN_LB_NAT_POOL, id);
    }
    for id in ids_of(&p["applicationGatewayBackendAddressPools"]) {
        push(refs, JOIN_APPGW_POOL, id);
    }
    if let Some(pip) = p["publicIPAddress"]["id"].as_str() {
        push(refs, JOIN_PUBLIC_IP, pip);
    }
}

fn push(refs: &mut Vec<LinkedRef>, action: &'static str, scope: &str) {
    let known = refs
        .iter()
        .any(|r| r.action == action && r.scope.eq_ignore_ascii_case(scope));
    if !known {
        refs.push(LinkedRef {
            action,
            scope: scope.to_string(),
        });
    }
}

fn ids_of(list: &Value) -> impl Iterator<Item = &str> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item["id"].as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refs(id: &str, subnet: &str, asgs: &[&str]) -> ConfigRefs {
        ConfigRefs {
            id: id.into(),
            subnet: subnet.into(),
            asgs: asgs.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn one_subnet_and_one_asg_set_per_nic() {
        assert!(check_one_subnet(&[refs("a", "/S/x", &[]), refs("b", "/s/X", &[])]).is_ok());
        let err = check_one_subnet(&[refs("a", "/s/x", &[]), refs("b", "/s/y", &[])]).unwrap_err();
        assert_eq!(err.message, DIFFERENT_SUBNETS_MESSAGE);
        assert!(check_same_asgs(&[refs("a", "s", &["g"]), refs("b", "s", &["g"])]).is_ok());
        let err = check_same_asgs(&[refs("a", "s", &["g"]), refs("b", "s", &[])]).unwrap_err();
        assert_eq!(err.code, ASG_MISMATCH_CODE);
    }

    #[test]
    fn every_reference_is_a_linked_check() {
        let nic = json!({"properties": {
        "networkSecurityGroup": {"id": "/nsg"},
        "ipConfigurations": [
            {"properties": {"subnet": {"id": "/sn"}, "applicationSecurityGroups": [{"id": "/asg"}],
             "loadBalancerBackendAddressPools": [{"id": "/pool"}], "publicIPAddress": {"id": "/pip"},
             "loadBalancerInboundNatPools": [{"id": "/natpool"}]}},
            {"properties": {"subnet": {"id": "/SN"}, "applicationSecurityGroups": [{"id": "/asg"}]}},
        ]}});
        let actions: Vec<&str> = nic_linked_references(&nic)
            .iter()
            .map(|r| r.action)
            .collect();
        assert_eq!(
            actions,
            vec![
                JOIN_NSG,
                JOIN_SUBNET,
                JOIN_ASG,
                JOIN_LB_POOL,
                JOIN_LB_NAT_POOL,
                JOIN_PUBLIC_IP
            ]
        );
    }
}
