# N skyferry hosts on GCE: a firewall rule for WireGuard, cloud-init user-data in instance metadata.
# Each host makes its own keys and joins the mesh through the controller's enrolment service (TCP 7421,
# outbound from the host) while `skyferry mesh serve` runs; nothing here knows a key.

terraform {
  required_version = ">= 1.5"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 5.0"
    }
  }
}

variable "plan" {
  description = "Plan name: labels every instance skyferry-plan=<plan>; hosts are <plan>-0 … <plan>-N-1."
  type        = string
}

variable "zone" {
  description = "GCE zone."
  type        = string
  default     = "us-central1-a"
}

variable "machine_type" {
  description = "GCE machine type."
  type        = string
  default     = "e2-medium"
}

variable "image" {
  description = "Boot image."
  type        = string
  default     = "projects/debian-cloud/global/images/family/debian-12"
}

variable "user_data" {
  description = "One cloud-init document per host, from `skyferry inventory tfvars`: each holds a one-time join token."
  type        = list(string)
  sensitive   = true
}

variable "wireguard_port" {
  description = "UDP port WireGuard listens on."
  type        = number
  default     = 51820
}

resource "google_compute_firewall" "wireguard" {
  name          = "skyferry-${var.plan}-wg"
  network       = "default"
  direction     = "INGRESS"
  description   = "skyferry plan ${var.plan}: WireGuard"
  source_ranges = ["0.0.0.0/0"]
  target_tags   = ["skyferry-${var.plan}"]

  allow {
    protocol = "udp"
    ports    = [tostring(var.wireguard_port)]
  }
}

resource "google_compute_instance" "host" {
  #checkov:skip=CKV_GCP_40:hosts need a public address: it is their WireGuard endpoint
  #checkov:skip=CKV_GCP_38:boot disk keeps Google-managed encryption; no CSEK in a test environment
  count        = length(var.user_data)
  name         = "${var.plan}-${count.index}"
  zone         = var.zone
  machine_type = var.machine_type
  tags         = ["skyferry-${var.plan}"]
  labels = {
    "skyferry-plan" = var.plan
    "skyferry-host" = "${var.plan}-${count.index}"
  }

  boot_disk {
    initialize_params {
      image = var.image
    }
  }

  network_interface {
    network = "default"
    access_config {}
  }

  metadata = {
    "user-data"              = var.user_data[count.index]
    "block-project-ssh-keys" = "true"
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  lifecycle {
    # User-data is read once, at first boot; fresh tokens from a later `inventory tfvars` (more hosts)
    # must not touch hosts that have joined.
    ignore_changes = [metadata["user-data"]]
  }
}

module "inventory" {
  source        = "../inventory"
  provider_name = "gcp"
  plan          = var.plan
  region        = var.zone
  instances = [for h in google_compute_instance.host : {
    name       = h.name
    id         = h.instance_id
    public_ip  = h.network_interface[0].access_config[0].nat_ip
    private_ip = h.network_interface[0].network_ip
    size       = h.machine_type
  }]
  wireguard_port = var.wireguard_port
}

output "skyferry_hosts" {
  description = "Read by `skyferry inventory import`."
  value       = module.inventory.skyferry_hosts
}
