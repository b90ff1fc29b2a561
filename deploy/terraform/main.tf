# An AKS cluster with bring-your-own CNI (network_plugin = "none") on its own VNet, ready for
# vnet-cni: a node subnet, an optional pod subnet, and a user-assigned identity for the agent that
# holds exactly the permissions docs/cloud.md lists: on the subnets, the node resource group, the
# VNet (its read only) and the subscription (operation polling only).
#
# The agent authenticates with managed_identity through IMDS on its node, so the identity is the
# node pool's kubelet identity: it is attached to every node VM. (Workload identity would need the
# webhook pod, which cannot run before the CNI.)

data "azurerm_subscription" "current" {}

resource "azurerm_resource_group" "main" {
  name     = "${var.name}-rg"
  location = var.location
  tags     = var.tags
}

resource "azurerm_virtual_network" "main" {
  name                = "${var.name}-vnet"
  location            = azurerm_resource_group.main.location
  resource_group_name = azurerm_resource_group.main.name
  address_space       = var.vnet_address_space
  tags                = var.tags
}

resource "azurerm_subnet" "nodes" {
  name                 = "nodes"
  resource_group_name  = azurerm_resource_group.main.name
  virtual_network_name = azurerm_virtual_network.main.name
  address_prefixes     = [var.node_subnet_prefix]
}

resource "azurerm_subnet" "pods" {
  count                = var.pod_subnet_prefix == null ? 0 : 1
  name                 = "pods"
  resource_group_name  = azurerm_resource_group.main.name
  virtual_network_name = azurerm_virtual_network.main.name
  address_prefixes     = [var.pod_subnet_prefix]
}

locals {
  subnet_ids = concat([azurerm_subnet.nodes.id], azurerm_subnet.pods[*].id)
  # The resource group AKS creates for the node VMs and NICs; referencing the cluster's attribute
  # orders the role after the cluster, so the group exists when it becomes an assignable scope.
  node_resource_group_name = "${var.name}-nodes-rg"
  node_resource_group_id   = azurerm_kubernetes_cluster.main.node_resource_group_id

  # Exactly the actions docs/cloud.md lists for the agent, split by the scope each one needs, so
  # no action is granted wider than that: NICs and VMs in the node resource group, join and read on
  # the cluster's subnets only, the VNet's own read (its address space), and the polling of
  # long-running operations, which live at the subscription level.
  agent_roles = {
    nodes = {
      actions = [
        "Microsoft.Compute/virtualMachines/read",
        "Microsoft.Network/networkInterfaces/read",
        "Microsoft.Network/networkInterfaces/write",
      ]
      scopes = [local.node_resource_group_id]
    }
    subnets = {
      actions = [
        "Microsoft.Network/virtualNetworks/subnets/read",
        "Microsoft.Network/virtualNetworks/subnets/join/action",
      ]
      scopes = local.subnet_ids
    }
    vnet = {
      actions = ["Microsoft.Network/virtualNetworks/read"]
      scopes  = [azurerm_virtual_network.main.id]
    }
    operations = {
      actions = ["Microsoft.Network/locations/operations/read"]
      scopes  = [data.azurerm_subscription.current.id]
    }
  }

  # One assignment per (role, scope); keys use indexes because ids are unknown until apply.
  agent_assignments = merge([
    for role, spec in local.agent_roles : {
      for index, scope in spec.scopes : "${role}-${index}" => { role = role, scope = scope }
    }
  ]...)
}

# The control plane's identity: manages the node pool and may assign the kubelet identity.
resource "azurerm_user_assigned_identity" "cluster" {
  name                = "${var.name}-cluster"
  location            = azurerm_resource_group.main.location
  resource_group_name = azurerm_resource_group.main.name
  tags                = var.tags
}

# The agent's identity (the kubelet identity of the nodes).
resource "azurerm_user_assigned_identity" "agent" {
  name                = "${var.name}-agent"
  location            = azurerm_resource_group.main.location
  resource_group_name = azurerm_resource_group.main.name
  tags                = var.tags
}

resource "azurerm_role_assignment" "cluster_assigns_kubelet_identity" {
  scope                = azurerm_user_assigned_identity.agent.id
  role_definition_name = "Managed Identity Operator"
  principal_id         = azurerm_user_assigned_identity.cluster.principal_id
}

# AKS places the node NICs in the node subnet.
resource "azurerm_role_assignment" "cluster_joins_node_subnet" {
  scope                = azurerm_subnet.nodes.id
  role_definition_name = "Network Contributor"
  principal_id         = azurerm_user_assigned_identity.cluster.principal_id
}

resource "azurerm_role_definition" "agent" {
  for_each    = local.agent_roles
  name        = "${var.name}-vnet-cni-agent-${each.key}"
  scope       = data.azurerm_subscription.current.id
  description = "vnet-cni agent (${each.key}): add and remove secondary IP configurations on its node's NIC."

  permissions {
    actions     = each.value.actions
    not_actions = []
  }

  assignable_scopes = each.value.scopes
}

resource "azurerm_role_assignment" "agent" {
  for_each           = local.agent_assignments
  scope              = each.value.scope
  role_definition_id = azurerm_role_definition.agent[each.value.role].role_definition_resource_id
  principal_id       = azurerm_user_assigned_identity.agent.principal_id
}

resource "azurerm_kubernetes_cluster" "main" {
  name                = "${var.name}-aks"
  location            = azurerm_resource_group.main.location
  resource_group_name = azurerm_resource_group.main.name
  node_resource_group = local.node_resource_group_name
  dns_prefix          = var.name
  kubernetes_version  = var.kubernetes_version
  tags                = var.tags

  default_node_pool {
    name           = "system"
    node_count     = var.node_count
    vm_size        = var.node_vm_size
    vnet_subnet_id = azurerm_subnet.nodes.id
    max_pods       = var.max_pods
  }

  identity {
    type         = "UserAssigned"
    identity_ids = [azurerm_user_assigned_identity.cluster.id]
  }

  kubelet_identity {
    client_id                 = azurerm_user_assigned_identity.agent.client_id
    object_id                 = azurerm_user_assigned_identity.agent.principal_id
    user_assigned_identity_id = azurerm_user_assigned_identity.agent.id
  }

  # Bring your own CNI: AKS installs none, vnet-cni's DaemonSet does.
  network_profile {
    network_plugin = "none"
    service_cidr   = var.service_cidr
    dns_service_ip = var.dns_service_ip
  }

  depends_on = [
    azurerm_role_assignment.cluster_assigns_kubelet_identity,
    azurerm_role_assignment.cluster_joins_node_subnet,
  ]
}
