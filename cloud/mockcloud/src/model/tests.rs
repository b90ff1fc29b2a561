use super::*;

fn cloud(prefix: &str, vms: usize) -> Cloud {
    Cloud::new(Topology::single_subnet(prefix.parse().unwrap(), vms), None).unwrap()
}

fn body_adding(cloud: &Cloud, nic: &str, names: &[&str]) -> Value {
    let mut body = cloud.nic_json(nic).unwrap();
    let subnet_id = cloud.topology.subnet_id("nodes");
    let configs = body["properties"]["ipConfigurations"]
        .as_array_mut()
        .unwrap();
    for name in names {
        configs.push(json!({"name": name, "properties": {"privateIPAllocationMethod": "Dynamic", "subnet": {"id": subnet_id}}}));
    }
    body
}

fn finish_all(cloud: &mut Cloud, id: &str) -> OperationStatus {
    loop {
        let (status, _) = cloud.poll_operation(id).unwrap();
        if status != OperationStatus::InProgress {
            return status;
        }
    }
}

#[test]
fn dynamic_addresses_skip_reserved_and_used_ones() {
    let mut c = cloud("10.0.0.0/24", 2); // VMs at .4 and .5
    let body = body_adding(&c, "node-1-nic", &["a", "b"]);
    let op = c
        .put_nic(
            "node-1-nic",
            None,
            &body,
            None,
            Timing::new(0, 1),
            Instant::now(),
        )
        .unwrap();
    assert_eq!(finish_all(&mut c, &op), OperationStatus::Succeeded);
    let ips: Vec<String> = c
        .state_view()
        .addresses
        .iter()
        .map(|a| a.ip.to_string())
        .collect();
    assert_eq!(ips, vec!["10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7"]);
}

#[test]
fn full_subnet_is_subnet_is_full() {
    let mut c = cloud("10.0.0.0/29", 1); // assignable .4 .5 .6; VM holds .4
    let body = body_adding(&c, "node-1-nic", &["a", "b", "c"]);
    let err = c
        .put_nic(
            "node-1-nic",
            None,
            &body,
            None,
            Timing::new(0, 1),
            Instant::now(),
        )
        .unwrap_err();
    assert_eq!(err.code, "SubnetIsFull");
    assert_eq!(err.status, 400);
}

#[test]
fn stale_etag_is_412_and_busy_nic_is_429() {
    let mut c = cloud("10.0.0.0/24", 1);
    let body = body_adding(&c, "node-1-nic", &["a"]);
    let err = c
        .put_nic(
            "node-1-nic",
            Some("W/\"stale\""),
            &body,
            None,
            Timing::new(0, 1),
            Instant::now(),
        )
        .unwrap_err();
    assert_eq!((err.status, err.code.as_str()), (412, ETAG_MISMATCH_CODE));
    let etag = c.nic("node-1-nic").unwrap().etag();
    c.put_nic(
        "node-1-nic",
        Some(&etag),
        &body,
        None,
        Timing::new(1, 1),
        Instant::now(),
    )
    .unwrap();
    let err = c
        .put_nic(
            "node-1-nic",
            None,
            &body,
            None,
            Timing::new(0, 1),
            Instant::now(),
        )
        .unwrap_err();
    assert_eq!((err.status, err.code.as_str()), (429, BUSY_CODE));
    assert_eq!(err.retry_after, Some(1));
}

#[test]
fn failed_operation_rolls_back() {
    let mut c = cloud("10.0.0.0/24", 1);
    let body = body_adding(&c, "node-1-nic", &["a"]);
    let failure = Some(Failure {
        code: "InternalServerError".into(),
        message: "boom".into(),
        rollback: true,
    });
    let op = c
        .put_nic(
            "node-1-nic",
            None,
            &body,
            failure,
            Timing::new(0, 1),
            Instant::now(),
        )
        .unwrap();
    assert!(matches!(
        finish_all(&mut c, &op),
        OperationStatus::Failed { .. }
    ));
    assert_eq!(c.state_view().addresses.len(), 1);
}

