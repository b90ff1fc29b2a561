//! Azure's rules as vnet-mockcloud enforces them, exercised through the real client over HTTP:
//! one subnet per NIC, one set of ASGs, linked authorization with the shipped custom role, full
//! round trip of the NIC document, Failed provisioning states, Azure's busy/etag/refusal
//! answers, and ARM throttling.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Lab, RecordingSleeper, principals, role, token_of};
use serde_json::{Value, json};
use vnet_cloud::azure::{AzureConfig, AzureProvider, CredentialConfig, Pacing};
use vnet_cloud::{CloudError, CloudProvider, IP_CONFIG_PREFIX};
use vnet_mockcloud::topology::{NicSpec, SubnetSpec};
use vnet_mockcloud::{Bucket, MockConfig, RateLimits, RoleDefinition, Topology};

/// A node NIC as clusters have them: NSG, ASG, LB backend pool, public IP, tags, DNS servers,
/// accelerated networking, and fields vnet-cni knows nothing about.
fn golden_nic() -> NicSpec {
    let mut spec = NicSpec {
        network_security_group: Some("nsg-nodes".into()),
        application_security_groups: vec!["asg-nodes".into(), "asg-web".into()],
        load_balancer_backend_address_pools: vec!["kubernetes/kubernetes".into()],
        public_ip_address: Some("pip-node-1".into()),
        dns_servers: vec!["10.240.0.10".into()],
        accelerated_networking: true,
        ip_forwarding: true,
        ..NicSpec::default()
    };
    spec.tags.insert("team".into(), json!("net"));
    spec.tags.insert("aks-managed-pool".into(), json!("nodes"));
    spec.properties
        .insert("auxiliaryMode".into(), json!("None"));
    spec.properties
        .insert("disableTcpStateTracking".into(), json!(false));
    spec.properties.insert(
        "dnsSettings".into(),
        json!({"dnsServers": ["10.240.0.10"], "appliedDnsServers": ["10.240.0.10"], "internalDomainNameSuffix": "x.internal.cloudapp.net"}),
    );
    spec.primary_ip_configuration_properties.insert(
        "loadBalancerInboundNatRules".into(),
        json!([{"id": "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/loadBalancers/kubernetes/inboundNatRules/ssh"}]),
    );
    spec
}

fn topology_with(nic: NicSpec) -> Topology {
    let mut t = Topology::single_subnet("10.240.0.0/24".parse().unwrap(), 1);
    t.vms[0].nic = nic;
    t
}

/// A mock with per-VM principals holding `role`.
async fn strict_lab(topology: Topology, role: &RoleDefinition) -> Lab {
    let mut config = MockConfig::new(topology.clone());
    config.principals = Some(principals(&topology, role));
    let lab = Lab::start_with(config).await;
    lab.set_faults(json!({"operation_retry_after_secs": 1}))
        .await;
    lab
}

