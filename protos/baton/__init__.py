"""Generated gRPC stubs live here (see baton.protos.build)."""
