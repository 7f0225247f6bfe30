"""Signed model updates, shared by every tier that installs or relays them.

The TUF client, the artifact store and fetcher, content encryption, golden
vectors and the signed facts of a variant.
"""
