"""`python -m onnxopt ...` is `onnxopt ...`."""

from onnxopt.cli import main

main()
