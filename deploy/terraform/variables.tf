variable "name" {
  description = "Prefix of every resource name."
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
  description = "Node subnet. Pods take their addresses from it unless a pod subnet is set."
  type        = string
  default     = "10.240.0.0/20"
}

variable "pod_subnet_prefix" {
  description = "Optional separate pod subnet (set the agent's cloud.pod_subnet_id to its id); null for none."
  type        = string
  default     = "10.240.64.0/18"
  nullable    = true
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
