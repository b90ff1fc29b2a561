//! Builds the cloud provider the configuration names.

use std::sync::Arc;

use vnet_cloud::CloudProvider;

use crate::config::{CloudConfig, ProviderKind};

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("cloud.provider = \"{0}\": {1}")]
    Unavailable(&'static str, String),
}

pub fn build(config: &CloudConfig) -> Result<Arc<dyn CloudProvider>, ProviderError> {
    let name = match config.provider {
        ProviderKind::Azure => "azure",
        ProviderKind::Mock => "mock",
    };
    // TODO(cloud): construct vnet_cloud::azure::AzureProvider once it lands.
    Err(ProviderError::Unavailable(
        name,
        "the Azure client (vnet_cloud::azure) is not available in this build yet".into(),
    ))
}
