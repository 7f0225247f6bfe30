"""Tier 1, the server in the facility: serves models too large for devices and answers their fallback
calls, forwarding what it cannot answer to the region.
"""
