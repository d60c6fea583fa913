# A test environment across two clouds. skyferry owns the mesh; Terraform only makes machines, whose
# user-data (from skyferry) holds a one-time join token each. On the controller (docs/providers.md):
#
#   skyferry inventory tfvars --plan tfaws --count 2 > aws.json     # {"plan", "user_data"}: put into var.aws
#   skyferry inventory tfvars --plan tfgcp --count 2 > gcp.json     # the same for var.gcp (and its project)
#   skyferry mesh serve &                                           # hosts join while this runs
#   terraform init && terraform apply
#   terraform output -json > terraform-output.json
#   skyferry inventory import --terraform .                         # cloud ids; who joined, who waits

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
    plan          = string
    region        = optional(string, "us-east-1")
    instance_type = optional(string, "t3.medium")
    user_data     = list(string)
  })
  sensitive = true
}

variable "gcp" {
  description = "The GCP half: plan, project, zone and what `skyferry inventory tfvars` rendered for it."
  type = object({
    plan         = string
    project      = string
    zone         = optional(string, "us-central1-a")
    machine_type = optional(string, "e2-medium")
    user_data    = list(string)
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
  source        = "../../modules/aws-hosts"
  plan          = var.aws.plan
  region        = var.aws.region
  instance_type = var.aws.instance_type
  user_data     = var.aws.user_data
}

module "gcp" {
  source       = "../../modules/gcp-hosts"
  plan         = var.gcp.plan
  zone         = var.gcp.zone
  machine_type = var.gcp.machine_type
  user_data    = var.gcp.user_data
}

output "skyferry_hosts" {
  description = "Every host of both clouds, for `skyferry inventory import --terraform`."
  value       = concat(module.aws.skyferry_hosts, module.gcp.skyferry_hosts)
}
