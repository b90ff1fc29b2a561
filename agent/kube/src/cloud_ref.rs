//! Conversions between the cloud types and their form in the `NodeIPPool` resource (strings for
//! addresses and prefixes, so the CRD schema stays plain).

use std::time::Duration;

use vnet_cloud::{CloudError, InstanceMetadata, NodeIdentity, NodeKind, SecondaryIp};

use crate::crd::{CloudErrorRef, IdentityRef, InstanceRef, SecondaryIpRef};

/// A field of the resource that does not parse: the writer is not a vnet-cni component of this
/// version, or someone edited the status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NodeIPPool status.{field}: {value:?} is not {expected}")]
pub struct BadField {
    pub field: &'static str,
    pub value: String,
    pub expected: &'static str,
}

fn parse<T: std::str::FromStr>(
    field: &'static str,
    value: &str,
    expected: &'static str,
) -> Result<T, BadField> {
    value.parse().map_err(|_| BadField {
        field,
        value: value.to_string(),
        expected,
    })
}

impl From<&InstanceMetadata> for InstanceRef {
    fn from(m: &InstanceMetadata) -> Self {
        InstanceRef {
            vm_id: m.vm_id.clone(),
            vm_name: m.vm_name.clone(),
            computer_name: m.computer_name.clone(),
            scale_set: m.scale_set.clone(),
            mac: m.mac.clone(),
            az_environment: m.az_environment.clone(),
        }
    }
}

impl From<&InstanceRef> for InstanceMetadata {
    fn from(r: &InstanceRef) -> Self {
        InstanceMetadata {
            vm_id: r.vm_id.clone(),
            vm_name: r.vm_name.clone(),
            computer_name: r.computer_name.clone(),
            scale_set: r.scale_set.clone(),
            mac: r.mac.clone(),
            az_environment: r.az_environment.clone(),
        }
    }
}

impl From<&NodeIdentity> for IdentityRef {
    fn from(i: &NodeIdentity) -> Self {
        IdentityRef {
            vm_name: i.vm_name.clone(),
            vm_id: i.vm_id.clone(),
            nic_id: i.nic_id.clone(),
            mac: i.mac.clone(),
            primary_ip: i.primary_ip.to_string(),
            subnet_id: i.subnet_id.clone(),
            subnet_prefix: i.subnet_prefix.to_string(),
            vnet_address_space: i.vnet_address_space.iter().map(|p| p.to_string()).collect(),
            kind: i.kind.as_str().to_string(),
            scale_set: i.scale_set.clone(),
            computer_name: i.computer_name.clone(),
        }
    }
}

impl TryFrom<&IdentityRef> for NodeIdentity {
    type Error = BadField;

    fn try_from(r: &IdentityRef) -> Result<Self, BadField> {
        let kind = match r.kind.as_str() {
            "vm" => NodeKind::Vm,
            "uniform" => NodeKind::Uniform,
            "flexible" => NodeKind::Flexible,
            other => {
                return Err(BadField {
                    field: "cloud.identity.kind",
                    value: other.to_string(),
                    expected: "vm, uniform or flexible",
                });
            }
        };
        Ok(NodeIdentity {
            vm_name: r.vm_name.clone(),
            vm_id: r.vm_id.clone(),
            nic_id: r.nic_id.clone(),
            mac: r.mac.clone(),
            primary_ip: parse("cloud.identity.primaryIp", &r.primary_ip, "an IPv4 address")?,
            subnet_id: r.subnet_id.clone(),
            subnet_prefix: parse(
                "cloud.identity.subnetPrefix",
                &r.subnet_prefix,
                "an IPv4 prefix",
            )?,
            vnet_address_space: r
                .vnet_address_space
                .iter()
                .map(|p| parse("cloud.identity.vnetAddressSpace", p, "an IPv4 prefix"))
                .collect::<Result<_, _>>()?,
            kind,
            scale_set: r.scale_set.clone(),
            computer_name: r.computer_name.clone(),
        })
    }
}

impl From<&SecondaryIp> for SecondaryIpRef {
    fn from(s: &SecondaryIp) -> Self {
        SecondaryIpRef {
            name: s.name.clone(),
            ip: s.ip.to_string(),
            prefix_length: s.prefix_len,
        }
    }
}

impl SecondaryIpRef {
    /// The entry, on the subnet the allocator reported for the node.
    pub fn to_secondary_ip(&self, subnet_id: &str) -> Result<SecondaryIp, BadField> {
        if self.prefix_length == 0 || self.prefix_length > 32 {
            return Err(BadField {
                field: "cloud.secondaryIps.prefixLength",
                value: self.prefix_length.to_string(),
                expected: "a prefix length from 1 to 32",
            });
        }
        Ok(SecondaryIp {
            name: self.name.clone(),
            ip: parse("cloud.secondaryIps.ip", &self.ip, "an IPv4 address")?,
            subnet_id: subnet_id.to_string(),
            prefix_len: self.prefix_length,
        })
    }
}