async fn nic_doc(lab: &Lab, vm: &str) -> Value {
    lab.http
        .get(format!(
            "{}{}?api-version=2024-05-01",
            lab.mock.base_url(),
            lab.nic_id(vm)
        ))
        .bearer_auth(token_of(vm))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The document without what a write may change: etags, provisioning states, our entries.
fn comparable(doc: &Value) -> Value {
    fn strip(v: &Value) -> Value {
        match v {
            Value::Object(map) => Value::Object(
                map.iter()
                    .filter(|(k, _)| *k != "etag" && *k != "provisioningState")
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .filter(|i| {
                        !i["name"]
                            .as_str()
                            .is_some_and(|n| n.starts_with(IP_CONFIG_PREFIX))
                    })
                    .map(strip)
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    strip(doc)
}

fn without(role: &RoleDefinition, actions: &[&str]) -> RoleDefinition {
    let mut r = role.clone();
    r.actions.retain(|a| !actions.contains(&a.as_str()));
    assert_eq!(r.actions.len(), role.actions.len() - actions.len());
    r
}

#[tokio::test]
async fn pods_from_a_second_subnet_on_the_node_nic_are_refused_as_azure_does() {
    let mut topology = Topology::single_subnet("10.240.0.0/16".parse().unwrap(), 1);
    topology.subnets[0].prefix = "10.240.0.0/24".parse().unwrap();
    topology.subnets.push(SubnetSpec {
        name: "pods".into(),
        prefix: "10.240.1.0/24".parse().unwrap(),
    });
    let lab = Lab::start(topology).await;
    let (provider, _) = lab.provider("node-1");
    let pods = lab.subnet_id().replace("/nodes", "/pods");
    let err = provider
        .assign_ips(&lab.nic_id("node-1"), &pods, 2)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::Fatal(m) if m.contains("IPConfigurations on a Nic cannot belong to different subnets")),
        "{err:?}"
    );
    assert!(lab.secondary_on("node-1").await.is_empty());
    // The NIC's own subnet works.
    let ok = provider
        .assign_ips(&lab.nic_id("node-1"), &lab.subnet_id(), 2)
        .await
        .unwrap();
    assert_eq!(ok.len(), 2);
}

#[tokio::test]
async fn new_entries_carry_the_primarys_application_security_groups() {
    let lab = Lab::start(topology_with(NicSpec {
        application_security_groups: vec!["asg-nodes".into(), "asg-web".into()],
        ..NicSpec::default()
    }))
    .await;
    let (provider, _) = lab.provider("node-1");
    let nic = lab.nic_id("node-1");
    let added = provider
        .assign_ips(&nic, &lab.subnet_id(), 2)
        .await
        .unwrap();
    assert_eq!(added.len(), 2);
    let doc = nic_doc(&lab, "node-1").await;
    let configs = doc["properties"]["ipConfigurations"].as_array().unwrap();
    assert_eq!(configs.len(), 3);
    let primary_asgs = &configs[0]["properties"]["applicationSecurityGroups"];
    assert_eq!(primary_asgs.as_array().unwrap().len(), 2);
    for c in &configs[1..] {
        assert_eq!(&c["properties"]["applicationSecurityGroups"], primary_asgs);
    }
    // And a PUT that breaks the rule is refused with Azure's code.
    let mut bad = doc.clone();
    bad["properties"]["ipConfigurations"][1]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("applicationSecurityGroups");
    let answer: Value = lab
        .http
        .put(format!(
            "{}{nic}?api-version=2024-05-01",
            lab.mock.base_url()
        ))
        .json(&bad)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer["error"]["code"],
        "AllIpConfigurationsOnANicMustBelongToTheSameApplicationSecurityGroups"
    );
}

#[tokio::test]
async fn the_shipped_role_is_enough_for_a_nic_with_nsg_asg_pool_and_public_ip() {
    let lab = strict_lab(topology_with(golden_nic()), &role()).await;
    let (provider, _) = lab.provider("node-1");
    let identity = provider.discover().await.unwrap();
    let added = provider
        .assign_ips(&identity.nic_id, &identity.subnet_id, 3)
        .await
        .unwrap();
    let ips: Vec<_> = added.iter().map(|s| s.ip).collect();
    provider
        .release_ips(&identity.nic_id, &ips[..1])
        .await
        .unwrap();
    assert_eq!(
        provider
            .list_secondary_ips(&identity.nic_id)
            .await
            .unwrap()
            .len(),
        2
    );
    let counters = lab.counters().await;
    assert_eq!(counters.responses("nic_put", 403), 0);
    // Without a token, or with someone else's, ARM does not know the caller.
    let anonymous = AzureProvider::new(AzureConfig::mock(
        &lab.mock.base_url(),
        &lab.mock.imds_endpoint("node-1"),
        CredentialConfig::None,
    ))
    .unwrap();
    let err = anonymous
        .list_secondary_ips(&identity.nic_id)
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::Unauthorized { .. }), "{err:?}");
}

#[tokio::test]
async fn a_missing_join_permission_fails_as_linked_authorization_naming_every_action() {
    let role = without(
        &role(),
        &[
            "Microsoft.Network/networkSecurityGroups/join/action",
            "Microsoft.Network/applicationSecurityGroups/joinIpConfiguration/action",
            "Microsoft.Network/loadBalancers/backendAddressPools/join/action",
        ],
    );
    let lab = strict_lab(topology_with(golden_nic()), &role).await;
    let (provider, _) = lab.provider("node-1");
    let err = provider
        .assign_ips(&lab.nic_id("node-1"), &lab.subnet_id(), 1)
        .await
        .unwrap_err();
    let CloudError::Unauthorized { message } = &err else {
        panic!("{err:?}");
    };
    assert!(message.contains("LinkedAuthorizationFailed"), "{message}");
    for action in [
        "Microsoft.Network/networkSecurityGroups/join/action",
        "Microsoft.Network/applicationSecurityGroups/joinIpConfiguration/action",
        "Microsoft.Network/loadBalancers/backendAddressPools/join/action",
    ] {
        let listed = message.split(':').next().unwrap().contains(action);
        assert!(listed, "{action} not named up front in: {message}");
    }
    assert!(lab.secondary_on("node-1").await.is_empty());
}

