"""Generated gRPC stubs of protos/pagedserve/v1 (written here by the build, not committed)."""
