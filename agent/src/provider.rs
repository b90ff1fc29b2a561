//! Builds the cloud provider the configuration names.
//!
//! `azure`: the Azure client with the configured credential, `https://` only. `mock`: the same
//! client against vnet-mockcloud endpoints (plain HTTP allowed), with the mock's static test
//! token when `credential = "test_token"` and no credential otherwise. `cluster`: no ARM client
//! at all; [`vnet_kube::ClusterProvider`] asks the cluster allocator through the node's
//! NodeIPPool, reading only IMDS itself (no credential).

use std::sync::Arc;

use vnet_cloud::CloudProvider;
use vnet_cloud::azure::{AzureConfig, AzureProvider, CredentialConfig};

use crate::config::{CloudConfig, CredentialKind, ProviderKind};

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("config key `cloud.credential`: {0}")]
    Credential(vnet_cloud::CloudError),
    #[error("cannot build the cloud client: {0}")]
    Client(vnet_cloud::CloudError),
    #[error(
        "cloud.provider = \"cluster\" needs the Kubernetes API (the cluster allocator answers through the node's NodeIPPool), but the agent runs standalone: run it in the cluster (KUBERNETES_SERVICE_HOST) or give --kubeconfig, or use provider = \"azure\""
    )]
    ClusterNeedsKubernetes,
}

pub fn azure_config(config: &CloudConfig) -> Result<AzureConfig, ProviderError> {
    let credential = match config.provider {
        ProviderKind::Mock if config.credential == CredentialKind::TestToken => {
            CredentialConfig::StaticToken {
                token: config.test_token.clone(),
            }
        }
        // IMDS only: it answers without a credential.
        ProviderKind::Mock | ProviderKind::Cluster => CredentialConfig::None,
        ProviderKind::Azure => {
            let kind = match config.credential {
                CredentialKind::ManagedIdentity => "managed_identity",
                CredentialKind::WorkloadIdentity => "workload_identity",
                CredentialKind::ClientSecret => "client_secret",
                CredentialKind::None => "none",
                CredentialKind::TestToken => "test_token",
            };
            CredentialConfig::from_settings(
                kind,
                &config.client_id,
                &config.tenant_id,
                &config.client_secret_file,
            )
            .map_err(ProviderError::Credential)?
        }
    };
    let azure = match config.provider {
        ProviderKind::Mock => {
            AzureConfig::mock(&config.arm_endpoint, &config.imds_endpoint, credential)
        }
        ProviderKind::Azure => {
            AzureConfig::new(&config.arm_endpoint, &config.imds_endpoint, credential)
        }
        // IMDS is plain http:// by design (169.254.169.254); no ARM endpoint is used.
        ProviderKind::Cluster => AzureConfig::mock("", &config.imds_endpoint, credential),
    };
    azure.validate().map_err(ProviderError::Client)?;
    Ok(azure)
}

/// The provider `config` names, standalone (no Kubernetes client: cluster mode is refused).
pub fn build(config: &CloudConfig) -> Result<Arc<dyn CloudProvider>, ProviderError> {
    build_with(config, None, Box::new(|_| Err("no node name".into())))
}

/// The provider `config` names. `kube` is the Kubernetes client (`None`: standalone), which
/// cluster mode needs; `node_name` names the node from its IMDS facts (the daemon's rule).
pub fn build_with(
    config: &CloudConfig,
    kube: Option<&kube::Client>,
    node_name: vnet_kube::NodeNamer,
) -> Result<Arc<dyn CloudProvider>, ProviderError> {
    let provider = AzureProvider::new(azure_config(config)?).map_err(ProviderError::Client)?;
    if config.provider != ProviderKind::Cluster {
        return Ok(Arc::new(provider));
    }
    let client = kube.ok_or(ProviderError::ClusterNeedsKubernetes)?;
    let settings = vnet_kube::ClusterSettings {
        answer_timeout: std::time::Duration::from_secs(config.cluster_answer_timeout_secs),
    };
    Ok(Arc::new(vnet_kube::ClusterProvider::new(
        client.clone(),
        vnet_kube::InstanceSource::Imds(provider),
        node_name,
        settings,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mock_ignores_the_credential_and_azure_uses_it() {
        let mut config = CloudConfig {
            provider: ProviderKind::Mock,
            arm_endpoint: "http://127.0.0.1:1/".into(),
            ..CloudConfig::default()
        };
        let c = azure_config(&config).unwrap();
        assert_eq!(c.credential, CredentialConfig::None);
        assert_eq!(c.arm_endpoint, "http://127.0.0.1:1");
        assert!(c.allow_plain_http);
        config.credential = CredentialKind::TestToken;
        config.test_token = "tok".into();
        assert_eq!(
            azure_config(&config).unwrap().credential,
            CredentialConfig::StaticToken {
                token: "tok".into()
            }
        );
        // The Azure provider sends its token over https only, and never the test token.
        config.provider = ProviderKind::Azure;
        assert!(azure_config(&config).is_err());
        config.credential = CredentialKind::ManagedIdentity;
        config.test_token.clear();
        assert!(
            azure_config(&config).is_err(),
            "http:// with provider azure"
        );
        config.arm_endpoint = String::new();
        config.client_id = "id".into();
        assert_eq!(
            azure_config(&config).unwrap().credential,
            CredentialConfig::ManagedIdentity {
                client_id: Some("id".into())
            }
        );
    }

    #[test]
    fn cluster_mode_has_no_credential_and_needs_kubernetes() {
        let config = CloudConfig {
            provider: ProviderKind::Cluster,
            client_id: "id".into(),
            ..CloudConfig::default()
        };
        assert_eq!(
            azure_config(&config).unwrap().credential,
            CredentialConfig::None
        );
        let Err(err) = build(&config) else {
            panic!("cluster mode without Kubernetes must fail");
        };
        assert!(matches!(err, ProviderError::ClusterNeedsKubernetes));
        assert!(err.to_string().contains("--kubeconfig"), "{err}");
    }
}
