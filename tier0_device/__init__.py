"""Tier 0, the agent on each device: serves local apps over the Open Inference Protocol with
onnxruntime and forwards what it cannot answer to its edge.
"""
