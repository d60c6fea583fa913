"""The agent's wire contract, shared by the controller and the agents: client, PKI, ports, fault names."""
