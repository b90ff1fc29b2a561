//! Prefix mode through the real Azure client against vnet-mockcloud over HTTP: blocks assigned,
//! listed, released whole, refused where Azure refuses them.

mod common;

use std::net::Ipv4Addr;

use common::{Lab, mixed_topology};
use serde_json::json;
use vnet_cloud::{AZURE_PREFIX_LENGTH, CloudError, CloudProvider, IP_CONFIG_PREFIX};

fn ip(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
}

#[tokio::test]
async fn blocks_are_assigned_listed_and_released_whole() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    let (provider, _) = lab.provider("node-1");
    let nic = lab.nic_id("node-1");
    let subnet = lab.subnet_id();
    let blocks = provider
        .assign_blocks(&nic, &subnet, 2, AZURE_PREFIX_LENGTH)
        .await
        .unwrap();
    let mut bases: Vec<Ipv4Addr> = blocks.iter().map(|b| b.ip).collect();
    bases.sort();
    // The first /28 holds the reserved addresses and the VM: the blocks are the next two.
    assert_eq!(bases, vec![ip("10.240.0.16"), ip("10.240.0.32")]);
    assert!(blocks.iter().all(|b| b.prefix_len == 28
        && b.is_block()
        && b.name.starts_with(IP_CONFIG_PREFIX)
        && b.subnet_id == subnet));
    assert_eq!(blocks[0].addresses().count(), 16);

    // The cloud holds them as blocks; a listing reads them back as blocks (from address/28).
    let state = lab.state().await;
    let held: Vec<(Ipv4Addr, Option<u8>)> = state
        .addresses
        .iter()
        .filter(|a| !a.primary)
        .map(|a| (a.ip, a.prefix_len))
        .collect();
    assert_eq!(
        held,
        vec![(ip("10.240.0.16"), Some(28)), (ip("10.240.0.32"), Some(28))]
    );
    let mut listed = provider.list_secondary_ips(&nic).await.unwrap();
    listed.sort_by_key(|s| s.ip);
    let mut expected = blocks.clone();
    expected.sort_by_key(|s| s.ip);
    assert_eq!(listed, expected);

    // Plain addresses beside blocks come from outside them.
    let single = provider.assign_ips(&nic, &subnet, 1).await.unwrap();
    assert_eq!(single[0].ip, ip("10.240.0.5"));
    assert!(!single[0].is_block());

    // Part of a block (here its first address) does not take the block: pods may use the rest.
    provider
        .release_ips(&nic, &[ip("10.240.0.16")])
        .await
        .unwrap();
    let still = provider.list_secondary_ips(&nic).await.unwrap();
    assert!(
        still
            .iter()
            .any(|s| s.ip == ip("10.240.0.16") && s.is_block())
    );
    // Releasing all its addresses removes the whole block and nothing else.
    let whole: Vec<Ipv4Addr> = (16..32).map(|i| Ipv4Addr::new(10, 240, 0, i)).collect();
    provider.release_ips(&nic, &whole).await.unwrap();
    let mut listed = provider.list_secondary_ips(&nic).await.unwrap();
    listed.sort_by_key(|s| s.ip);
    let left: Vec<(Ipv4Addr, u8)> = listed.iter().map(|s| (s.ip, s.prefix_len)).collect();
    assert_eq!(left, vec![(ip("10.240.0.5"), 32), (ip("10.240.0.32"), 28)]);
    // The freed block is Azure's again: the next block request gets it.
    let again = provider
        .assign_blocks(&nic, &subnet, 1, AZURE_PREFIX_LENGTH)
        .await
        .unwrap();
    assert_eq!(again[0].ip, ip("10.240.0.16"));
}

#[tokio::test]
async fn a_subnet_without_a_free_aligned_block_is_subnet_full() {
    // 10.240.0.0/26: usable blocks .16 and .32 (.0/28 has the reserved addresses, .48/28 the
    // broadcast). A plain address at .20 leaves only .32.
    let lab = Lab::with_subnet("10.240.0.0/26", 1).await;
    let (provider, _) = lab.provider("node-1");
    let nic = lab.nic_id("node-1");
    let subnet = lab.subnet_id();
    let singles = provider.assign_ips(&nic, &subnet, 12).await.unwrap();
    assert!(singles.iter().any(|s| s.ip == ip("10.240.0.16")));
    let one = provider
        .assign_blocks(&nic, &subnet, 1, AZURE_PREFIX_LENGTH)
        .await
        .unwrap();
    assert_eq!(one[0].ip, ip("10.240.0.32"));
    let err = provider
        .assign_blocks(&nic, &subnet, 1, AZURE_PREFIX_LENGTH)
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::SubnetFull { .. }), "{err:?}");
    // Addresses are left (.48-.62 minus the broadcast), blocks are not.
    assert!(provider.assign_ips(&nic, &subnet, 1).await.is_ok());
}

