//! Root tests of the real data path: the built plugin runs inside a test-created node namespace
//! against a fake agent; pods are test-created namespaces. Everything is removed on drop.

mod common;

use std::net::Ipv4Addr;

use common::{FakeAgent, cni_env, conf, exec_plugin, ip, node, path_str};
use serde_json::Value;
use vnet_api::{AttachmentKey, host_veth_name, spool_file_name, tombstone_veth_name};
use vnet_testns::Netns;

fn key(id: &str, ifname: &str) -> AttachmentKey {
    AttachmentKey {
        container_id: id.parse().unwrap(),
        ifname: ifname.parse().unwrap(),
    }
}

fn add(node: &Netns, agent: &FakeAgent, version: &str, id: &str, pod: &Netns) -> common::Outcome {
    let cfg = conf(version, agent.socket_str(), &agent.spool_dir()).to_string();
    exec_plugin(
        Some(node),
        &cni_env("ADD", id, &path_str(pod), "eth0"),
        &cfg,
    )
}

fn run(node: &Netns, agent: &FakeAgent, command: &str, id: &str, netns: &str) -> common::Outcome {
    let cfg = conf("1.0.0", agent.socket_str(), &agent.spool_dir()).to_string();
    exec_plugin(Some(node), &cni_env(command, id, netns, "eth0"), &cfg)
}

/// True when one line of `text` contains every part.
fn has_line(text: &str, parts: &[&str]) -> bool {
    text.lines().any(|l| parts.iter().all(|p| l.contains(p)))
}

fn pod_ip(result: &Value) -> Ipv4Addr {
    result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .parse()
        .unwrap()
}