#[tokio::test]
async fn a_missing_write_permission_fails_as_authorization_failed() {
    let role = without(&role(), &["Microsoft.Network/networkInterfaces/write"]);
    let lab = strict_lab(topology_with(golden_nic()), &role).await;
    let (provider, _) = lab.provider("node-1");
    let err = provider
        .assign_ips(&lab.nic_id("node-1"), &lab.subnet_id(), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::Unauthorized { message } if message.starts_with("missing permission Microsoft.Network/networkInterfaces/write:") && message.contains("AuthorizationFailed")),
        "{err:?}"
    );
}

#[tokio::test]
async fn our_writes_keep_every_field_of_the_nic() {
    let lab = strict_lab(topology_with(golden_nic()), &role()).await;
    let before = nic_doc(&lab, "node-1").await;
    assert!(before["properties"]["networkSecurityGroup"]["id"].is_string());
    let (provider, _) = lab.provider("node-1");
    let nic = lab.nic_id("node-1");
    let added = provider
        .assign_ips(&nic, &lab.subnet_id(), 3)
        .await
        .unwrap();
    provider.release_ips(&nic, &[added[0].ip]).await.unwrap();
    let after = nic_doc(&lab, "node-1").await;
    assert_eq!(comparable(&after), comparable(&before));
    assert_eq!(
        after["properties"]["ipConfigurations"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_ne!(after["etag"], before["etag"]);
}

#[tokio::test]
async fn an_operation_left_failed_is_written_again_and_only_succeeded_entries_are_handed_out() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    lab.set_faults(json!({
        "operation_retry_after_secs": 1,
        "async_failure": {"count": 1, "rollback": false, "code": "InternalServerError"}
    }))
    .await;
    let (provider, _) = lab.provider("node-1");
    let nic = lab.nic_id("node-1");
    let added = provider
        .assign_ips(&nic, &lab.subnet_id(), 2)
        .await
        .unwrap();
    assert_eq!(added.len(), 2);
    let state = lab.state().await;
    assert_eq!(state.nics[0].provisioning_state, "Succeeded");
    for a in &state.addresses {
        assert_eq!(a.provisioning_state, "Succeeded", "{a:?}");
    }
    let counters = lab.counters().await;
    assert_eq!(counters.injected("async_failure"), 1);
    assert_eq!(
        counters.calls("nic_put"),
        2,
        "the same intent written again"
    );
}

#[tokio::test]
async fn a_failed_nic_is_repaired_before_its_addresses_are_listed() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    lab.set_faults(json!({
        "operation_retry_after_secs": 1,
        "async_failure": {"count": 1, "rollback": false, "code": "ProvisioningFailed"}
    }))
    .await;
    let (provider, _) = lab.provider("node-1");
    let nic = lab.nic_id("node-1");
    let err = provider
        .assign_ips(&nic, &lab.subnet_id(), 2)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::Fatal(m) if m.contains("ProvisioningFailed")),
        "{err:?}"
    );
    let state = lab.state().await;
    assert_eq!(state.nics[0].provisioning_state, "Failed");
    assert!(
        state
            .addresses
            .iter()
            .any(|a| a.provisioning_state == "Failed")
    );
    // The listing is not taken from a Failed NIC: it is written again first.
    let listed = provider.list_secondary_ips(&nic).await.unwrap();
    assert_eq!(listed.len(), 2);
    let state = lab.state().await;
    assert_eq!(state.nics[0].provisioning_state, "Succeeded");
    assert!(
        state
            .addresses
            .iter()
            .all(|a| a.provisioning_state == "Succeeded")
    );
}

