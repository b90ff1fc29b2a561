//! vnet-mockcloud over HTTP: Azure-shaped answers to bad input, IMDS, persistence, the binary,
//! and the fabric routes (root).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use vnet_mockcloud::{MockConfig, MockServer, StateView, Topology};

const NIC: &str =
    "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces";
const SUBNET: &str = "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/vnet/subnets/nodes";
const API: &str = "api-version=2024-05-01";

async fn start(topology: Topology, state_file: Option<std::path::PathBuf>) -> MockServer {
    let mut config = MockConfig::new(topology);
    config.state_file = state_file;
    config.faults.operation_retry_after_secs = Some(0);
    MockServer::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn topology() -> Topology {
    Topology::single_subnet("10.240.0.0/24".parse().unwrap(), 2)
}

/// Checks the answer is `status` with an Azure error body carrying `code`.
async fn expect_error(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.expect("an error answer is JSON");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// Adds `names` to the VM's NIC with a raw PUT and polls the operation to its end.
async fn add_configs(http: &reqwest::Client, base: &str, vm: &str, names: &[&str]) -> String {
    let url = format!("{base}{NIC}/{vm}-nic?{API}");
    let mut nic: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    let etag = nic["etag"].as_str().unwrap().to_string();
    let configs = nic["properties"]["ipConfigurations"]
        .as_array_mut()
        .unwrap();
    for name in names {
        configs.push(json!({"name": name, "properties": {"subnet": {"id": SUBNET}}}));
    }
    // Another supported api-version than the GET's, to see the operation URL follow the PUT's.
    let put_url = format!("{base}{NIC}/{vm}-nic?api-version=2023-11-01");
    let response = http
        .put(&put_url)
        .header("If-Match", etag)
        .json(&nic)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let operation = response.headers()["azure-asyncoperation"]
        .to_str()
        .unwrap()
        .to_string();
    // ARM's operation URL carries the api-version of the request that started it.
    assert!(
        operation.ends_with("?api-version=2023-11-01"),
        "{operation}"
    );
    loop {
        let status: Value = http
            .get(&operation)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match status["status"].as_str().unwrap() {
            "InProgress" => continue,
            other => return other.to_string(),
        }
    }
}

async fn state(http: &reqwest::Client, base: &str) -> StateView {
    http.get(format!("{base}/admin/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn bad_input_gets_azure_shaped_errors() {
    let mock = start(topology(), None).await;
    let base = mock.base_url();
    let http = reqwest::Client::new();
    let nic = format!("{base}{NIC}/node-1-nic");

    expect_error(
        http.get(&nic).send().await.unwrap(),
        400,
        "MissingApiVersionParameter",
    )
    .await;
    expect_error(
        http.get(format!("{nic}?api-version=yesterday"))
            .send()
            .await
            .unwrap(),
        400,
        "InvalidApiVersionParameter",
    )
    .await;
    expect_error(
        http.get(format!("{base}{NIC}/nope?{API}"))
            .send()
            .await
            .unwrap(),
        404,
        "ResourceNotFound",
    )
    .await;
    let put = |body: &'static str| http.put(format!("{nic}?{API}")).body(body).send();
    expect_error(put("{not json").await.unwrap(), 400, "InvalidRequestFormat").await;
    expect_error(put("[]").await.unwrap(), 400, "InvalidRequestFormat").await;
    expect_error(
        put(r#"{"properties":{"ipConfigurations":[{"name":"x"}]}}"#)
            .await
            .unwrap(),
        400,
        "IpConfigDeleteNotSupported",
    )
    .await;
    expect_error(
        http.put(format!("{base}{NIC}/nope?{API}"))
            .body("{}")
            .send()
            .await
            .unwrap(),
        404,
        "ResourceNotFound",
    )
    .await;
    expect_error(
        http.get(format!("{base}/subscriptions/other/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/node-1-nic?{API}"))
            .send()
            .await
            .unwrap(),
        404,
        "SubscriptionNotFound",
    )
    .await;
    expect_error(
        http.delete(format!("{nic}?{API}")).send().await.unwrap(),
        405,
        "MethodNotAllowed",
    )
    .await;
    expect_error(
        http.get(format!("{base}/no/such/thing"))
            .send()
            .await
            .unwrap(),
        404,
        "NotFound",
    )
    .await;
    expect_error(
        http.put(format!("{base}/admin/faults"))
            .body(r#"{"throttle":{"probability":3}}"#)
            .send()
            .await
            .unwrap(),
        400,
        "InvalidRequestContent",
    )
    .await;
    // A stale etag is 412 with Azure's body.
    expect_error(
        http.put(format!("{nic}?{API}"))
            .header("If-Match", "W/\"stale\"")
            .body(r#"{"properties":{"ipConfigurations":[]}}"#)
            .send()
            .await
            .unwrap(),
        412,
        "PreconditionFailedEtagMismatch",
    )
    .await;

    // IMDS insists on the Metadata header, like Azure's.
    let imds = format!(
        "{}/metadata/instance?api-version=2021-02-01",
        mock.imds_endpoint("node-1")
    );
    let response = http.get(&imds).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("Required metadata header")
    );

    // Still serving, nothing changed.
    assert_eq!(state(&http, &base).await.addresses.len(), 2);
}

#[tokio::test]
async fn imds_answers_by_caller_address_and_gives_tokens() {
    // Loopback is a /8 on Linux: a client bound to 127.0.0.5 looks like the VM at that address.
    let topology = Topology::single_subnet("127.0.0.0/24".parse().unwrap(), 2); // .4 and .5
    let mock = start(topology, None).await;
    let client = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5)))
        .build()
        .unwrap();
    let doc: Value = client
        .get(format!(
            "{}/metadata/instance?api-version=2021-02-01",
            mock.base_url()
        ))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["compute"]["name"], "node-2");
    assert_eq!(
        doc["network"]["interface"][0]["ipv4"]["ipAddress"][0]["privateIpAddress"],
        "127.0.0.5"
    );
    assert_eq!(
        doc["network"]["interface"][0]["ipv4"]["subnet"][0]["prefix"],
        "24"
    );

    let token: Value = client
        .get(format!(
            "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/",
            mock.base_url()
        ))
        .header("Metadata", "true")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(token["token_type"], "Bearer");
    assert!(token["access_token"].as_str().unwrap().contains("node-2"));
}

#[tokio::test]
async fn state_file_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mock-state.json");
    let http = reqwest::Client::new();

    let mock = start(topology(), Some(path.clone())).await;
    assert_eq!(
        add_configs(
            &http,
            &mock.base_url(),
            "node-1",
            &["vnet-cni-a", "vnet-cni-b"]
        )
        .await,
        "Succeeded"
    );
    let before = state(&http, &mock.base_url()).await.addresses;
    mock.shutdown().await;

    let mock = start(topology(), Some(path.clone())).await;
    let after = state(&http, &mock.base_url()).await.addresses;
    assert_eq!(before, after);
    assert_eq!(after.len(), 4);
    // Written atomically: no temporary files left next to it.
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(files, vec![std::ffi::OsString::from("mock-state.json")]);
}

#[tokio::test]
async fn operation_fails_and_rolls_back_when_told_to() {
    let mock = start(topology(), None).await;
    let http = reqwest::Client::new();
    let base = mock.base_url();
    http.put(format!("{base}/admin/faults"))
        .body(r#"{"async_failure":{"count":1},"operation_retry_after_secs":0}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        add_configs(&http, &base, "node-1", &["vnet-cni-a"]).await,
        "Failed"
    );
    assert_eq!(state(&http, &base).await.addresses.len(), 2);
    assert_eq!(
        add_configs(&http, &base, "node-1", &["vnet-cni-a"]).await,
        "Succeeded"
    );
    assert_eq!(state(&http, &base).await.addresses.len(), 3);
    let counters: Value = http
        .get(format!("{base}/admin/counters"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counters["injected"]["async_failure"], 1);
    assert_eq!(counters["calls"]["nic_put"], 2);
}

#[tokio::test]
async fn the_binary_serves_the_contract_cli() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let topology_file = dir.path().join("topology.json");
    std::fs::write(&topology_file, serde_json::to_string(&topology()).unwrap()).unwrap();
    let principals = dir.path().join("principals.json");
    std::fs::write(
        &principals,
        r#"[{"token":"tok","name":"agent","role":{"Actions":["Microsoft.Network/networkInterfaces/read"]}}]"#,
    )
    .unwrap();
    // A bad --rate-limits is refused at start.
    let bad = Command::new(env!("CARGO_BIN_EXE_vnet-mockcloud"))
        .args(["--listen", "127.0.0.1:0", "--topology"])
        .arg(&topology_file)
        .args([
            "--rate-limits",
            r#"{"reads":{"size":0,"refill_per_sec":1}}"#,
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--rate-limits"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_vnet-mockcloud"))
        .args(["--listen", "127.0.0.1:0", "--topology"])
        .arg(&topology_file)
        .args([
            "--faults",
            r#"{"throttle":{"count":1,"retry_after_secs":9}}"#,
            "--rate-limits",
            r#"{"reads":{"size":5,"refill_per_sec":0.01},"writes":{"size":5,"refill_per_sec":0.01}}"#,
            "--principals",
        ])
        .arg(&principals)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let child = Kill(child);
    // The first stdout line names the address; read it on a thread so a hang cannot block us.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the mock prints its address");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening on ADDR")
        .to_string();

    let http = reqwest::Client::new();
    let response = http
        .get(format!("http://{addr}{NIC}/node-2-nic?{API}"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "9");
    let response = http
        .get(format!("http://{addr}{NIC}/node-2-nic?{API}"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // --rate-limits: five reads in this principal's bucket, two taken.
    assert_eq!(
        response.headers()["x-ms-ratelimit-remaining-subscription-reads"],
        "3"
    );
    // --principals: no token is 401; an action outside the role is 403 naming it.
    let response = http
        .get(format!("http://{addr}{NIC}/node-2-nic?{API}"))
        .send()
        .await
        .unwrap();
    expect_error(response, 401, "AuthenticationFailed").await;
    let response = http
        .get(format!(
            "http://{addr}/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/node-2?{API}"
        ))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    expect_error(response, 403, "AuthorizationFailed").await;
    drop(child);
}

/// The fabric: with --fabric-routes the mock routes each assigned address to its VM in its own
/// namespace before the operation reports Succeeded, and removes the route on release.
#[test]
fn fabric_routes_follow_assignments() {
    let ns = vnet_testns::Netns::new("mockfabric").expect("namespace");
    // The VMs' primary addresses must be reachable for `ip route ... via` to be accepted.
    ns.exec(
        "ip",
        &[
            "link", "add", "fabric0", "type", "veth", "peer", "name", "fabric1",
        ],
    )
    .unwrap();
    ns.exec("ip", &["addr", "add", "10.240.0.1/24", "dev", "fabric0"])
        .unwrap();
    ns.exec("ip", &["link", "set", "fabric0", "up"]).unwrap();
    ns.exec("ip", &["link", "set", "fabric1", "up"]).unwrap();
    let ns_path = ns.path();

    // A dedicated thread enters the namespace and runs the mock and its client there; the `ip`
    // commands the mock spawns from that thread inherit the namespace.
    let routes = std::thread::spawn(move || {
        let file = std::fs::File::open(&ns_path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut config = MockConfig::new(topology());
            config.fabric_routes = true;
            config.faults.operation_retry_after_secs = Some(0);
            let mock = MockServer::start(config, "127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let http = reqwest::Client::new();
            let base = mock.base_url();
            assert_eq!(
                add_configs(&http, &base, "node-2", &["vnet-cni-a"]).await,
                "Succeeded"
            );
            let assigned = state(&http, &base)
                .await
                .addresses
                .into_iter()
                .find(|a| !a.primary)
                .unwrap()
                .ip;
            let with = show_routes();
            // Release it again.
            let url = format!("{base}{NIC}/node-2-nic?{API}");
            let mut nic: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
            nic["properties"]["ipConfigurations"]
                .as_array_mut()
                .unwrap()
                .retain(|c| c["name"] != "vnet-cni-a");
            let response = http.put(&url).json(&nic).send().await.unwrap();
            let operation = response.headers()["azure-asyncoperation"]
                .to_str()
                .unwrap()
                .to_string();
            while http
                .get(&operation)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()["status"]
                == "InProgress"
            {}
            (assigned, with, show_routes())
        })
    })
    .join()
    .unwrap();
    let (assigned, with, without) = routes;
    assert!(
        with.contains(&format!("{assigned} via 10.240.0.5")),
        "routes: {with}"
    );
    assert!(
        !without.contains(&assigned.to_string()),
        "routes after release: {without}"
    );
}

fn show_routes() -> String {
    let output = std::process::Command::new("timeout")
        .args(["10", "ip", "-4", "route", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}
