# Provider-free: turns a provider module's instances into the list `skyferry inventory import` reads.
# Keeping the shape here, once, is what lets both cloud modules promise the same output.

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
  description = "UDP port each host's WireGuard listens on."
  type        = number
  default     = 51820
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
}

variable "wireguard_public_keys" {
  description = "Each host's WireGuard public key, in host order (from `skyferry inventory tfvars`)."
  type        = list(string)
  validation {
    condition     = alltrue([for k in var.wireguard_public_keys : can(regex("^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$", k))])
    error_message = "Every WireGuard public key is 44 characters of base64 (32 bytes)."
  }
}

output "skyferry_hosts" {
  description = "The hosts, in the shape `skyferry inventory import` reads."
  value = [
    for i, inst in var.instances : {
      name                 = inst.name
      provider             = var.provider_name
      plan                 = var.plan
      id                   = inst.id
      public_ip            = inst.public_ip
      private_ip           = inst.private_ip
      region               = var.region
      size                 = inst.size
      wireguard_port       = var.wireguard_port
      wireguard_public_key = var.wireguard_public_keys[i]
    }
  ]
}
