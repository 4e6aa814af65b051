"""Batching, devices and precision: the torch-only layer every model shares."""
