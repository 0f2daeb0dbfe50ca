"""Serving: the async engine, the OpenAI-compatible HTTP server, the gRPC server, metrics."""
