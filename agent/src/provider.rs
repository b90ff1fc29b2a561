//! Builds the cloud provider the configuration names.
//!
//! `azure`: the Azure client with the configured credential. `mock`: the same client against
//! vnet-mockcloud endpoints, without any credential (the `credential` key is ignored).

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
}

pub fn azure_config(config: &CloudConfig) -> Result<AzureConfig, ProviderError> {
    let credential = match config.provider {
        ProviderKind::Mock => CredentialConfig::None,
        ProviderKind::Azure => {
            let kind = match config.credential {
                CredentialKind::ManagedIdentity => "managed_identity",
                CredentialKind::WorkloadIdentity => "workload_identity",
                CredentialKind::ClientSecret => "client_secret",
                CredentialKind::None => "none",
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
    Ok(AzureConfig::new(
        &config.arm_endpoint,
        &config.imds_endpoint,
        credential,
    ))
}

pub fn build(config: &CloudConfig) -> Result<Arc<dyn CloudProvider>, ProviderError> {
    let provider = AzureProvider::new(azure_config(config)?).map_err(ProviderError::Client)?;
    Ok(Arc::new(provider))
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
        config.provider = ProviderKind::Azure;
        config.client_id = "id".into();
        assert_eq!(
            azure_config(&config).unwrap().credential,
            CredentialConfig::ManagedIdentity {
                client_id: Some("id".into())
            }
        );
    }
}
