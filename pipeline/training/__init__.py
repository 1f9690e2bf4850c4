"""Training the ONNX graph's own weights: distillation fine-tuning of a pruned model (``carve finetune``, the
``finetune`` and ``gradual`` recipe passes).

The graph runs in PyTorch (:class:`carve.pipeline.runtime.torch_graph.TorchGraph`, whose parameters are the ONNX
initializers), trains, and writes the values back into the very same graph: no re-export. See
:mod:`carve.pipeline.training.finetune`.
"""
