"""Tier 2, the regional service: the top of the chain and the last fallback (registry, rollouts and
inventory arrive in later work).
"""
