"""PyTorch checkpoint -> verified ONNX following the rnnserve state contract (docs/state-contract.md).

Modules: ``graph`` (build the ONNX graph), ``verify`` (ORT == PyTorch), ``contract`` (torch-free contract
checks for any ONNX file), ``quantize`` (int8 and its report), ``pipeline`` (write a repository version),
``__main__`` (the CLI), ``torch_module`` (users' own nn.Modules to verified ONNX), ``selfcheck`` (torch-free
load-time check of any contract model), ``catalog`` (the repository table and its size). Nothing is
imported here, so ``export.contract``, ``export.selfcheck`` and ``export.catalog`` stay usable without torch.
"""
