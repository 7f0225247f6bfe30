"""The engine every tier runs: ONNX sessions, the model repository and cache, batching, generation."""
