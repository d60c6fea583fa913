# N skyferry hosts on EC2: the WireGuard port open, cloud-init user-data from `skyferry inventory tfvars`.
# Each host makes its own keys and joins the mesh through the controller's enrolment service (TCP 7421,
# outbound from the host) while `skyferry mesh serve` runs; nothing here knows a key.

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

variable "plan" {
  description = "Plan name: tags every resource skyferry-plan=<plan>; hosts are <plan>-0 … <plan>-N-1."
  type        = string
}

variable "region" {
  description = "AWS region the provider configuration uses (recorded with each host)."
  type        = string
  default     = "us-east-1"
}

variable "instance_type" {
  description = "EC2 instance type."
  type        = string
  default     = "t3.medium"
}

variable "image_id" {
  description = "AMI; empty means the newest Debian 12 from Debian's own account."
  type        = string
  default     = ""
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

data "aws_ami" "debian" {
  count       = var.image_id == "" ? 1 : 0
  most_recent = true
  owners      = ["136693071363"]
  filter {
    name   = "name"
    values = ["debian-12-amd64-*"]
  }
}

resource "aws_security_group" "wireguard" {
  name        = "skyferry-${var.plan}"
  description = "skyferry plan ${var.plan}: WireGuard"
  tags        = { "skyferry-plan" = var.plan }

  ingress {
    description = "WireGuard between mesh members, which roam across clouds"
    from_port   = var.wireguard_port
    to_port     = var.wireguard_port
    protocol    = "udp"
    cidr_blocks = ["0.0.0.0/0"] #checkov:skip=CKV_AWS_260:UDP WireGuard only; peers authenticate by key
  }

  egress {
    description = "Package mirrors, the CRIU source and the mesh peers"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"] #checkov:skip=CKV_AWS_382:hosts install packages at boot
  }
}

resource "aws_instance" "host" {
  #checkov:skip=CKV2_AWS_41:no IAM role: hosts call no AWS API
  count                  = length(var.user_data)
  ami                    = var.image_id != "" ? var.image_id : data.aws_ami.debian[0].id
  instance_type          = var.instance_type
  user_data              = var.user_data[count.index]
  vpc_security_group_ids = [aws_security_group.wireguard.id]
  monitoring             = true
  ebs_optimized          = true

  metadata_options {
    http_tokens                 = "required" # IMDSv2, one hop: containers cannot read the join token
    http_put_response_hop_limit = 1
  }

  root_block_device {
    encrypted = true
  }

  lifecycle {
    # User-data is read once, at first boot; fresh tokens from a later `inventory tfvars` (more hosts)
    # must not stop or replace hosts that have joined.
    ignore_changes = [user_data]
  }

  tags = {
    "Name"          = "${var.plan}-${count.index}"
    "skyferry-plan" = var.plan
    "skyferry-host" = "${var.plan}-${count.index}"
  }
}

module "inventory" {
  source        = "../inventory"
  provider_name = "aws"
  plan          = var.plan
  region        = var.region
  instances = [for i, h in aws_instance.host : {
    name       = h.tags["skyferry-host"]
    id         = h.id
    public_ip  = h.public_ip
    private_ip = h.private_ip
    size       = h.instance_type
  }]
  wireguard_port = var.wireguard_port
}

output "skyferry_hosts" {
  description = "Read by `skyferry inventory import`."
  value       = module.inventory.skyferry_hosts
}
