//! The NIC document as JSON: what a PUT body asks for (ipConfigurations, the caller-owned
//! fields the mock keeps verbatim) and the document a topology VM starts with.

use std::net::Ipv4Addr;

use serde_json::{Map, Value, json};

use crate::model::ArmError;
use crate::topology::{NicSpec, Topology};

/// NIC `properties` the service computes: ignored in a PUT, always shown as the mock knows them.
pub(crate) const NIC_COMPUTED: [&str; 6] = [
    "provisioningState",
    "resourceGuid",
    "macAddress",
    "primary",
    "virtualMachine",
    "ipConfigurations",
];
/// ipConfiguration `properties` the mock models itself; everything else is kept as written.
pub(crate) const IP_CONFIG_MODELLED: [&str; 7] = [
    "provisioningState",
    "privateIPAddress",
    "privateIPAddressPrefixLength",
    "privateIPAllocationMethod",
    "privateIPAddressVersion",
    "subnet",
    "primary",
];

/// One ipConfiguration as a PUT body asks for it.
#[derive(Debug)]
pub(crate) struct RequestedConfig {
    pub name: String,
    pub ip: Option<Ipv4Addr>,
    pub static_allocation: Option<bool>,
    pub subnet_id: Option<String>,
    pub primary: bool,
    /// `privateIPAddressPrefixLength`: a block instead of one address.
    pub prefix_len: Option<u8>,
    /// `properties` the mock does not model, kept as written.
    pub extra: Map<String, Value>,
}

pub(crate) fn parse_ip_configurations(body: &Value) -> Result<Vec<RequestedConfig>, ArmError> {
    let invalid = |m: String| ArmError::bad_request("InvalidRequestFormat", m);
    let configs = body
        .get("properties")
        .and_then(|p| p.get("ipConfigurations"))
        .and_then(Value::as_array)
        .ok_or_else(|| {
            invalid(
                "Cannot parse the request: properties.ipConfigurations must be an array.".into(),
            )
        })?;
    configs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let name = c
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| invalid(format!("ipConfigurations[{i}].name is required.")))?;
            if name.len() > 80
                || !name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            {
                return Err(ArmError::bad_request(
                    "InvalidResourceName",
                    format!("Resource name {name} is invalid."),
                ));
            }
            let props = c.get("properties").cloned().unwrap_or(Value::Null);
            // A block is shown (and may be sent back) as `address/length`.
            let ip = match props.get("privateIPAddress").and_then(Value::as_str) {
                None | Some("") => None,
                Some(text) => {
                    let address = text.split_once('/').map_or(text, |(a, _)| a);
                    Some(address.parse().map_err(|_| {
                        ArmError::bad_request(
                            "InvalidPrivateIPAddress",
                            format!("{text} is not a valid IPv4 address."),
                        )
                    })?)
                }
            };
            let prefix_len = match props.get("privateIPAddressPrefixLength") {
                None | Some(Value::Null) => None,
                Some(value) => Some(
                    value
                        .as_u64()
                        .filter(|len| (1..=32).contains(len))
                        .map(|len| len as u8)
                        .ok_or_else(|| {
                            ArmError::bad_request(
                                crate::model::PREFIX_LENGTH_CODE,
                                format!(
                                    "ipConfigurations[{i}].privateIPAddressPrefixLength {value} is not a valid IPv4 prefix length."
                                ),
                            )
                        })?,
                ),
            };
            let static_allocation = match props
                .get("privateIPAllocationMethod")
                .and_then(Value::as_str)
            {
                None => None,
                Some(m) if m.eq_ignore_ascii_case("dynamic") => Some(false),
                Some(m) if m.eq_ignore_ascii_case("static") => Some(true),
                Some(m) => {
                    return Err(invalid(format!("Unknown privateIPAllocationMethod {m}.")));
                }
            };
            Ok(RequestedConfig {
                name: name.to_string(),
                ip,
                static_allocation,
                subnet_id: props
                    .get("subnet")
                    .and_then(|s| s.get("id"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                primary: props
                    .get("primary")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                prefix_len,
                extra: props
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .filter(|(k, _)| !IP_CONFIG_MODELLED.contains(&k.as_str()))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// The caller-owned part of a NIC PUT body: `tags` and the non-computed `properties`. A PUT
/// replaces the document, so a field the caller leaves out is gone afterwards (as on Azure).
pub(crate) fn caller_document(body: &Value) -> Map<String, Value> {
    let mut doc = Map::new();
    if let Some(tags) = body.get("tags") {
        doc.insert("tags".into(), tags.clone());
    }
    let properties: Map<String, Value> = body["properties"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| !NIC_COMPUTED.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    doc.insert("properties".into(), Value::Object(properties));
    doc
}

/// The NIC document a topology VM starts with, and its primary ipConfiguration's extra fields.
pub(crate) fn initial_document(
    topo: &Topology,
    spec: &NicSpec,
) -> (Map<String, Value>, Map<String, Value>) {
    let mut properties = spec.properties.clone();
    properties
        .entry("enableIPForwarding")
        .or_insert(json!(spec.ip_forwarding));
    properties
        .entry("enableAcceleratedNetworking")
        .or_insert(json!(spec.accelerated_networking));
    properties.entry("dnsSettings").or_insert(json!({
        "dnsServers": spec.dns_servers,
        "appliedDnsServers": spec.dns_servers,
    }));
    properties.entry("nicType").or_insert(json!("Standard"));
    if let Some(nsg) = &spec.network_security_group {
        properties.insert(
            "networkSecurityGroup".into(),
            json!({"id": topo.resource_id("Microsoft.Network/networkSecurityGroups", nsg)}),
        );
    }
    let mut doc = Map::new();
    if !spec.tags.is_empty() {
        doc.insert("tags".into(), Value::Object(spec.tags.clone()));
    }
    doc.insert("properties".into(), Value::Object(properties));

    let mut primary = spec.primary_ip_configuration_properties.clone();
    if !spec.application_security_groups.is_empty() {
        let asgs: Vec<Value> = spec
            .application_security_groups
            .iter()
            .map(|a| json!({"id": topo.resource_id("Microsoft.Network/applicationSecurityGroups", a)}))
            .collect();
        primary.insert("applicationSecurityGroups".into(), json!(asgs));
    }
    if !spec.load_balancer_backend_address_pools.is_empty() {
        let pools: Vec<Value> = spec
            .load_balancer_backend_address_pools
            .iter()
            .map(|p| {
                let id = match p.split_once('/') {
                    Some((lb, pool)) if !p.starts_with('/') => topo.resource_id(
                        "Microsoft.Network/loadBalancers",
                        &format!("{lb}/backendAddressPools/{pool}"),
                    ),
                    _ => p.clone(),
                };
                json!({"id": id})
            })
            .collect();
        primary.insert("loadBalancerBackendAddressPools".into(), json!(pools));
    }
    if let Some(pip) = &spec.public_ip_address {
        primary.insert(
            "publicIPAddress".into(),
            json!({"id": topo.resource_id("Microsoft.Network/publicIPAddresses", pip)}),
        );
    }
    (doc, primary)
}