#[tokio::test]
async fn a_write_to_a_busy_nic_waits_the_retry_after_of_azures_429() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    lab.set_faults(json!({"operation_retry_after_secs": 3, "operation_polls": 3}))
        .await;
    let nic = lab.nic_id("node-1");
    // Someone else's write starts an operation and does not wait for it.
    let mut body = nic_doc(&lab, "node-1").await;
    body["properties"]["ipConfigurations"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "other", "properties": {"subnet": {"id": lab.subnet_id()}}}));
    let put = lab
        .http
        .put(format!(
            "{}{nic}?api-version=2024-05-01",
            lab.mock.base_url()
        ))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    assert_eq!(put.headers()["retry-after"], "3");
    let again = lab
        .http
        .put(format!(
            "{}{nic}?api-version=2024-05-01",
            lab.mock.base_url()
        ))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 429);
    assert_eq!(again.headers()["retry-after"], "3");
    let again: Value = again.json().await.unwrap();
    // NRP's shape (cloudfoundry/bosh-azure-cpi-release#179): generic code, reason in details.
    assert_eq!(again["error"]["code"], "RetryableError");
    assert_eq!(
        again["error"]["details"][0]["code"],
        "RetryableErrorDueToAnotherOperation"
    );
    assert!(
        again["error"]["details"][0]["message"]
            .as_str()
            .unwrap()
            .contains("The call can be retried in 3 seconds."),
        "{again}"
    );

    // Our client waits for an Updating NIC before writing, so it meets this answer only when
    // another writer slips in between: injected here, in the same shape. It waits the 3 s (and a
    // jitter), then succeeds, and the busy 429 is not counted as ARM throttling.
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    lab.set_faults(
        json!({"busy": {"count": 1, "retry_after_secs": 3}, "operation_retry_after_secs": 0}),
    )
    .await;
    let (provider, sleeper) = lab.provider("node-1");
    let assigned = provider
        .assign_ips(&lab.nic_id("node-1"), &lab.subnet_id(), 1)
        .await
        .unwrap();
    assert_eq!(assigned.len(), 1);
    let counters = lab.counters().await;
    assert_eq!(counters.responses("nic_put", 429), 1, "{counters:?}");
    // At least the 3 s, later by a jitter of at most half of it.
    assert!(
        sleeper
            .delays()
            .iter()
            .any(|d| *d >= Duration::from_secs(3) && *d <= Duration::from_millis(4_500)),
        "{:?}",
        sleeper.delays()
    );
    assert_eq!(provider.arm_budget().unwrap().throttled, 0);
}

#[tokio::test]
async fn operations_answer_retry_after_10_unless_pinned() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    let (provider, sleeper) = lab.provider("node-1");
    provider
        .assign_ips(&lab.nic_id("node-1"), &lab.subnet_id(), 1)
        .await
        .unwrap();
    assert!(
        sleeper.delays().contains(&Duration::from_secs(10)),
        "{:?}",
        sleeper.delays()
    );
}

#[tokio::test]
async fn operation_not_allowed_is_a_refusal_with_its_message() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    lab.set_faults(json!({
        "operation_retry_after_secs": 1,
        "server_error": {"count": 1, "status": 409, "code": "OperationNotAllowed",
                         "message": "Operation results in exceeding quota limits of Core.",
                         "operations": ["nic_put"]}
    }))
    .await;
    let (provider, _) = lab.provider("node-1");
    let err = provider
        .assign_ips(&lab.nic_id("node-1"), &lab.subnet_id(), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::Fatal(m) if m.contains("OperationNotAllowed") && m.contains("exceeding quota limits")),
        "{err:?}"
    );
    assert_eq!(
        lab.counters().await.calls("nic_put"),
        1,
        "not retried as busy"
    );
}

#[tokio::test]
async fn the_token_never_follows_an_operation_url_to_another_host() {
    let lab = Lab::with_subnet("10.240.0.0/24", 1).await;
    let port = lab.mock.addr().port();
    lab.set_faults(json!({
        "operation_retry_after_secs": 1,
        "operation_base_url": format!("http://127.0.0.2:{port}")
    }))
    .await;
    let (provider, _) = lab.provider("node-1");
    let err = provider
        .assign_ips(&lab.nic_id("node-1"), &lab.subnet_id(), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CloudError::Fatal(m) if m.contains("refusing to send the ARM token")),
        "{err:?}"
    );
    assert_eq!(lab.counters().await.calls("operation_get"), 0);
}