#[test]
fn too_many_configs_is_the_nic_limit() {
    let mut c = cloud("10.0.0.0/16", 1);
    let names: Vec<String> = (0..256).map(|i| format!("x{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let body = body_adding(&c, "node-1-nic", &refs);
    let err = c
        .put_nic(
            "node-1-nic",
            None,
            &body,
            None,
            Timing::new(0, 1),
            Instant::now(),
        )
        .unwrap_err();
    assert_eq!(err.code, NIC_LIMIT_CODE);
}

#[test]
fn released_address_is_not_reused_until_the_operation_ends() {
    let mut c = cloud("10.0.0.0/29", 2); // assignable .4 .5 .6; VMs hold .4 .5
    let body = body_adding(&c, "node-1-nic", &["a"]);
    let op = c
        .put_nic(
            "node-1-nic",
            None,
            &body,
            None,
            Timing::new(0, 1),
            Instant::now(),
        )
        .unwrap();
    finish_all(&mut c, &op);
    // node-1 releases .6; while that runs node-2 cannot get it.
    let mut body = c.nic_json("node-1-nic").unwrap();
    body["properties"]["ipConfigurations"]
        .as_array_mut()
        .unwrap()
        .retain(|c| c["name"] != "a");
    let op = c
        .put_nic(
            "node-1-nic",
            None,
            &body,
            None,
            Timing::new(1, 1),
            Instant::now(),
        )
        .unwrap();
    let grab = body_adding(&c, "node-2-nic", &["b"]);
    assert_eq!(
        c.put_nic(
            "node-2-nic",
            None,
            &grab,
            None,
            Timing::new(0, 1),
            Instant::now()
        )
        .unwrap_err()
        .code,
        "SubnetIsFull"
    );
    finish_all(&mut c, &op);
    let op2 = c
        .put_nic(
            "node-2-nic",
            None,
            &grab,
            None,
            Timing::new(0, 1),
            Instant::now(),
        )
        .unwrap();
    assert_eq!(finish_all(&mut c, &op2), OperationStatus::Succeeded);
}

#[test]
fn failed_without_rollback_keeps_failed_entries_until_a_put_succeeds() {
    let mut c = cloud("10.0.0.0/24", 1);
    let body = body_adding(&c, "node-1-nic", &["a"]);
    let failure = Some(Failure {
        code: "InternalServerError".into(),
        message: "boom".into(),
        rollback: false,
    });
    let op = c
        .put_nic(
            "node-1-nic",
            None,
            &body,
            failure,
            Timing::new(0, 1),
            Instant::now(),
        )
        .unwrap();
    assert!(matches!(
        finish_all(&mut c, &op),
        OperationStatus::Failed { .. }
    ));
    let doc = c.nic_json("node-1-nic").unwrap();
    assert_eq!(doc["properties"]["provisioningState"], "Failed");
    assert_eq!(
        doc["properties"]["ipConfigurations"][1]["properties"]["provisioningState"],
        "Failed"
    );
    // The same document again: provisioned, Succeeded, same address.
    let ip = doc["properties"]["ipConfigurations"][1]["properties"]["privateIPAddress"].clone();
    let op = c
        .put_nic(
            "node-1-nic",
            None,
            &doc,
            None,
            Timing::new(0, 1),
            Instant::now(),
        )
        .unwrap();
    assert_eq!(finish_all(&mut c, &op), OperationStatus::Succeeded);
    let doc = c.nic_json("node-1-nic").unwrap();
    assert_eq!(doc["properties"]["provisioningState"], "Succeeded");
    let entry = &doc["properties"]["ipConfigurations"][1]["properties"];
    assert_eq!(entry["provisioningState"], "Succeeded");
    assert_eq!(entry["privateIPAddress"], ip);
}

#[test]
fn a_second_subnet_or_other_asgs_on_one_nic_are_refused() {
    let mut topo = Topology::single_subnet("10.0.0.0/16".parse().unwrap(), 1);
    topo.subnets[0].prefix = "10.0.0.0/24".parse().unwrap();
    topo.subnets.push(crate::topology::SubnetSpec {
        name: "pods".into(),
        prefix: "10.0.1.0/24".parse().unwrap(),
    });
    topo.vms[0].nic.application_security_groups = vec!["asg-nodes".into()];
    let mut c = Cloud::new(topo, None).unwrap();
    let mut body = c.nic_json("node-1-nic").unwrap();
    let pods = c.topology.subnet_id("pods");
    let asgs = body["properties"]["ipConfigurations"][0]["properties"]["applicationSecurityGroups"]
        .clone();
    body["properties"]["ipConfigurations"].as_array_mut().unwrap().push(
        json!({"name": "x", "properties": {"subnet": {"id": pods}, "applicationSecurityGroups": asgs}}),
    );
    let err = c
        .put_nic(
            "node-1-nic",
            None,
            &body,
            None,
            Timing::new(0, 1),
            Instant::now(),
        )
        .unwrap_err();
    assert_eq!(err.message, rules::DIFFERENT_SUBNETS_MESSAGE);
    let body = body_adding(&c, "node-1-nic", &["y"]);
    let err = c
        .put_nic(
            "node-1-nic",
            None,
            &body,
            None,
            Timing::new(0, 1),
            Instant::now(),
        )
        .unwrap_err();
    assert_eq!(err.code, rules::ASG_MISMATCH_CODE);
}
