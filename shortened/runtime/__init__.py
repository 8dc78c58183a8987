"""One module per backend (torch, onnxruntime, tensorrt), each a loader and a runner with the interface of base.py."""