#[tokio::test]
async fn plain_http_and_the_test_token_are_for_the_mock_only() {
    let http = AzureConfig::new(
        "http://127.0.0.1:1",
        "http://127.0.0.1:1",
        CredentialConfig::ManagedIdentity { client_id: None },
    );
    let err = AzureProvider::new(http).err().expect("refused");
    assert!(
        matches!(&err, CloudError::Fatal(m) if m.contains("plain http://")),
        "{err:?}"
    );
    let token = AzureConfig::new(
        "https://management.azure.com",
        "http://127.0.0.1:1",
        CredentialConfig::StaticToken { token: "t".into() },
    );
    let err = AzureProvider::new(token).err().expect("refused");
    assert!(
        matches!(&err, CloudError::Fatal(m) if m.contains("mock")),
        "{err:?}"
    );
}

/// Makes the error a credential returns.
type TokenFailure = fn() -> azure_core::Error;

/// A credential whose token endpoint fails the first `failures` calls with `failure()`.
#[derive(Debug)]
struct FlakyCredential {
    failures: std::sync::atomic::AtomicU32,
    failure: TokenFailure,
    token: String,
}

#[async_trait::async_trait]
impl azure_core::credentials::TokenCredential for FlakyCredential {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        use std::sync::atomic::Ordering;
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err((self.failure)());
        }
        Ok(azure_core::credentials::AccessToken::new(
            self.token.clone(),
            azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
        ))
    }
}

fn token_endpoint_answer(status: u16) -> azure_core::Error {
    azure_core::Error::with_message(
        azure_core::error::ErrorKind::HttpResponse {
            status: azure_core::http::StatusCode::from(status),
            error_code: None,
            raw_response: None,
        },
        format!("The request failed: HTTP {status}"),
    )
}

/// How azure_identity reports a credential's failure: a `Credential` error wrapping the cause
/// (`authentication_error` in azure_identity 1.0).
fn wrapped_by_azure_identity(cause: azure_core::Error) -> azure_core::Error {
    let message = format!("ManagedIdentityCredential authentication failed. {cause}");
    azure_core::Error::with_error(azure_core::error::ErrorKind::Credential, cause, message)
}

async fn provider_with_token_failures(
    lab: &Lab,
    failures: u32,
    failure: TokenFailure,
) -> (AzureProvider, Arc<RecordingSleeper>) {
    let credential = Arc::new(FlakyCredential {
        failures: failures.into(),
        failure,
        token: token_of("node-1"),
    });
    let mut config = lab.config("node-1");
    config.credential = CredentialConfig::ManagedIdentity { client_id: None };
    let sleeper = Arc::new(RecordingSleeper::default());
    let provider = AzureProvider::with_parts(config, sleeper.clone(), Some(credential)).unwrap();
    (provider, sleeper)
}

#[tokio::test]
async fn an_unreachable_or_failing_token_endpoint_is_transient_and_retried() {
    let lab = strict_lab(topology_with(NicSpec::default()), &role()).await;
    let cases: [(&str, TokenFailure); 4] = [
        ("connection refused", || {
            azure_core::Error::with_message(
                azure_core::error::ErrorKind::Connection,
                "connection refused (token endpoint)",
            )
        }),
        ("HTTP 503", || token_endpoint_answer(503)),
        ("Credential(HTTP 503)", || {
            wrapped_by_azure_identity(token_endpoint_answer(503))
        }),
        ("Credential(HTTP 429)", || {
            wrapped_by_azure_identity(token_endpoint_answer(429))
        }),
    ];
    for (case, failure) in cases {
        let (provider, sleeper) = provider_with_token_failures(&lab, 2, failure).await;
        let listed = provider
            .list_secondary_ips(&lab.nic_id("node-1"))
            .await
            .unwrap_or_else(|e| panic!("{case}: {e:?}"));
        assert!(listed.is_empty(), "{case}");
        assert_eq!(sleeper.delays().len(), 2, "{case}: {:?}", sleeper.delays());
    }
}

