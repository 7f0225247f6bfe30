"""Character-level language models used as the demo models of the edgecascade mesh.

``corpus`` builds the training text (docstrings of the Python standard library),
``model`` holds the numpy MLP, its training loop and the ONNX export, and
``train`` is the command that rebuilds ``examples/models``.
"""
