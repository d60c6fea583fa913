# Provider-free: turns a provider module's instances into the list `skyferry inventory import` reads.
# Keeping the shape here, once, is what lets both cloud modules promise the same output. It carries no key:
# hosts make their own when they join (docs/providers.md, "Terraform").

terraform {
  required_version = ">= 1.5"
}

variable "provider_name" {
  description = "aws or gcp: recorded with each host in the mesh."
  type        = string
  validation {
    condition     = contains(["aws", "gcp"], var.provider_name)
    error_message = "provider_name must be aws or gcp."
  }
}

variable "plan" {
  description = "The skyferry plan these hosts belong to (the skyferry-plan tag or label)."
  type        = string
}

variable "region" {
  description = "AWS region or GCE zone."
  type        = string
}

variable "wireguard_port" {
  description = "UDP port each host's WireGuard listens on: the mesh's listen port, which joined hosts use."
  type        = number
  default     = 51820
  validation {
    condition     = var.wireguard_port >= 1 && var.wireguard_port <= 65535 && floor(var.wireguard_port) == var.wireguard_port
    error_message = "wireguard_port must be a UDP port (1-65535)."
  }
}

variable "instances" {
  description = "One object per host, in host order."
  type = list(object({
    name       = string
    id         = string
    public_ip  = string
    private_ip = string
    size       = string
  }))
  validation {
    condition     = alltrue([for i in var.instances : can(regex("^[a-z][a-z0-9-]{0,62}$", i.name))])
    error_message = "Every host name is lowercase letters, digits and '-', starting with a letter: the name its join token was made for."
  }
}

output "skyferry_hosts" {
  description = "The hosts, in the shape `skyferry inventory import` reads."
  value = [
    for inst in var.instances : {
      name           = inst.name
      provider       = var.provider_name
      plan           = var.plan
      id             = inst.id
      public_ip      = inst.public_ip
      private_ip     = inst.private_ip
      region         = var.region
      size           = inst.size
      wireguard_port = var.wireguard_port
    }
  ]
}
