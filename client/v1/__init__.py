"""Generated protobuf and gRPC stubs for tokenwire.v1 (regenerate with `make proto`)."""
