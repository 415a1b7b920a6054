"""Platform adapters, one package per platform; each imports only chatgateway's core."""
