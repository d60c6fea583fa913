# A test environment across two clouds. Inputs come from skyferry, which owns keys and addresses:
#
#   skyferry inventory tfvars --plan tfaws --count 2 > aws.auto.tfvars.json   (then rename keys, see README)
#   terraform init && terraform apply
#   terraform output -json > terraform-output.json
#   skyferry inventory import --terraform .

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
    google = {
      source  = "hashicorp/google"
      version = ">= 5.0"
    }
  }
}

variable "aws" {
  description = "The AWS half: plan, region and what `skyferry inventory tfvars` rendered for it."
  type = object({
    plan                  = string
    region                = optional(string, "us-east-1")
    instance_type         = optional(string, "t3.medium")
    user_data             = list(string)
    wireguard_public_keys = list(string)
  })
  sensitive = true
}

variable "gcp" {
  description = "The GCP half: plan, project, zone and what `skyferry inventory tfvars` rendered for it."
  type = object({
    plan                  = string
    project               = string
    zone                  = optional(string, "us-central1-a")
    machine_type          = optional(string, "e2-medium")
    user_data             = list(string)
    wireguard_public_keys = list(string)
  })
  sensitive = true
}

provider "aws" {
  region = var.aws.region
}

provider "google" {
  project = var.gcp.project
  zone    = var.gcp.zone
}

module "aws" {
  source                = "../../modules/aws-hosts"
  plan                  = var.aws.plan
  region                = var.aws.region
  instance_type         = var.aws.instance_type
  user_data             = var.aws.user_data
  wireguard_public_keys = var.aws.wireguard_public_keys
}

module "gcp" {
  source                = "../../modules/gcp-hosts"
  plan                  = var.gcp.plan
  zone                  = var.gcp.zone
  machine_type          = var.gcp.machine_type
  user_data             = var.gcp.user_data
  wireguard_public_keys = var.gcp.wireguard_public_keys
}

output "skyferry_hosts" {
  description = "Every host of both clouds, for `skyferry inventory import --terraform`."
  value       = concat(module.aws.skyferry_hosts, module.gcp.skyferry_hosts)
}