#[test]
fn add_check_del_del_again() {
    let node = node();
    let pod = Netns::new("pod").unwrap();
    let agent = FakeAgent::start([10, 77, 1]);
    let id = "ctr-lifecycle";
    let host_veth = host_veth_name("vnet", &key(id, "eth0"));

    let out = add(&node, &agent, "1.0.0", id, &pod);
    let result = out.assert_ok().json();
    // Debug logging is on: it must all be on stderr, stdout stays one JSON document.
    assert!(out.stderr.contains("DEBUG"), "{}", out.stderr);
    let pod_addr = pod_ip(&result);
    assert_eq!(result["interfaces"][0]["name"], host_veth.as_str());
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], path_str(&pod).as_str());

    // Pod side, as a user would look at it.
    let addrs = ip(&pod, &["-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains(&format!("{pod_addr}/32")), "{addrs}");
    let routes = ip(&pod, &["-4", "route", "show"]);
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    assert!(
        has_line(&routes, &["169.254.1.1 dev eth0", "scope link"]),
        "{routes}"
    );
    let neigh = ip(&pod, &["neigh", "show", "169.254.1.1", "dev", "eth0"]);
    let host_mac = result["interfaces"][0]["mac"].as_str().unwrap();
    assert!(
        neigh.contains(host_mac) && neigh.contains("PERMANENT"),
        "{neigh}"
    );
    // Host side.
    let host_routes = ip(&node, &["-4", "route", "show"]);
    assert!(
        has_line(
            &host_routes,
            &[&format!("{pod_addr} dev {host_veth}"), "scope link"]
        ),
        "{host_routes}"
    );
    let link = ip(&node, &["link", "show", &host_veth]);
    assert!(link.contains("UP") && link.contains("mtu 1500"), "{link}");
    assert_eq!(
        node.exec(
            "cat",
            &[&format!("/proc/sys/net/ipv6/conf/{host_veth}/accept_ra")]
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "0".into()),
        "0"
    );
    // The pod reaches the node through the veth.
    pod.exec("ping", &["-c", "1", "-W", "2", common::NODE_IP])
        .unwrap();

    let out = run(&node, &agent, "CHECK", id, &path_str(&pod));
    out.assert_ok();
    assert!(
        out.stdout.trim().is_empty(),
        "CHECK prints nothing: {:?}",
        out.stdout
    );

    // CHECK notices when a piece ADD made is gone.
    pod.exec("ip", &["route", "del", "default"]).unwrap();
    let out = run(&node, &agent, "CHECK", id, &path_str(&pod));
    assert_eq!(out.error_code(), 105);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("default route")
    );
    pod.exec(
        "ip",
        &[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    run(&node, &agent, "CHECK", id, &path_str(&pod)).assert_ok();

    // The agent deletes the handed-over tombstone before it answers (as the real one does).
    agent.state.lock().unwrap().reap_in = Some(node.name().to_owned());
    let out = run(&node, &agent, "DEL", id, &path_str(&pod));
    out.assert_ok();
    assert!(out.stdout.trim().is_empty());
    assert!(
        out.stderr.contains("deleted by the agent"),
        "{}",
        out.stderr
    );
    let releases = agent.releases();
    let dying = releases[0]
        .dying_veth
        .clone()
        .expect("DEL hands the veth over");
    assert_eq!(dying, tombstone_veth_name(&host_veth));
    // When DEL returns, nothing of the attachment is left: not in the pod, not on the node.
    assert_eq!(pod_links(&pod), vec!["lo".to_owned()]);
    let links = ip(&node, &["link", "show"]);
    assert!(
        !links.contains(&host_veth) && !links.contains(&dying),
        "{links}"
    );
    assert!(!ip(&node, &["-4", "route", "show"]).contains(&pod_addr.to_string()));

    // CHECK now fails (the agent holds nothing), DEL again succeeds and only releases.
    assert!(!run(&node, &agent, "CHECK", id, &path_str(&pod)).success);
    run(&node, &agent, "DEL", id, &path_str(&pod)).assert_ok();
    run(&node, &agent, "DEL", id, "").assert_ok();
    assert_eq!(agent.allocation_count(), 0);
    for again in &agent.releases()[1..] {
        assert_eq!(again.dying_veth, None);
    }

    // An agent from before `dying_veth_deleted` deletes in the background after answering: the
    // plugin deletes the link itself, so DEL still leaves nothing behind when it returns.
    agent.state.lock().unwrap().reap_in_background = true;
    add(&node, &agent, "1.0.0", id, &pod).assert_ok();
    let out = run(&node, &agent, "DEL", id, &path_str(&pod));
    out.assert_ok();
    assert!(out.stderr.contains("deleted here"), "{}", out.stderr);
    assert_eq!(pod_links(&pod), vec!["lo".to_owned()]);
    // And one that does not delete it at all: the same.
    agent.state.lock().unwrap().reap_in = None;
    add(&node, &agent, "1.0.0", id, &pod).assert_ok();
    run(&node, &agent, "DEL", id, &path_str(&pod)).assert_ok();
    assert_eq!(pod_links(&pod), vec!["lo".to_owned()]);
    let links = ip(&node, &["link", "show"]);
    assert!(
        !links.contains(&host_veth) && !links.contains(&dying),
        "{links}"
    );
    assert_eq!(agent.allocation_count(), 0);

    // A leftover tombstone of the same key (its deletion failed both in the agent and here, and
    // a new ADD ran since): the new veth cannot take the name, so it is deleted at once and
    // released without a dying veth; the tombstone is handed over by a later DEL.
    add(&node, &agent, "1.0.0", id, &pod).assert_ok();
    ip(
        &node,
        &[
            "link",
            "add",
            &dying,
            "type",
            "veth",
            "peer",
            "name",
            "tomb-peer",
        ],
    );
    run(&node, &agent, "DEL", id, &path_str(&pod)).assert_ok();
    assert_eq!(agent.releases().pop().unwrap().dying_veth, None);
    assert_eq!(pod_links(&pod), vec!["lo".to_owned()]);
    run(&node, &agent, "DEL", id, "").assert_ok();
    assert_eq!(
        agent.releases().pop().unwrap().dying_veth.as_deref(),
        Some(dying.as_str())
    );
    assert!(!ip(&node, &["link", "show"]).contains(&dying));
}

/// Names of the links in a namespace.
fn pod_links(ns: &Netns) -> Vec<String> {
    ip(ns, &["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect()
}

/// A DEL killed after renaming the host veth to its tombstone but before the release: the next
/// DEL must hand the tombstone over (or, agent down, delete it), never release the address while
/// the old link still exists.
#[test]
fn del_after_a_del_that_died_between_rename_and_release() {
    let node = node();
    let pod = Netns::new("pod").unwrap();
    let agent = FakeAgent::start([10, 77, 9]);
    let crash = |id: &str| {
        let host_veth = host_veth_name("vnet", &key(id, "eth0"));
        let tombstone = tombstone_veth_name(&host_veth);
        node.exec("ip", &["link", "set", &host_veth, "down"])
            .unwrap();
        node.exec("ip", &["link", "set", &host_veth, "name", &tombstone])
            .unwrap();
        tombstone
    };

    let id = "ctr-crashed-del";
    add(&node, &agent, "1.0.0", id, &pod).assert_ok();
    let tombstone = crash(id);
    run(&node, &agent, "DEL", id, &path_str(&pod)).assert_ok();
    let releases = agent.releases();
    assert_eq!(releases.len(), 1);
    assert_eq!(releases[0].dying_veth.as_deref(), Some(tombstone.as_str()));
    assert_eq!(agent.allocation_count(), 0);
    // The pod end, left as eth0 by the dead DEL, is gone with the tombstone.
    assert_eq!(pod_links(&pod), vec!["lo".to_owned()]);
    assert!(!ip(&node, &["link", "show"]).contains(&tombstone));

    // Same crash, agent down: the tombstone is deleted synchronously, then the release spooled.
    let id = "ctr-crashed-del-2";
    let pod2 = Netns::new("pod").unwrap();
    add(&node, &agent, "1.0.0", id, &pod2).assert_ok();
    let tombstone = crash(id);
    let dead = FakeAgent::dead_socket(agent.dir.path());
    let cfg = conf("1.0.0", dead.to_str().unwrap(), &agent.spool_dir()).to_string();
    exec_plugin(
        Some(&node),
        &cni_env("DEL", id, &path_str(&pod2), "eth0"),
        &cfg,
    )
    .assert_ok();
    assert!(!ip(&node, &["link", "show"]).contains(&tombstone));
    let spooled = agent.spool_dir().join(spool_file_name(&key(id, "eth0")));
    let body: Value = serde_json::from_slice(&std::fs::read(&spooled).unwrap()).unwrap();
    assert_eq!(body["container_id"], id);
    assert!(body.get("dying_veth").is_none());
}

#[test]
fn del_after_the_netns_was_deleted() {
    let node = node();
    let mut pod = Netns::new("pod").unwrap();
    let agent = FakeAgent::start([10, 77, 2]);
    let id = "ctr-netns-gone";
    let pod_path = path_str(&pod);
    add(&node, &agent, "1.0.0", id, &pod).assert_ok();
    pod.delete().unwrap();
    run(&node, &agent, "DEL", id, &pod_path).assert_ok();
    run(&node, &agent, "DEL", id, "").assert_ok();
    assert_eq!(agent.allocation_count(), 0);
    assert!(!ip(&node, &["link", "show"]).contains(&host_veth_name("vnet", &key(id, "eth0"))));
}

#[test]
fn add_onto_an_existing_ifname_fails_cleanly() {
    let node = node();
    let pod = Netns::new("pod").unwrap();
    // Something else already called eth0 in the pod (this kernel has no dummy links).
    pod.exec(
        "ip",
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
        ],
    )
    .unwrap();
    let agent = FakeAgent::start([10, 77, 3]);
    let before = ip(&node, &["-o", "link", "show"]);
    let out = add(&node, &agent, "1.0.0", "ctr-exists", &pod);
    assert_eq!(out.error_code(), 101);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("already exists")
    );
    // Nothing left behind: no allocation, no new link, the pod's own eth0 untouched.
    assert_eq!(agent.allocation_count(), 0);
    assert_eq!(
        ip(&node, &["-o", "link", "show"]).lines().count(),
        before.lines().count()
    );
    assert!(ip(&pod, &["link", "show", "eth0"]).contains("eth0@other0"));
}

#[test]
fn results_have_the_right_shape_for_every_version() {
    let node = node();
    let agent = FakeAgent::start([10, 77, 4]);
    for (i, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let pod = Netns::new("pod").unwrap();
        let id = format!("ctr-version-{i}");
        let r = add(&node, &agent, version, &id, &pod).assert_ok().json();
        assert_eq!(r["cniVersion"], *version);
        assert_eq!(r["interfaces"].as_array().unwrap().len(), 2);
        assert!(r["interfaces"][0]["mac"].as_str().unwrap().len() == 17);
        assert!(r["interfaces"][1]["mac"].as_str().unwrap().len() == 17);
        let ipc = &r["ips"][0];
        assert_eq!(ipc["interface"], 1);
        assert_eq!(ipc["gateway"], "169.254.1.1");
        assert_eq!(
            ipc.get("version").is_some(),
            version.starts_with("0."),
            "{version}"
        );
        assert_eq!(r["routes"][1]["dst"], "0.0.0.0/0");
        assert_eq!(r["routes"][1]["gw"], "169.254.1.1");
        assert_eq!(r["interfaces"][1].get("mtu").is_some(), *version == "1.1.0");
        run(&node, &agent, "DEL", &id, &path_str(&pod)).assert_ok();
    }
}

#[test]
fn agent_down_add_is_11_and_del_spools() {
    let node = node();
    let pod = Netns::new("pod").unwrap();
    let agent = FakeAgent::start([10, 77, 5]);
    let id = "ctr-agent-down";
    // Wire the pod while the agent is up, then "stop" it by pointing at a dead socket.
    add(&node, &agent, "1.0.0", id, &pod).assert_ok();
    let dead = FakeAgent::dead_socket(agent.dir.path());
    let cfg = conf("1.0.0", dead.to_str().unwrap(), &agent.spool_dir()).to_string();

    let other = Netns::new("pod").unwrap();
    let links_before = ip(&node, &["-o", "link", "show"]).lines().count();
    let out = exec_plugin(
        Some(&node),
        &cni_env("ADD", "ctr-other", &path_str(&other), "eth0"),
        &cfg,
    );
    assert_eq!(out.error_code(), 11);
    let msg = out.json()["msg"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("not reachable") && msg.contains("vnet-agent"),
        "{msg}"
    );
    assert_eq!(
        ip(&node, &["-o", "link", "show"]).lines().count(),
        links_before
    );
    assert!(!ip(&other, &["link", "show"]).contains("eth0"));

    let out = exec_plugin(
        Some(&node),
        &cni_env("DEL", id, &path_str(&pod), "eth0"),
        &cfg,
    );
    out.assert_ok();
    let spooled = agent.spool_dir().join(spool_file_name(&key(id, "eth0")));
    let body: Value = serde_json::from_slice(&std::fs::read(&spooled).unwrap()).unwrap();
    assert_eq!(body["container_id"], id);
    assert_eq!(body["ifname"], "eth0");
    assert!(body.get("dying_veth").is_none());
    // Deleted synchronously: no tombstone left for an agent that is not there.
    let links = ip(&node, &["link", "show"]);
    assert!(!links.contains("vdel") && !links.contains(&host_veth_name("vnet", &key(id, "eth0"))));
    // DEL again still succeeds.
    exec_plugin(Some(&node), &cni_env("DEL", id, "", "eth0"), &cfg).assert_ok();
}

#[test]
fn an_agent_that_dies_mid_request_fails_add_with_11_and_del_spools() {
    let node = node();
    let pod = Netns::new("pod").unwrap();
    let agent = FakeAgent::start([10, 77, 10]);
    let id = "ctr-dying-agent";
    add(&node, &agent, "1.0.0", id, &pod).assert_ok();
    let socket = agent.dir.path().join("dying.sock");
    common::dying_agent(&socket);
    let cfg = conf("1.0.0", socket.to_str().unwrap(), &agent.spool_dir()).to_string();
    let other = Netns::new("pod").unwrap();
    let out = exec_plugin(
        Some(&node),
        &cni_env("ADD", "ctr-other", &path_str(&other), "eth0"),
        &cfg,
    );
    assert_eq!(out.error_code(), 11, "{out:?}");
    assert!(!ip(&other, &["link", "show"]).contains("eth0"));
    // DEL: not delivered either way, so the link goes now and the release is spooled.
    let out = exec_plugin(
        Some(&node),
        &cni_env("DEL", id, &path_str(&pod), "eth0"),
        &cfg,
    );
    out.assert_ok();
    assert!(
        agent
            .spool_dir()
            .join(spool_file_name(&key(id, "eth0")))
            .exists()
    );
    let links = ip(&node, &["link", "show"]);
    assert!(!links.contains("vdel") && !links.contains(&host_veth_name("vnet", &key(id, "eth0"))));
}

#[test]
fn a_link_that_is_not_this_attachments_is_never_deleted_or_retired() {
    let node = node();
    let pod = Netns::new("pod").unwrap();
    let agent = FakeAgent::start([10, 77, 12]);
    let id = "ctr-owner";
    let host_veth = host_veth_name("vnet", &key(id, "eth0"));
    // Another attachment's veth holding the same (hashed, short) host name: a collision.
    ip(
        &node,
        &[
            "link",
            "add",
            &host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "other-peer",
        ],
    );
    ip(
        &node,
        &[
            "link",
            "set",
            &host_veth,
            "alias",
            "vnet-cni someone-else/eth0",
        ],
    );
    let out = add(&node, &agent, "1.0.0", id, &pod);
    assert_eq!(out.error_code(), 107, "{out:?}");
    let msg = out.json()["msg"].as_str().unwrap().to_owned();
    assert!(
        msg.contains(&host_veth) && msg.contains("someone-else"),
        "{msg}"
    );
    assert!(!ip(&pod, &["link", "show"]).contains("eth0"));
    assert_eq!(agent.allocation_count(), 0, "the address went back");
    // DEL (the runtime follows a failed ADD with one) leaves it alone too, and says so.
    let out = run(&node, &agent, "DEL", id, &path_str(&pod));
    out.assert_ok();
    assert!(
        out.stderr.contains("not this attachment's link"),
        "{}",
        out.stderr
    );
    let link = ip(&node, &["-d", "link", "show", &host_veth]);
    assert!(link.contains("someone-else"), "{link}");
    assert!(agent.releases().iter().all(|r| r.dying_veth.is_none()));
    ip(&node, &["link", "del", &host_veth]);

    // Our own ADD marks the host veth; CHECK and DEL accept it.
    add(&node, &agent, "1.0.0", id, &pod).assert_ok();
    let link = ip(&node, &["-d", "link", "show", &host_veth]);
    assert!(
        link.contains(&format!("alias vnet-cni {id}/eth0")),
        "{link}"
    );
    run(&node, &agent, "CHECK", id, &path_str(&pod)).assert_ok();
    // CHECK notices a foreign mark.
    ip(
        &node,
        &[
            "link",
            "set",
            &host_veth,
            "alias",
            "vnet-cni someone-else/eth0",
        ],
    );
    assert_eq!(
        run(&node, &agent, "CHECK", id, &path_str(&pod)).error_code(),
        105
    );
    ip(
        &node,
        &[
            "link",
            "set",
            &host_veth,
            "alias",
            &format!("vnet-cni {id}/eth0"),
        ],
    );
    run(&node, &agent, "DEL", id, &path_str(&pod)).assert_ok();
    assert!(!ip(&pod, &["link", "show"]).contains("eth0"));

    // A veth from before the mark (no alias) is still this attachment's: ADD replaces it.
    ip(
        &node,
        &[
            "link", "add", &host_veth, "type", "veth", "peer", "name", "old-peer",
        ],
    );
    add(&node, &agent, "1.0.0", id, &pod).assert_ok();
    assert!(!ip(&node, &["link", "show"]).contains("old-peer"));
    run(&node, &agent, "DEL", id, &path_str(&pod)).assert_ok();
}

#[test]
fn a_500_byte_container_id_is_wired_and_its_del_spools_with_the_agent_down() {
    let node = node();
    let pod = Netns::new("pod").unwrap();
    let agent = FakeAgent::start([10, 77, 11]);
    // The spec sets no length limit; runtimes that derive IDs from long names do send these.
    let id = format!("c{}", "0123456789abcdef".repeat(32))[..500].to_owned();
    add(&node, &agent, "1.0.0", &id, &pod).assert_ok();
    let dead = FakeAgent::dead_socket(agent.dir.path());
    let cfg = conf("1.0.0", dead.to_str().unwrap(), &agent.spool_dir()).to_string();
    let out = exec_plugin(
        Some(&node),
        &cni_env("DEL", &id, &path_str(&pod), "eth0"),
        &cfg,
    );
    out.assert_ok();
    // Spooled under the name the agent looks for before it allocates for this key again.
    let name = spool_file_name(&key(&id, "eth0"));
    assert!(name.len() < 255, "{name}");
    let files: Vec<String> = std::fs::read_dir(agent.spool_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        files,
        vec![name.clone()],
        "one spool file, no temp file left"
    );
    let body: Value =
        serde_json::from_slice(&std::fs::read(agent.spool_dir().join(&name)).unwrap()).unwrap();
    assert_eq!(body["container_id"], id.as_str());
    assert_eq!(body["ifname"], "eth0");
    let links = ip(&node, &["link", "show"]);
    assert!(!links.contains("vdel") && !links.contains(&host_veth_name("vnet", &key(&id, "eth0"))));
    assert!(!ip(&pod, &["link", "show"]).contains("eth0"));
    // DEL again (the runtime's second DEL, netns gone) rewrites the same file.
    exec_plugin(Some(&node), &cni_env("DEL", &id, "", "eth0"), &cfg).assert_ok();
    assert_eq!(std::fs::read_dir(agent.spool_dir()).unwrap().count(), 1);
}

#[test]
fn fifty_parallel_adds_get_distinct_working_addresses() {
    let node = node();
    let agent = FakeAgent::start([10, 78, 0]);
    let pods: Vec<Netns> = (0..50).map(|_| Netns::new("pod").unwrap()).collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let (node, agent) = (&node, &agent);
                s.spawn(move || {
                    add(node, agent, "1.0.0", &format!("ctr-par-{i}"), pod)
                        .assert_ok()
                        .json()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips: Vec<Ipv4Addr> = results.iter().map(pod_ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 50, "distinct addresses");
    for (i, r) in results.iter().enumerate() {
        let ip = pod_ip(r).to_string();
        node.exec("ping", &["-c", "1", "-W", "2", &ip])
            .unwrap_or_else(|e| panic!("pod {i} at {ip} unreachable from the node: {e}"));
    }
    for (i, pod) in pods.iter().enumerate() {
        run(
            &node,
            &agent,
            "DEL",
            &format!("ctr-par-{i}"),
            &path_str(pod),
        )
        .assert_ok();
    }
    assert_eq!(agent.allocation_count(), 0);
}

#[test]
fn status_and_gc() {
    let node = node();
    let agent = FakeAgent::start([10, 77, 6]);
    let keep_pod = Netns::new("pod").unwrap();
    let stale_pod = Netns::new("pod").unwrap();
    add(&node, &agent, "1.1.0", "ctr-keep", &keep_pod).assert_ok();
    add(&node, &agent, "1.1.0", "ctr-stale", &stale_pod).assert_ok();
    // A leftover tombstone from an earlier DEL.
    node.exec(
        "ip",
        &[
            "link",
            "add",
            "vdel0123456789a",
            "type",
            "veth",
            "peer",
            "name",
            "vdelpeer",
        ],
    )
    .unwrap();

    let mut cfg = conf("1.1.0", agent.socket_str(), &agent.spool_dir());
    let out = exec_plugin(Some(&node), &[("CNI_COMMAND", "STATUS")], &cfg.to_string());
    out.assert_ok();
    assert!(out.stdout.trim().is_empty());

    cfg["cni.dev/valid-attachments"] =
        serde_json::json!([{"containerID": "ctr-keep", "ifname": "eth0"}]);
    agent.state.lock().unwrap().links_seen_at_gc_in = Some(node.name().to_owned());
    let out = exec_plugin(Some(&node), &[("CNI_COMMAND", "GC")], &cfg.to_string());
    out.assert_ok();
    // The stale veth (and its /32 route) was gone before the agent was asked to free addresses.
    let at_gc = agent.state.lock().unwrap().links_at_gc.pop().unwrap();
    assert!(
        !at_gc.contains(&host_veth_name("vnet", &key("ctr-stale", "eth0"))),
        "{at_gc}"
    );
    assert!(!at_gc.contains("vdel0123456789a"), "{at_gc}");
    assert!(
        at_gc.contains(&host_veth_name("vnet", &key("ctr-keep", "eth0"))),
        "{at_gc}"
    );
    let links = ip(&node, &["link", "show"]);
    assert!(links.contains(&host_veth_name("vnet", &key("ctr-keep", "eth0"))));
    assert!(!links.contains(&host_veth_name("vnet", &key("ctr-stale", "eth0"))));
    assert!(!links.contains("vdel"));
    assert_eq!(agent.allocation_count(), 1);
    // The older key is accepted as well.
    let mut old = conf("1.1.0", agent.socket_str(), &agent.spool_dir());
    old["cni.dev/attachments"] = serde_json::json!([{"containerID": "ctr-keep", "ifname": "eth0"}]);
    exec_plugin(Some(&node), &[("CNI_COMMAND", "GC")], &old.to_string()).assert_ok();
    assert_eq!(agent.allocation_count(), 1);

    // A bad entry does not stop GC: everything else is done, every error reported.
    let stale_pod2 = Netns::new("pod").unwrap();
    add(&node, &agent, "1.1.0", "ctr-stale2", &stale_pod2).assert_ok();
    let mut bad = conf("1.1.0", agent.socket_str(), &agent.spool_dir());
    bad["cni.dev/valid-attachments"] = serde_json::json!([
        {"containerID": "-bad", "ifname": "eth0"},
        {"containerID": "ctr-keep", "ifname": "eth0"},
    ]);
    let out = exec_plugin(Some(&node), &[("CNI_COMMAND", "GC")], &bad.to_string());
    assert_eq!(out.error_code(), 106);
    assert!(out.json()["details"].as_str().unwrap().contains("-bad"));
    let links = ip(&node, &["link", "show"]);
    assert!(!links.contains(&host_veth_name("vnet", &key("ctr-stale2", "eth0"))));
    assert!(links.contains(&host_veth_name("vnet", &key("ctr-keep", "eth0"))));
    assert_eq!(agent.allocation_count(), 1);

    // Address exhaustion keeps STATUS at 0 (the node's network stays ready; ADD answers 104),
    // whatever exhausted it: subnet full, the pool at its max, the NIC's limit.
    let status = |ready: bool, can_allocate: bool, reason: &str, unreconciled: usize| {
        Some(vnet_api::StatusResponse {
            ready,
            can_allocate,
            reason: Some(reason.into()),
            node: "node-1".into(),
            pool: vnet_api::PoolStatus {
                total: 250,
                allocated: 250,
                max: 250,
                ..Default::default()
            },
            subnet_full: reason.contains("SubnetIsFull"),
            last_cloud_error: None,
            unreconciled: vec![Ipv4Addr::new(10, 77, 6, 200); unreconciled],
        })
    };
    for reason in [
        "subnet nodes has no free addresses (SubnetIsFull); the agent retries in the background",
        "all 250 addresses this node may hold are allocated (pool.max = 250, NIC limit 256)",
    ] {
        agent.state.lock().unwrap().status = status(true, false, reason, 0);
        let out = exec_plugin(Some(&node), &[("CNI_COMMAND", "STATUS")], &cfg.to_string());
        out.assert_ok();
        assert!(out.stdout.trim().is_empty(), "{out:?}");
        assert!(out.stderr.contains(reason), "logged: {}", out.stderr);
    }
    // Not ready / store unusable: 50 with the agent's reason; 51 when pods are impaired too.
    agent.state.lock().unwrap().status = status(false, false, "store failed: disk full", 0);
    let out = exec_plugin(Some(&node), &[("CNI_COMMAND", "STATUS")], &cfg.to_string());
    assert_eq!(out.error_code(), 50);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("store failed: disk full")
    );
    agent.state.lock().unwrap().status = status(false, false, "the agent is starting", 1);
    let out = exec_plugin(Some(&node), &[("CNI_COMMAND", "STATUS")], &cfg.to_string());
    assert_eq!(out.error_code(), 51);
}

#[test]
fn a_failure_half_way_is_undone() {
    let node = node();
    let pod = Netns::new("pod").unwrap();
    let agent = FakeAgent::start([10, 77, 7]);
    // The fake hands out 10.77.7.1 first; a route for it already on the node makes the host route
    // fail after the veth exists.
    node.exec("ip", &["route", "add", "10.77.7.1/32", "dev", "lo"])
        .unwrap();
    let links_before = ip(&node, &["-o", "link", "show"]).lines().count();
    let out = add(&node, &agent, "1.0.0", "ctr-undo", &pod);
    assert_eq!(out.error_code(), 102);
    assert!(out.json()["msg"].as_str().unwrap().contains("host route"));
    assert_eq!(
        ip(&node, &["-o", "link", "show"]).lines().count(),
        links_before
    );
    assert!(!ip(&pod, &["link", "show"]).contains("eth0"));
    assert_eq!(agent.allocation_count(), 0, "the address was released");
    assert_eq!(agent.releases().len(), 1);
}

#[test]
fn agent_refusals_map_to_cni_codes() {
    let node = node();
    let pod = Netns::new("pod").unwrap();
    let agent = FakeAgent::start([10, 77, 8]);
    for (code, expected) in [
        (vnet_api::ErrorCode::TryAgainLater, 11),
        (vnet_api::ErrorCode::NotReady, 11),
        (vnet_api::ErrorCode::Exhausted, 104),
        (vnet_api::ErrorCode::Internal, 100),
    ] {
        agent.state.lock().unwrap().refuse_allocate = Some(vnet_api::ErrorResponse {
            code,
            message: "pool is empty, cloud write pending".into(),
        });
        let out = add(&node, &agent, "1.0.0", "ctr-refused", &pod);
        assert_eq!(out.error_code(), expected, "{code:?}");
        assert!(
            out.json()["msg"]
                .as_str()
                .unwrap()
                .contains("pool is empty")
        );
        assert!(!ip(&pod, &["link", "show"]).contains("eth0"));
    }
}

#[test]
fn gc_of_one_network_leaves_another_networks_veths() {
    // Two vnet-cni networks on one node (e.g. through Multus) share the host veth name shape.
    let node = node();
    let agent = FakeAgent::start([10, 77, 9]);
    let blue = Netns::new("pod").unwrap();
    let red = Netns::new("pod").unwrap();
    add(&node, &agent, "1.1.0", "ctr-blue", &blue).assert_ok();
    let mut red_cfg = conf("1.1.0", agent.socket_str(), &agent.spool_dir());
    red_cfg["name"] = "red".into();
    exec_plugin(
        Some(&node),
        &cni_env("ADD", "ctr-red", &path_str(&red), "eth0"),
        &red_cfg.to_string(),
    )
    .assert_ok();
    // GC of the first network, which lists none of its attachments as valid.
    let mut cfg = conf("1.1.0", agent.socket_str(), &agent.spool_dir());
    cfg["cni.dev/valid-attachments"] = serde_json::json!([]);
    exec_plugin(Some(&node), &[("CNI_COMMAND", "GC")], &cfg.to_string()).assert_ok();
    let links = ip(&node, &["link", "show"]);
    assert!(
        !links.contains(&host_veth_name("vnet", &key("ctr-blue", "eth0"))),
        "its own stale veth is removed: {links}"
    );
    assert!(
        links.contains(&host_veth_name("vnet", &key("ctr-red", "eth0"))),
        "the other network's veth is left alone: {links}"
    );
    let gc = agent.state.lock().unwrap().gcs.pop().unwrap();
    assert_eq!(gc.network.as_deref(), Some("vnet-test"));
    assert!(gc.allocated_before.is_some());
}

#[test]
fn gc_never_deletes_a_link_that_holds_a_stale_name_but_is_not_ours() {
    let node = node();
    let agent = FakeAgent::start([10, 77, 10]);
    let pod = Netns::new("pod").unwrap();
    add(&node, &agent, "1.1.0", "ctr-gc-foreign", &pod).assert_ok();
    let name = host_veth_name("vnet", &key("ctr-gc-foreign", "eth0"));
    // Another attachment's veth with the same short name carries its own mark.
    ip(
        &node,
        &[
            "link",
            "set",
            "dev",
            &name,
            "alias",
            "vnet-cni someone-else/eth0",
        ],
    );
    let mut cfg = conf("1.1.0", agent.socket_str(), &agent.spool_dir());
    cfg["cni.dev/valid-attachments"] = serde_json::json!([]);
    exec_plugin(Some(&node), &[("CNI_COMMAND", "GC")], &cfg.to_string()).assert_ok();
    let links = ip(&node, &["link", "show"]);
    assert!(
        links.contains(&name),
        "the foreign link is left alone: {links}"
    );
    let gc = agent.state.lock().unwrap().gcs.pop().unwrap();
    assert!(
        !gc.valid_attachments
            .contains(&key("ctr-gc-foreign", "eth0")),
        "the stale allocation is still released"
    );
}
