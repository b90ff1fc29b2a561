//! Kernel effects (netlink veth deletion, nftables, ip_forward) in a private network namespace.
//! Needs root: without it the tests fail with a clear message (vnet-testns `require_root`).

use std::fs::File;
use std::net::Ipv4Addr;

use vnet_agent::masq;
use vnet_agent::netlink::{LinkOps, Rtnetlink};
use vnet_testns::Netns;

/// Runs `f` on a fresh std thread that has entered `ns`, with a current-thread tokio runtime. The
/// thread never switches back: it just ends.
fn in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce(&tokio::runtime::Runtime) -> T + Send + 'static,
) -> T {
    let path = ns.path();
    std::thread::spawn(move || {
        let file = File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        f(&rt)
    })
    .join()
    .expect("netns thread")
}

#[test]
fn dying_veths_are_found_and_deleted_and_a_missing_one_is_success() {
    vnet_testns::require_root();
    let ns = Netns::new("agentlink").unwrap();
    let tombstone = vnet_api::tombstone_veth_name("vnet0123456789a");
    // veth pairs (the kernel may lack the dummy module); deleting one end deletes both.
    for (name, peer) in [
        (tombstone.as_str(), "peer0"),
        ("vdelb", "peerb"),
        ("keepme0", "keepme1"),
    ] {
        ns.exec(
            "ip",
            &["link", "add", name, "type", "veth", "peer", "name", peer],
        )
        .unwrap();
    }
    let victim = tombstone.clone();
    let (found, after) = in_netns(&ns, move |rt| {
        rt.block_on(async {
            let links = Rtnetlink::open().unwrap();
            let mut found = links.links_with_prefix("vdel").await.unwrap();
            found.sort();
            links.delete_link(&victim).await.unwrap();
            links
                .delete_link(&victim)
                .await
                .expect("deleting a gone link is success");
            links
                .delete_link(&vnet_api::tombstone_veth_name("vnetneverexist0"))
                .await
                .unwrap();
            let mut after = links.links_with_prefix("").await.unwrap();
            after.sort();
            (found, after)
        })
    });
    let mut expected = vec![tombstone.clone(), "vdelb".to_string()];
    expected.sort();
    assert_eq!(found, expected, "listed by prefix");
    assert!(!after.contains(&tombstone));
    assert!(
        after.contains(&"keepme0".to_string()),
        "other links are untouched"
    );
}

#[test]
fn a_batch_of_dying_veths_goes_in_one_request_and_both_ends_with_it() {
    vnet_testns::require_root();
    let ns = Netns::new("agentbatch").unwrap();
    let pod = Netns::new("agentbpod").unwrap();
    let names: Vec<String> = (0..20)
        .map(|i| vnet_api::tombstone_veth_name(&format!("vnet{i:011x}")))
        .collect();
    for (i, name) in names.iter().enumerate() {
        // The peer lives in another namespace, as a pod's end does.
        let peer = format!("eth{i}");
        ns.exec(
            "ip",
            &[
                "link",
                "add",
                name,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
                "netns",
                pod.name(),
            ],
        )
        .unwrap();
    }
    ns.exec(
        "ip",
        &[
            "link", "add", "keepme0", "type", "veth", "peer", "name", "keepme1",
        ],
    )
    .unwrap();
    // One name is already gone, one never existed: both are success.
    ns.exec("ip", &["link", "del", &names[3]]).unwrap();
    let mut asked = names.clone();
    asked.push(vnet_api::tombstone_veth_name("vnetneverexist0"));
    let (results, after) = in_netns(&ns, move |rt| {
        rt.block_on(async {
            let links = Rtnetlink::open().unwrap();
            let results = links.delete_links(&asked).await;
            let after = links.links_with_prefix("").await.unwrap();
            (results, after)
        })
    });
    assert_eq!(results.len(), 21);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for name in &names {
        assert!(!after.contains(name), "{name} left: {after:?}");
    }
    assert!(
        after.contains(&"keepme0".to_string()),
        "other links untouched"
    );
    let pod_links = pod.exec("ip", &["-o", "link", "show"]).unwrap();
    let pod_links = String::from_utf8_lossy(&pod_links.stdout);
    assert!(!pod_links.contains("eth"), "pod ends left: {pod_links}");
}

