"""Runbooks: evacuation, cloud exit, rebalancing, placement, test cutovers, ingress, reports."""
