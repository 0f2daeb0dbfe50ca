"""Benchmarks that need Python peers (torch, llama.cpp) beside flashpage."""
