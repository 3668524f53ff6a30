"""PyTorch checkpoint -> verified ONNX following the rnnserve state contract (docs/state-contract.md).

Modules: ``graph`` (build the ONNX graph), ``verify`` (ORT == PyTorch), ``contract`` (torch-free contract
checks for any ONNX file), ``quantize`` (int8 and its report), ``pipeline`` (write a repository version),
``__main__`` (the CLI). Nothing is imported here, so ``export.contract`` stays usable without torch.
"""
