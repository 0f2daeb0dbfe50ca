"""Generated gRPC stubs of flashpage.v1 (from flashpage.proto beside them)."""
