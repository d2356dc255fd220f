"""Deployment exports: the chat template written beside an HF export (``chat_template``) and the ONNX graph of the
vision side (``onnx``, ``megavlm export onnx``)."""
