//! An in-process [`CloudProvider`] for unit tests of the agent: one NIC, a subnet to draw from, and
//! scripted failures. It is not a substitute for `vnet-mockcloud`, which covers the real HTTP path.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use ipnetwork::Ipv4Network;

use crate::{CloudError, CloudProvider, IP_CONFIG_PREFIX, NodeIdentity, SecondaryIp};

/// Maximum ipConfigurations on one NIC, as on Azure (the primary one included).
pub const NIC_IP_LIMIT: usize = 256;

pub struct FakeCloud {
    identity: NodeIdentity,
    state: Mutex<FakeState>,
    assign_calls: AtomicUsize,
    release_calls: AtomicUsize,
}

struct FakeState {
    secondary: Vec<SecondaryIp>,
    next_host: u32,
    serial: u64,
    /// Errors returned, in order, by the next calls to `assign_ips`/`release_ips`.
    scripted_failures: VecDeque<CloudError>,
}

impl FakeCloud {
    /// A node `10.240.0.4` in subnet `10.240.0.0/16`, handing out `10.240.0.10` upwards.
    pub fn new() -> Self {
        Self::with_subnet("10.240.0.0/16".parse().unwrap())
    }

    pub fn with_subnet(subnet: Ipv4Network) -> Self {
        let primary_ip = nth(subnet, 4);
        let subnet_id = "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/vnet/subnets/nodes".to_string();
        FakeCloud {
            identity: NodeIdentity {
                vm_name: "node-1".into(),
                vm_id: "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/node-1".into(),
                nic_id: "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/node-1-nic".into(),
                mac: "00:0d:3a:00:00:01".into(),
                primary_ip,
                subnet_id,
                subnet_prefix: subnet,
                vnet_address_space: vec![subnet],
                kind: crate::NodeKind::Vm,
                scale_set: String::new(),
                computer_name: "node-1".into(),
            },
            state: Mutex::new(FakeState {
                secondary: Vec::new(),
                next_host: 10,
                serial: 0,
                scripted_failures: VecDeque::new(),
            }),
            assign_calls: AtomicUsize::new(0),
            release_calls: AtomicUsize::new(0),
        }
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// The next write fails with `error` (queue several for several writes).
    pub fn fail_next(&self, error: CloudError) {
        self.state
            .lock()
            .unwrap()
            .scripted_failures
            .push_back(error);
    }

    /// Puts an address on the NIC behind the agent's back (as another writer would).
    pub fn add_external(&self, ip: Ipv4Addr) {
        let mut state = self.state.lock().unwrap();
        state.serial += 1;
        let name = format!("{IP_CONFIG_PREFIX}ext{}", state.serial);
        let subnet_id = self.identity.subnet_id.clone();
        state.secondary.push(SecondaryIp {
            name,
            ip,
            subnet_id,
            prefix_len: crate::SINGLE_ADDRESS,
        });
    }

    /// Puts a block on the NIC behind the agent's back.
    pub fn add_external_block(&self, base: Ipv4Addr, prefix_len: u8) {
        let mut state = self.state.lock().unwrap();
        state.serial += 1;
        let name = format!("{IP_CONFIG_PREFIX}ext{}", state.serial);
        let subnet_id = self.identity.subnet_id.clone();
        state.secondary.push(SecondaryIp {
            name,
            ip: base,
            subnet_id,
            prefix_len,
        });
    }

    /// The NIC's entries (addresses and blocks) as the cloud holds them.
    pub fn entries(&self) -> Vec<SecondaryIp> {
        self.state.lock().unwrap().secondary.clone()
    }

    /// Removes an address behind the agent's back.
    pub fn remove_external(&self, ip: Ipv4Addr) {
        self.state.lock().unwrap().secondary.retain(|s| s.ip != ip);
    }

    pub fn secondary_ips(&self) -> Vec<Ipv4Addr> {
        let state = self.state.lock().unwrap();
        state.secondary.iter().map(|s| s.ip).collect()
    }

    pub fn assign_calls(&self) -> usize {
        self.assign_calls.load(Ordering::SeqCst)
    }

    pub fn release_calls(&self) -> usize {
        self.release_calls.load(Ordering::SeqCst)
    }
}

impl Default for FakeCloud {
    fn default() -> Self {
        Self::new()
    }
}

fn nth(net: Ipv4Network, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

impl FakeCloud {
    /// `count` entries of `prefix_len` (32: single addresses), aligned, drawn from one counter
    /// (so addresses and blocks never overlap), each one ipConfiguration toward
    /// [`NIC_IP_LIMIT`]. All or nothing, like one NIC PUT.
    fn assign(
        &self,
        nic_id: &str,
        subnet_id: &str,
        count: usize,
        prefix_len: u8,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        self.assign_calls.fetch_add(1, Ordering::SeqCst);
        if nic_id != self.identity.nic_id {
            return Err(CloudError::NotFound(nic_id.to_owned()));
        }
        let mut state = self.state.lock().unwrap();
        if let Some(error) = state.scripted_failures.pop_front() {
            return Err(error);
        }
        if state.secondary.len() + 1 + count > NIC_IP_LIMIT {
            return Err(CloudError::NicLimitReached {
                message: format!("a NIC holds at most {NIC_IP_LIMIT} IP configurations"),
            });
        }
        let size = 1u32 << (32 - u32::from(prefix_len));
        let network = u32::from(self.identity.subnet_prefix.network());
        let broadcast = u32::from(self.identity.subnet_prefix.broadcast());
        let mut added = Vec::with_capacity(count);
        let mut next = state.next_host;
        let mut serial = state.serial;
        for _ in 0..count {
            let base = (network + next).div_ceil(size) * size;
            if base + size > broadcast {
                return Err(CloudError::SubnetFull {
                    subnet_id: subnet_id.to_owned(),
                    message: format!("no free /{prefix_len} for {count} entries"),
                });
            }
            next = base + size - network;
            serial += 1;
            added.push(SecondaryIp {
                name: format!("{IP_CONFIG_PREFIX}{serial}"),
                ip: Ipv4Addr::from(base),
                subnet_id: subnet_id.to_owned(),
                prefix_len,
            });
        }
        state.next_host = next;
        state.serial = serial;
        state.secondary.extend(added.iter().cloned());
        Ok(added)
    }
}

#[async_trait]
impl CloudProvider for FakeCloud {
    async fn discover(&self) -> Result<NodeIdentity, CloudError> {
        Ok(self.identity.clone())
    }

    async fn list_secondary_ips(&self, nic_id: &str) -> Result<Vec<SecondaryIp>, CloudError> {
        if nic_id != self.identity.nic_id {
            return Err(CloudError::NotFound(nic_id.to_owned()));
        }
        Ok(self.state.lock().unwrap().secondary.clone())
    }

    async fn assign_ips(
        &self,
        nic_id: &str,
        subnet_id: &str,
        count: usize,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        self.assign(nic_id, subnet_id, count, crate::SINGLE_ADDRESS)
    }

    async fn assign_blocks(
        &self,
        nic_id: &str,
        subnet_id: &str,
        count: usize,
        prefix_len: u8,
    ) -> Result<Vec<SecondaryIp>, CloudError> {
        self.assign(nic_id, subnet_id, count, prefix_len)
    }

    async fn release_ips(&self, nic_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
        self.release_calls.fetch_add(1, Ordering::SeqCst);
        if nic_id != self.identity.nic_id {
            return Err(CloudError::NotFound(nic_id.to_owned()));
        }
        let mut state = self.state.lock().unwrap();
        if let Some(error) = state.scripted_failures.pop_front() {
            return Err(error);
        }
        // As the Azure provider: a block goes only when all its addresses are named.
        state
            .secondary
            .retain(|s| !s.addresses().all(|a| ips.contains(&a)));
        Ok(())
    }
}
