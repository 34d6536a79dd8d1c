"""Layering strategies: how a closure is grouped into image layers."""