#[tokio::test]
async fn a_block_counts_as_one_ip_configuration_toward_the_nic_limit() {
    let lab = Lab::with_subnet("10.240.0.0/16", 1).await;
    let (provider, _) = lab.provider("node-1");
    let nic = lab.nic_id("node-1");
    let subnet = lab.subnet_id();
    let blocks = provider
        .assign_blocks(&nic, &subnet, 255, AZURE_PREFIX_LENGTH)
        .await
        .unwrap();
    assert_eq!(blocks.len(), 255);
    let addresses: usize = blocks.iter().map(|b| b.addresses().count()).sum();
    assert_eq!(addresses, 255 * 16);
    let err = provider
        .assign_blocks(&nic, &subnet, 1, AZURE_PREFIX_LENGTH)
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::NicLimitReached { .. }), "{err:?}");
}

#[tokio::test]
async fn only_28_is_accepted() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    let (provider, _) = lab.provider("node-1");
    let err = provider
        .assign_blocks(&lab.nic_id("node-1"), &lab.subnet_id(), 1, 29)
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err:?}");
    assert!(lab.secondary_on("node-1").await.is_empty());
}

#[tokio::test]
async fn below_the_api_version_that_carries_it_the_prefix_length_is_dropped() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    let (nic_path, body) = {
        let (status, mut nic) = lab
            .arm_get(
                "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/node-1-nic",
                "2024-05-01",
            )
            .await;
        assert_eq!(status, 200);
        nic["properties"]["ipConfigurations"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "vnet-cni-old", "properties": {
                "privateIPAllocationMethod": "Dynamic",
                "privateIPAddressPrefixLength": 28,
                "subnet": {"id": lab.subnet_id()}}}));
        (
            "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/node-1-nic",
            nic,
        )
    };
    let status = lab
        .http
        .put(format!(
            "{}{nic_path}?api-version=2023-06-01",
            lab.mock.base_url()
        ))
        .json(&body)
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
    let (provider, _) = lab.provider("node-1");
    let listed = provider
        .list_secondary_ips(&lab.nic_id("node-1"))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].prefix_len, 32, "one address, not a block");
}

#[tokio::test]
async fn a_nic_read_below_that_api_version_does_not_show_the_prefix_length() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    let (provider, _) = lab.provider("node-1");
    let identity = provider.discover().await.unwrap();
    provider
        .assign_blocks(
            &identity.nic_id,
            &identity.subnet_id,
            1,
            AZURE_PREFIX_LENGTH,
        )
        .await
        .unwrap();
    let nic_path = "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/node-1-nic";
    let block_length = |nic: &serde_json::Value| {
        nic["properties"]["ipConfigurations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"].as_str().unwrap().starts_with("vnet-cni-"))
            .unwrap()["properties"]["privateIPAddressPrefixLength"]
            .clone()
    };
    let (status, current) = lab.arm_get(nic_path, "2024-05-01").await;
    assert_eq!(status, 200);
    assert_eq!(block_length(&current), json!(28));
    let (status, old) = lab.arm_get(nic_path, "2023-06-01").await;
    assert_eq!(status, 200);
    assert!(block_length(&old).is_null(), "{old}");
}

#[tokio::test]
async fn a_uniform_instance_refuses_prefix_mode_and_writes_nothing() {
    let lab = Lab::start(mixed_topology("10.240.0.0/16")).await;
    let (provider, _) = lab.provider("node-2");
    let identity = provider.discover().await.unwrap();
    lab.reset_counters().await;
    let err = provider
        .assign_blocks(
            &identity.nic_id,
            &identity.subnet_id,
            1,
            AZURE_PREFIX_LENGTH,
        )
        .await
        .unwrap_err();
    match &err {
        CloudError::Fatal(message) => assert!(message.contains("Uniform"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(lab.counters().await.calls("vmss_vm_put"), 0);
    // A Flexible member has a standalone NIC: prefix mode works there.
    let (flex, _) = lab.provider("node-4");
    let identity = flex.discover().await.unwrap();
    let blocks = flex
        .assign_blocks(
            &identity.nic_id,
            &identity.subnet_id,
            1,
            AZURE_PREFIX_LENGTH,
        )
        .await
        .unwrap();
    assert_eq!(blocks[0].prefix_len, 28);
}
