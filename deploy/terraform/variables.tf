variable "subscription_id" {
  description = "Azure subscription to create everything in. azurerm 4.x requires it: set it here or in ARM_SUBSCRIPTION_ID (null reads the environment)."
  type        = string
  default     = null
}

variable "name" {
  description = "Prefix of every resource name, the custom roles' too (role names may need to be unique in the tenant, unverified: use one prefix per cluster)."
  type        = string
  default     = "vnetcni"
}

variable "location" {
  description = "Azure region."
  type        = string
  default     = "westeurope"
}

variable "kubernetes_version" {
  description = "AKS Kubernetes version; null picks the region's default."
  type        = string
  default     = null
}

variable "node_count" {
  description = "Nodes in the default node pool."
  type        = number
  default     = 2
}

variable "node_vm_size" {
  description = "VM size of the nodes. Its NIC's IP configuration limit caps pods per node."
  type        = string
  default     = "Standard_D4s_v5"
}

variable "max_pods" {
  description = "Pods per node the kubelet admits; keep it at or below the agent's pool.max."
  type        = number
  default     = 110
}

variable "vnet_address_space" {
  description = "Address space of the VNet."
  type        = list(string)
  default     = ["10.240.0.0/16"]
}

variable "node_subnet_prefix" {
  description = "Node subnet. Pods take their addresses from it too (one subnet per NIC on Azure): size it for nodes x (pool.max + 1)."
  type        = string
  default     = "10.240.0.0/18"
}

variable "service_cidr" {
  description = "Kubernetes service range; must not overlap the VNet."
  type        = string
  default     = "10.0.0.0/16"
}

variable "dns_service_ip" {
  description = "Cluster DNS address, inside service_cidr."
  type        = string
  default     = "10.0.0.10"
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default     = { project = "vnet-cni" }
}

variable "create_registry" {
  description = "Create an Azure Container Registry for the vnet-cni image and let the nodes pull from it (AcrPull for the kubelet identity). false: set registry."
  type        = bool
  default     = true
}

variable "registry" {
  description = "With create_registry = false: the registry host (and path) the image is pulled from, e.g. myacr.azurecr.io; the nodes must be allowed to pull from it."
  type        = string
  default     = ""

  validation {
    condition     = var.registry == "" || can(regex("^[a-z0-9][a-z0-9.:-]*[a-z0-9](/[a-z0-9._-]+)*$", var.registry))
    error_message = "registry must be a registry host with an optional path, e.g. myacr.azurecr.io or ghcr.io/org."
  }
}

variable "image_tag" {
  description = "Tag of the vnet-cni image you push (render.sh feeds <registry>/vnet-cni:<image_tag> into deploy/kustomization.yaml)."
  type        = string
  default     = "0.1.0"
}
