terraform {
  required_version = ">= 1.5"

  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = "~> 4.0"
    }
  }
}

# azurerm 4.x needs the subscription: var.subscription_id, or ARM_SUBSCRIPTION_ID when it is null.
provider "azurerm" {
  features {}
  subscription_id = var.subscription_id
}
