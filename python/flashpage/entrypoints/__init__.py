"""vLLM's module layout, for scripts that start the server as a module."""
