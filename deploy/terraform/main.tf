# An AKS cluster with bring-your-own CNI (network_plugin = "none") on its own VNet, ready for
# vnet-cni: a node subnet (pods take their addresses from it: Azure keeps every ipConfiguration of a
# NIC in one subnet), a registry for the image, and the agent's identity with exactly the role in
# deploy/azure/vnet-cni-role.json.
#
# The agent's identity is the nodes' kubelet identity, a user-assigned identity made here: the agent
# runs on the host network before any pod has one and signs in through IMDS on its node, and the
# kubelet identity is the one AKS attaches to every node of every pool (new pools and scale-outs
# included). Workload identity would need its webhook pod and the sign-in host before the CNI
# works; a second identity on the AKS-managed scale sets is not kept there by AKS.

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

locals {
  # The agent's custom role, kept in one file for Terraform, the docs and the mock's tests.
  role_file = jsondecode(file("${path.module}/../azure/vnet-cni-role.json"))

  # Polling long-running operations (Network's for NIC writes, Compute's for scale-set instance
  # updates: /subscriptions/{id}/providers/Microsoft.{Network,Compute}/locations/{region}/operations/{id})
  # are the only actions at subscription level: they get a role of their own, assignable and
  # assigned there, so nothing else is granted that wide.
  operations_actions = [for action in local.role_file.Actions : action if endswith(action, "/locations/operations/read")]
  agent_actions      = [for action in local.role_file.Actions : action if !endswith(action, "/locations/operations/read")]

  # The resource group AKS creates for the node scale sets and NICs (and their NSG and load
  # balancer); referencing the cluster's attribute orders the role after the cluster, so the group
  # exists when it becomes an assignable scope.
  node_resource_group_name = "${var.name}-nodes-rg"
  node_resource_group_id   = azurerm_kubernetes_cluster.main.node_resource_group_id

  # Custom roles are assignable only at management group, subscription or resource group scope:
  # the groups of the nodes and of the VNet (the same group is listed once).
  agent_assignable_scopes = distinct([local.node_resource_group_id, azurerm_resource_group.main.id])

  # Assigned narrowly: the node resource group (NICs, scale-set instances, VMs and what the NICs
  # reference) and the VNet itself (its read, its subnets' read and join), not the VNet's group.
  agent_assignment_scopes = {
    nodes = local.node_resource_group_id
    vnet  = azurerm_virtual_network.main.id
  }

  image = "${var.create_registry ? azurerm_container_registry.main[0].login_server : var.registry}/vnet-cni:${var.image_tag}"
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
  name        = "${var.name}-vnet-cni-agent"
  scope       = azurerm_resource_group.main.id
  description = local.role_file.Description

  permissions {
    actions     = local.agent_actions
    not_actions = []
  }

  assignable_scopes = local.agent_assignable_scopes
}

resource "azurerm_role_assignment" "agent" {
  for_each           = local.agent_assignment_scopes
  scope              = each.value
  role_definition_id = azurerm_role_definition.agent.role_definition_resource_id
  principal_id       = azurerm_user_assigned_identity.agent.principal_id
}

resource "azurerm_role_definition" "agent_operations" {
  name        = "${var.name}-vnet-cni-agent-operations"
  scope       = data.azurerm_subscription.current.id
  description = "vnet-cni agent: poll the status of its own long-running NIC and scale-set writes."

  permissions {
    actions     = local.operations_actions
    not_actions = []
  }

  assignable_scopes = [data.azurerm_subscription.current.id]
}

resource "azurerm_role_assignment" "agent_operations" {
  scope              = data.azurerm_subscription.current.id
  role_definition_id = azurerm_role_definition.agent_operations.role_definition_resource_id
  principal_id       = azurerm_user_assigned_identity.agent.principal_id
}

# The image's registry (unless var.registry names an existing one): the kubelet identity pulls
# from it, so no pull secret is needed.
resource "azurerm_container_registry" "main" {
  count               = var.create_registry ? 1 : 0
  name                = replace("${var.name}vnetcni", "-", "")
  location            = azurerm_resource_group.main.location
  resource_group_name = azurerm_resource_group.main.name
  sku                 = "Basic"
  admin_enabled       = false
  tags                = var.tags
}

resource "azurerm_role_assignment" "kubelet_pulls_image" {
  count                = var.create_registry ? 1 : 0
  scope                = azurerm_container_registry.main[0].id
  role_definition_name = "AcrPull"
  principal_id         = azurerm_user_assigned_identity.agent.principal_id
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
