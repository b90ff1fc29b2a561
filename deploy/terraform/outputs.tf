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
  description = "The kubelet identity the agent signs in as: agent.toml's cloud.client_id (render.sh --client-id)."
  value       = azurerm_user_assigned_identity.agent.client_id
}

output "node_subnet_id" {
  description = "Node subnet resource id."
  value       = azurerm_subnet.nodes.id
}

output "image" {
  description = "The image reference to build, push and install: deploy/render.sh --image."
  value       = local.image

  precondition {
    condition     = var.create_registry || var.registry != ""
    error_message = "With create_registry = false, set registry to the registry the nodes pull the image from."
  }
}

output "registry_login" {
  description = "Command that logs docker in to the created registry (empty without one)."
  value       = var.create_registry ? "az acr login --name ${azurerm_container_registry.main[0].name}" : ""
}

output "install_command" {
  description = "Renders vnet-cni with this cluster's image and agent identity, and applies it (run from the repository root)."
  value       = "deploy/render.sh --image ${local.image} --client-id ${azurerm_user_assigned_identity.agent.client_id} | kubectl apply -f -"
}

output "vnet_address_space" {
  description = "The VNet's address space (traffic to it is not masqueraded)."
  value       = azurerm_virtual_network.main.address_space
}
