"""The ``edgecascade`` command line: run the mesh on this machine and talk to it."""
