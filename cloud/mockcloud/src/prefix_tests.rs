//! The mock's prefix (`privateIPAddressPrefixLength`) rules, at the model.

use std::net::Ipv4Addr;
use std::time::Instant;

use serde_json::{Value, json};

use crate::model::{
    ArmError, Cloud, MAX_IP_CONFIGS_PER_NIC, NIC_LIMIT_CODE, OperationStatus, PREFIX_LENGTH_CODE,
    PREFIX_ON_PRIMARY_CODE, PREFIX_WITH_PUBLIC_IP_CODE, RouteChange, Timing,
};
use crate::topology::Topology;

const NIC: &str = "node-1-nic";

fn cloud(prefix: &str, vms: usize) -> Cloud {
    Cloud::new(Topology::single_subnet(prefix.parse().unwrap(), vms), None).unwrap()
}

/// The NIC with new ipConfigurations `names` asking for a prefix of `len`.
fn body_with_blocks(cloud: &Cloud, names: &[&str], len: u64) -> Value {
    let mut body = cloud.nic_json(NIC).unwrap();
    let subnet_id = cloud.topology.subnet_id("nodes");
    let configs = body["properties"]["ipConfigurations"]
        .as_array_mut()
        .unwrap();
    for name in names {
        configs.push(json!({"name": name, "properties": {
            "privateIPAllocationMethod": "Dynamic",
            "privateIPAddressPrefixLength": len,
            "subnet": {"id": subnet_id}}}));
    }
    body
}

fn add_blocks(
    cloud: &mut Cloud,
    names: &[&str],
    len: u64,
) -> Result<(OperationStatus, Vec<RouteChange>), ArmError> {
    let body = body_with_blocks(cloud, names, len);
    put(cloud, &body)
}

fn put(cloud: &mut Cloud, body: &Value) -> Result<(OperationStatus, Vec<RouteChange>), ArmError> {
    let op = cloud.put_nic(NIC, None, body, None, Timing::new(0, 1), Instant::now())?;
    cloud.poll_operation(&op)
}

fn config<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["properties"]["ipConfigurations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
}

#[test]
fn a_prefix_gets_an_aligned_block_of_assignable_addresses_shown_as_cidr() {
    // VMs hold .4 and .5: the first /28 (.0-.15) holds reserved and used addresses.
    let mut c = cloud("10.0.0.0/24", 2);
    let (status, routes) = add_blocks(&mut c, &["a", "b"], 28).unwrap();
    assert_eq!(status, OperationStatus::Succeeded);
    let doc = c.nic_json(NIC).unwrap();
    assert_eq!(
        config(&doc, "a")["properties"]["privateIPAddress"],
        "10.0.0.16/28"
    );
    assert_eq!(
        config(&doc, "a")["properties"]["privateIPAddressPrefixLength"],
        28
    );
    assert_eq!(
        config(&doc, "b")["properties"]["privateIPAddress"],
        "10.0.0.32/28"
    );
    let via: Ipv4Addr = "10.0.0.4".parse().unwrap();
    assert!(routes.contains(&RouteChange::Replace {
        ip: "10.0.0.16".parse().unwrap(),
        len: 28,
        via
    }));
    // Every address of a block is taken: a single address comes from outside both blocks.
    let mut body = c.nic_json(NIC).unwrap();
    let subnet_id = c.topology.subnet_id("nodes");
    body["properties"]["ipConfigurations"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "single", "properties": {"subnet": {"id": subnet_id}}}));
    put(&mut c, &body).unwrap();
    let doc = c.nic_json(NIC).unwrap();
    assert_eq!(
        config(&doc, "single")["properties"]["privateIPAddress"],
        "10.0.0.6"
    );
}

