//! `vnet-agent uninstall` on a lab node: refuses while a pod of ours runs (or the agent does), then
//! removes every node object vnet-cni made: the conflist, the agent's nftables table, tombstone
//! veths with their routes, the socket; the state only with --purge.

use std::process::Output;
use std::time::Duration;

mod common;

use common::run;
use vnet_lab::lab::PoolConfig;

fn uninstall(ns: &str, agent: &str, config: &str, extra: &[&str]) -> Output {
    let mut args = vec!["netns", "exec", ns, agent, "uninstall", "--config", config];
    args.extend_from_slice(extra);
    run("ip", &args, &[])
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn nft_tables(ns: &str) -> String {
    common::run_ok("ip", &["netns", "exec", ns, "nft", "list", "tables"], &[])
}

#[test]
fn uninstall_refuses_while_pods_run_then_removes_every_node_object() {
    let guard = common::lab("uninstall", 1, PoolConfig::default(), None);
    let lab: &vnet_lab::lab::Lab = &guard;
    let st = lab.state();
    let node = st.nodes[0].clone();
    let agent = st.bin_dir.join("vnet-agent");
    let agent = agent.to_str().unwrap();
    let config = node.config_path.to_str().unwrap().to_owned();
    // The conflist as the agent publishes it (the lab's own is under another network name).
    let conflist = node.conf_dir.join("00-vnet-cni.conflist");
    std::fs::write(
        &conflist,
        "{\"cniVersion\":\"1.0.0\",\"name\":\"vnet-cni\",\"plugins\":[{\"type\":\"vnet-cni\"}]}\n",
    )
    .unwrap();
    let operators = node.conf_dir.join("10-vnet-cni.conflist");
    std::fs::write(&operators, "{\"cniVersion\":\"1.0.0\",\"name\":\"someone-elses\",\"plugins\":[{\"type\":\"bridge\"}]}\n").unwrap();
    let conf_dir = node.conf_dir.to_str().unwrap().to_owned();
    let conf_args = ["--cni-conf-dir", conf_dir.as_str()];
    assert!(nft_tables(&node.ns).contains("table ip vnet-cni"));

    // A running pod: refused, with the pod named, and nothing touched.
    let pod = lab.add_pod(&node.name, "web").expect("add pod");
    let check = uninstall(&node.ns, agent, &config, &["--check"]);
    assert_eq!(check.status.code(), Some(3), "{}", text(&check));
    assert!(
        text(&check).contains(&pod.ip.to_string()),
        "{}",
        text(&check)
    );
    assert!(text(&check).contains("drain"), "{}", text(&check));
    let out = uninstall(
        &node.ns,
        agent,
        &config,
        &[&conf_args[..], &["--purge"]].concat(),
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        conflist.exists(),
        "a refused uninstall removed the conflist"
    );
    assert!(node.state_dir.exists(), "a refused purge removed the state");
    assert!(nft_tables(&node.ns).contains("table ip vnet-cni"));

    // The pod goes (drained); its veth becomes a tombstone the agent would reap. One that is
    // still there at uninstall time is removed with its host route.
    lab.del_pod(&node.name, "web").expect("del pod");
    let tombstone = vnet_api::tombstone_veth_name(&pod.host_veth);
    common::run_ok(
        "ip",
        &[
            "-n",
            &node.ns,
            "link",
            "add",
            &tombstone,
            "type",
            "veth",
            "peer",
            "name",
            "vnt-peer0",
        ],
        &[],
    );
    common::run_ok(
        "ip",
        &["-n", &node.ns, "link", "set", &tombstone, "up"],
        &[],
    );
    common::run_ok(
        "ip",
        &[
            "-n",
            &node.ns,
            "route",
            "add",
            "10.240.99.99/32",
            "dev",
            &tombstone,
            "scope",
            "link",
        ],
        &[],
    );
    let check = uninstall(&node.ns, agent, &config, &["--check"]);
    assert!(check.status.success(), "{}", text(&check));

    // The agent still runs: refused (it could hand out an address meanwhile).
    let out = uninstall(&node.ns, agent, &config, &conf_args);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        text(&out).contains("vnet-agent is running"),
        "{}",
        text(&out)
    );
    assert!(conflist.exists());

    lab.signal_agent(&node.name, libc::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while lab.agent_pid(&node.name).is_some_and(|p| {
        std::path::Path::new(&format!("/proc/{p}")).exists()
            && !std::fs::read_to_string(format!("/proc/{p}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
    }) {
        assert!(std::time::Instant::now() < deadline, "agent did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = uninstall(&node.ns, agent, &config, &conf_args);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!conflist.exists(), "the conflist is removed");
    assert!(
        operators.exists(),
        "a conflist of another network is left alone"
    );
    assert!(
        !nft_tables(&node.ns).contains("vnet-cni"),
        "nft table removed"
    );
    let links = common::run_ok("ip", &["-n", &node.ns, "-o", "link", "show"], &[]);
    assert!(!links.contains(&tombstone), "tombstone removed: {links}");
    let routes = common::run_ok("ip", &["-n", &node.ns, "route", "show"], &[]);
    assert!(
        !routes.contains("10.240.99.99"),
        "its route is gone: {routes}"
    );
    assert!(!node.socket.exists(), "socket removed");
    assert!(node.state_dir.exists(), "the state stays without --purge");
    assert!(text(&out).contains("--purge"), "{}", text(&out));

    // Again with --purge: idempotent, and the state goes.
    let out = uninstall(
        &node.ns,
        agent,
        &config,
        &[&conf_args[..], &["--purge"]].concat(),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(!node.state_dir.exists(), "purged");
    drop(guard);
}
