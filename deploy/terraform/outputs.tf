output "resource_group" {
  description = "Resource group of the VNet and the cluster."
  value       = azurerm_resource_group.main.name
}

output "cluster_name" {
  description = "AKS cluster name."
  value       = azurerm_kubernetes_cluster.main.name
}

output "node_resource_group" {
  description = "Resource group of the node VMs and NICs."
  value       = azurerm_kubernetes_cluster.main.node_resource_group
}

output "get_credentials" {
  description = "Command that writes the cluster's kubeconfig."
  value       = "az aks get-credentials --resource-group ${azurerm_resource_group.main.name} --name ${azurerm_kubernetes_cluster.main.name}"
}

output "agent_identity_client_id" {
  description = "Put in agent.toml as cloud.client_id."
  value       = azurerm_user_assigned_identity.agent.client_id
}

output "node_subnet_id" {
  description = "Node subnet resource id."
  value       = azurerm_subnet.nodes.id
}

output "pod_subnet_id" {
  description = "Put in agent.toml as cloud.pod_subnet_id (empty when there is no pod subnet)."
  value       = one(azurerm_subnet.pods[*].id)
}

output "vnet_address_space" {
  description = "The VNet's address space (traffic to it is not masqueraded)."
  value       = azurerm_virtual_network.main.address_space
}