/// A refusal from the token endpoint, or a credential that cannot even be built from what is on
/// disk (a missing federated token file), is `Unauthorized` at once: retrying changes nothing.
#[tokio::test]
async fn a_refused_or_misconfigured_credential_is_unauthorized_without_retries() {
    let lab = strict_lab(topology_with(NicSpec::default()), &role()).await;
    let cases: [(&str, TokenFailure); 3] = [
        ("HTTP 400", || token_endpoint_answer(400)),
        ("Credential(HTTP 401)", || {
            wrapped_by_azure_identity(token_endpoint_answer(401))
        }),
        ("missing token file", || {
            azure_core::Error::with_error(
                azure_core::error::ErrorKind::Credential,
                std::io::Error::from(std::io::ErrorKind::NotFound),
                "failed to read federated token from file /var/run/secrets/azure/tokens/azure-identity-token",
            )
        }),
    ];
    for (case, failure) in cases {
        let (provider, sleeper) = provider_with_token_failures(&lab, 1, failure).await;
        let err = provider
            .list_secondary_ips(&lab.nic_id("node-1"))
            .await
            .expect_err(case);
        assert!(
            matches!(&err, CloudError::Unauthorized { message } if message.contains("cannot get a token")),
            "{case}: {err:?}"
        );
        assert!(
            sleeper.delays().is_empty(),
            "{case}: {:?}",
            sleeper.delays()
        );
    }
}

async fn throttled_lab(writes: Bucket) -> Lab {
    let mut config = MockConfig::new(Topology::single_subnet("10.240.0.0/24".parse().unwrap(), 1));
    config.rate_limits = RateLimits {
        writes,
        ..RateLimits::default()
    };
    let lab = Lab::start_with(config).await;
    lab.set_faults(json!({"operation_retry_after_secs": 0, "operation_polls": 0}))
        .await;
    lab
}

#[tokio::test]
async fn every_arm_answer_reports_the_remaining_budget_and_an_empty_bucket_is_429() {
    let lab = throttled_lab(Bucket {
        size: 2,
        refill_per_sec: 0.5,
    })
    .await;
    let nic = lab.nic_id("node-1");
    let url = format!("{}{nic}?api-version=2024-05-01", lab.mock.base_url());
    let get = lab.http.get(&url).send().await.unwrap();
    assert_eq!(
        get.headers()["x-ms-ratelimit-remaining-subscription-reads"],
        "249"
    );
    let body: Value = get.json().await.unwrap();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let put = lab.http.put(&url).json(&body).send().await.unwrap();
        statuses.push((
            put.status().as_u16(),
            put.headers()["x-ms-ratelimit-remaining-subscription-writes"]
                .to_str()
                .unwrap()
                .to_string(),
            put.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string()),
        ));
    }
    assert_eq!(statuses[0].0, 200);
    assert_eq!(statuses[0].1, "1");
    assert_eq!(statuses[2].0, 429, "{statuses:?}");
    assert_eq!(statuses[2].1, "0");
    assert_eq!(statuses[2].2.as_deref(), Some("2"));
}

#[tokio::test]
async fn the_client_slows_down_before_arm_throttles_it() {
    let lab = throttled_lab(Bucket {
        size: 3,
        refill_per_sec: 4.0,
    })
    .await;
    let mut config = lab.config("node-1");
    // Paced at half the refill rate: every paced write finds at least one token back, however
    // slow or fast the machine (a slow one only refills more between writes).
    config.pacing = Pacing {
        writes_floor: 2,
        writes_per_sec: 2.0,
        ..Pacing::default()
    };
    let sleeper = Arc::new(RecordingSleeper::real());
    let provider = AzureProvider::with_sleeper(config, sleeper.clone()).unwrap();
    let nic = lab.nic_id("node-1");
    for _ in 0..6 {
        provider
            .assign_ips(&nic, &lab.subnet_id(), 1)
            .await
            .unwrap();
    }
    let counters = lab.counters().await;
    assert_eq!(counters.calls("nic_put"), 6);
    assert_eq!(counters.responses("nic_put", 429), 0, "{counters:?}");
    let budget = provider.arm_budget().unwrap();
    assert!(budget.remaining_writes.is_some() && budget.remaining_reads.is_some());
    assert_eq!(budget.throttled, 0);
    assert!(!sleeper.delays().is_empty(), "paced");
}
