"""The test kit: helpers shared by tests across packages (meshes, workloads, fakes of cloud APIs)."""