#[test]
fn masquerade_table_is_installed_idempotently_and_forwarding_enabled() {
    vnet_testns::require_root();
    let ns = Netns::new("agentnft").unwrap();
    let script_a = masq::masquerade_script(
        &["10.240.0.0/16".parse().unwrap()],
        Ipv4Addr::new(10, 240, 0, 4),
        &["10.240.0.0/16".parse().unwrap()],
    );
    let script_b = masq::masquerade_script(
        &["10.240.0.0/16".parse().unwrap()],
        Ipv4Addr::new(10, 240, 0, 4),
        &[
            "10.240.0.0/16".parse().unwrap(),
            "172.16.0.0/12".parse().unwrap(),
        ],
    );
    in_netns(&ns, move |_| {
        masq::enable_forwarding().unwrap();
        masq::apply_nft(&script_a, masq::NFT_TIMEOUT).unwrap();
        masq::apply_nft(&script_a, masq::NFT_TIMEOUT).unwrap();
        // A restart with other CIDRs replaces the table.
        masq::apply_nft(&script_b, masq::NFT_TIMEOUT).unwrap();
    });
    let out = ns
        .exec("nft", &["list", "table", "ip", "vnet-cni"])
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        listing.matches("vnet-cni pod egress").count(),
        1,
        "exactly one rule:\n{listing}"
    );
    assert!(listing.contains("172.16.0.0/12"), "{listing}");
    let tables = ns.exec("nft", &["list", "tables"]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&tables.stdout)
            .matches("vnet-cni")
            .count(),
        1
    );
    let fwd = ns.exec("cat", &["/proc/sys/net/ipv4/ip_forward"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1");
}

#[test]
fn a_bad_script_is_reported_with_nft_stderr() {
    vnet_testns::require_root();
    let ns = Netns::new("agentnftbad").unwrap();
    let err = in_netns(&ns, |_| {
        masq::apply_nft("table ip x { nonsense }\n", masq::NFT_TIMEOUT)
    })
    .unwrap_err();
    assert!(matches!(err, masq::HostError::Nft { .. }), "{err}");
}

fn rules() -> masq::HostRules {
    masq::HostRules {
        masquerade: Some((
            vec!["10.240.0.0/16".parse().unwrap()],
            Ipv4Addr::new(10, 240, 0, 4),
            vec!["10.240.0.0/16".parse().unwrap()],
        )),
        drop_pod_imds: Some("vnet".into()),
    }
}

#[test]
fn a_flushed_ruleset_and_forwarding_off_are_restored() {
    vnet_testns::require_root();
    let ns = Netns::new("agentrepair").unwrap();
    let first = in_netns(&ns, |_| masq::ensure(&rules()).unwrap());
    assert!(first.table, "installed the first time");
    let again = in_netns(&ns, |_| masq::ensure(&rules()).unwrap());
    assert_eq!(
        again,
        masq::Repaired::default(),
        "nothing to do when intact"
    );
    // A firewall reload and a sysctl reset.
    ns.exec("nft", &["flush", "ruleset"]).unwrap();
    ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=0"])
        .unwrap();
    let repaired = in_netns(&ns, |_| masq::ensure(&rules()).unwrap());
    assert_eq!(
        repaired,
        masq::Repaired {
            forwarding: true,
            table: true
        }
    );
    let out = ns
        .exec("nft", &["list", "table", "ip", "vnet-cni"])
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains(masq::MASQUERADE_COMMENT), "{listing}");
    assert!(listing.contains(masq::IMDS_DROP_COMMENT), "{listing}");
    let fwd = ns.exec("cat", &["/proc/sys/net/ipv4/ip_forward"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1");
}

#[test]
fn pods_cannot_reach_imds_and_the_node_can() {
    vnet_testns::require_root();
    // IMDS answered in the node's namespace, as Azure's host answers for the VM.
    let node = Netns::new("agentimds").unwrap();
    let pod = Netns::new("agentimdspod").unwrap();
    let host_veth = "vnetimds000001";
    node.exec(
        "ip",
        &[
            "link", "add", host_veth, "type", "veth", "peer", "name", "eth0",
        ],
    )
    .unwrap();
    node.exec("ip", &["link", "set", "eth0", "netns", pod.name()])
        .unwrap();
    for (ns, args) in [
        (
            &node,
            vec![
                "addr",
                "add",
                "169.254.169.254/32",
                "dev",
                "lo",
                "scope",
                "host",
            ],
        ),
        (&node, vec!["link", "set", "lo", "up"]),
        (&node, vec!["link", "set", host_veth, "up"]),
        (
            &node,
            vec!["route", "add", "10.240.0.9/32", "dev", host_veth],
        ),
        (&pod, vec!["addr", "add", "10.240.0.9/32", "dev", "eth0"]),
        (&pod, vec!["link", "set", "eth0", "up"]),
        (&pod, vec!["link", "set", "lo", "up"]),
        (
            &pod,
            vec!["route", "add", "169.254.169.254/32", "dev", "eth0"],
        ),
    ] {
        ns.exec("ip", &args).unwrap();
    }
    let ping = |ns: &Netns| {
        ns.exec("ping", &["-c", "1", "-W", "1", "169.254.169.254"])
            .is_ok()
    };
    assert!(
        ping(&pod),
        "the set-up works: without the rule the pod reaches it"
    );
    let mut opt_out = rules();
    opt_out.drop_pod_imds = None;
    in_netns(&node, move |_| masq::ensure(&opt_out).unwrap());
    assert!(ping(&pod), "pod_imds_access = true leaves it reachable");
    in_netns(&node, |_| {
        // The opt-out's table lacks the rule: ensure puts it in.
        assert!(masq::ensure(&rules()).unwrap().table);
    });
    assert!(!ping(&pod), "the pod must not reach IMDS");
    assert!(ping(&node), "the node reaches IMDS");
}