impl From<&CloudError> for CloudErrorRef {
    fn from(e: &CloudError) -> Self {
        let message = match e {
            CloudError::SubnetFull { message, .. }
            | CloudError::NicLimitReached { message }
            | CloudError::Unauthorized { message } => message.clone(),
            CloudError::NotFound(m) | CloudError::Transient(m) | CloudError::Fatal(m) => m.clone(),
            CloudError::Throttled { .. } => "throttled by the cloud API".to_string(),
            CloudError::Busy { code, .. } => code.clone(),
        };
        CloudErrorRef {
            code: e.code().to_string(),
            message,
            retry_after_seconds: e.retry_after().map(|d| d.as_secs()),
        }
    }
}

impl CloudErrorRef {
    /// The error as the agent's own call would have returned it (`subnet_id` names the node's
    /// subnet for `subnet_full`). An unknown code is transient: retried, never taken as final.
    pub fn to_cloud_error(&self, subnet_id: &str) -> CloudError {
        let retry_after = Duration::from_secs(self.retry_after_seconds.unwrap_or(1));
        let message = self.message.clone();
        match self.code.as_str() {
            "throttled" => CloudError::Throttled { retry_after },
            "busy" => CloudError::Busy {
                code: message,
                retry_after,
            },
            "subnet_full" => CloudError::SubnetFull {
                subnet_id: subnet_id.to_string(),
                message,
            },
            "nic_limit" => CloudError::NicLimitReached { message },
            "not_found" => CloudError::NotFound(message),
            "unauthorized" => CloudError::Unauthorized { message },
            "fatal" => CloudError::Fatal(message),
            "transient" => CloudError::Transient(message),
            other => CloudError::Transient(format!("allocator error {other}: {message}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> NodeIdentity {
        NodeIdentity {
            vm_name: "vm-1".into(),
            vm_id: "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/vm-1"
                .into(),
            nic_id: "/subscriptions/s/resourceGroups/g/providers/Microsoft.Network/networkInterfaces/nic-1"
                .into(),
            mac: "00:0d:3a:32:85:70".into(),
            primary_ip: "10.0.0.4".parse().unwrap(),
            subnet_id: "/subscriptions/s/.../subnets/pods".into(),
            subnet_prefix: "10.0.0.0/16".parse().unwrap(),
            vnet_address_space: vec!["10.0.0.0/8".parse().unwrap()],
            kind: NodeKind::Flexible,
            scale_set: "ss".into(),
            computer_name: "node-1".into(),
        }
    }

    #[test]
    fn an_identity_and_an_entry_survive_the_resource_form() {
        let id = identity();
        assert_eq!(NodeIdentity::try_from(&IdentityRef::from(&id)).unwrap(), id);
        let block = SecondaryIp {
            name: "vnet-cni-a".into(),
            ip: "10.0.0.16".parse().unwrap(),
            subnet_id: id.subnet_id.clone(),
            prefix_len: 28,
        };
        let back = SecondaryIpRef::from(&block)
            .to_secondary_ip(&id.subnet_id)
            .unwrap();
        assert_eq!(back, block);
    }

    #[test]
    fn a_bad_field_is_named_and_an_unknown_error_code_is_retryable() {
        let mut r = IdentityRef::from(&identity());
        r.subnet_prefix = "10.0.0.0/33".into();
        let err = NodeIdentity::try_from(&r).unwrap_err();
        assert_eq!(err.field, "cloud.identity.subnetPrefix");
        r = IdentityRef::from(&identity());
        r.kind = "bare-metal".into();
        assert!(NodeIdentity::try_from(&r).is_err());
        let unknown = CloudErrorRef {
            code: "new_in_v2".into(),
            message: "m".into(),
            retry_after_seconds: None,
        };
        assert!(unknown.to_cloud_error("/s").is_retryable());
    }

    #[test]
    fn errors_map_back_to_the_variant_the_agent_acts_on() {
        let cases = [
            CloudError::Throttled {
                retry_after: Duration::from_secs(7),
            },
            CloudError::SubnetFull {
                subnet_id: "/s".into(),
                message: "full".into(),
            },
            CloudError::NicLimitReached {
                message: "256".into(),
            },
            CloudError::Unauthorized {
                message: "403".into(),
            },
            CloudError::Fatal("bad".into()),
            CloudError::Transient("later".into()),
        ];
        for e in cases {
            assert_eq!(CloudErrorRef::from(&e).to_cloud_error("/s"), e);
        }
    }
}
