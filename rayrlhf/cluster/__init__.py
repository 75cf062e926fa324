"""Resource groups, role orchestration and weight-sync transports."""
