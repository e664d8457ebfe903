"""Shipped sweep specs for `synco sweep NAME` (YAML package data)."""
