"""Glue to engines vembed runs on: :mod:`vembed.integrations.ray` (Ray Data batch embedding)."""