#[test]
fn no_free_aligned_block_is_subnet_is_full() {
    // A /27 has two /28s: .0-.15 holds the reserved .0-.3 (and the VM), .16-.31 the broadcast.
    let mut c = cloud("10.0.0.0/27", 1);
    let err = add_blocks(&mut c, &["a"], 28).unwrap_err();
    assert_eq!((err.status, err.code.as_str()), (400, "SubnetIsFull"));
    // A /26 has two usable /28s; a third does not fit, and the PUT changes nothing.
    let mut c = cloud("10.0.0.0/26", 1);
    let err = add_blocks(&mut c, &["a", "b", "c"], 28).unwrap_err();
    assert_eq!(err.code, "SubnetIsFull");
    assert_eq!(c.state_view().addresses.len(), 1);
    add_blocks(&mut c, &["a", "b"], 28).unwrap();
    assert_eq!(c.state_view().addresses.len(), 3);
}

#[test]
fn only_28_and_never_the_primary() {
    let mut c = cloud("10.0.0.0/24", 1);
    let err = add_blocks(&mut c, &["a"], 29).unwrap_err();
    assert_eq!((err.status, err.code.as_str()), (400, PREFIX_LENGTH_CODE));
    let mut body = c.nic_json(NIC).unwrap();
    body["properties"]["ipConfigurations"][0]["properties"]["privateIPAddressPrefixLength"] =
        json!(28);
    let err = put(&mut c, &body).unwrap_err();
    assert_eq!(err.code, PREFIX_ON_PRIMARY_CODE);
}

#[test]
fn a_block_cannot_carry_a_public_ip() {
    let mut c = cloud("10.0.0.0/24", 1);
    let mut body = body_with_blocks(&c, &["a"], 28);
    let pip = c
        .topology
        .resource_id("Microsoft.Network/publicIPAddresses", "pip-a");
    let configs = body["properties"]["ipConfigurations"]
        .as_array_mut()
        .unwrap();
    configs.last_mut().unwrap()["properties"]["publicIPAddress"] = json!({"id": pip});
    let err = put(&mut c, &body).unwrap_err();
    assert_eq!(
        (err.status, err.code.as_str()),
        (400, PREFIX_WITH_PUBLIC_IP_CODE)
    );
    assert_eq!(c.state_view().addresses.len(), 1, "nothing was written");
}

#[test]
fn a_block_counts_as_one_ip_configuration_toward_the_nic_limit() {
    let mut c = cloud("10.0.0.0/12", 1);
    let names: Vec<String> = (0..MAX_IP_CONFIGS_PER_NIC)
        .map(|i| format!("b{i}"))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let err = add_blocks(&mut c, &names, 28).unwrap_err();
    assert_eq!(
        err.code, NIC_LIMIT_CODE,
        "the primary plus 256 blocks is 257"
    );
    add_blocks(&mut c, &names[1..], 28).unwrap();
    let view = c.state_view();
    assert_eq!(view.nics[0].ip_configurations, MAX_IP_CONFIGS_PER_NIC);
    assert_eq!(
        view.addresses
            .iter()
            .filter(|a| a.prefix_len == Some(28))
            .count(),
        255
    );
}

#[test]
fn a_released_block_is_free_again_once_the_operation_ends() {
    let mut c = cloud("10.0.0.0/26", 1); // room for two /28s: .16 and .32
    add_blocks(&mut c, &["a", "b"], 28).unwrap();
    let mut body = c.nic_json(NIC).unwrap();
    body["properties"]["ipConfigurations"]
        .as_array_mut()
        .unwrap()
        .retain(|e| e["name"] != "a");
    let (_, routes) = put(&mut c, &body).unwrap();
    assert_eq!(
        routes,
        vec![RouteChange::Delete {
            ip: "10.0.0.16".parse().unwrap(),
            len: 28
        }]
    );
    add_blocks(&mut c, &["c"], 28).unwrap();
    let doc = c.nic_json(NIC).unwrap();
    assert_eq!(
        config(&doc, "c")["properties"]["privateIPAddress"],
        "10.0.0.16/28"
    );
}
