"""tokenwire's gRPC server: the multiplexed Generate stream, health, reflection, auth, TLS, metrics, drain."""
