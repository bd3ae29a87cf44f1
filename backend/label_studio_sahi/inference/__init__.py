"""Arrays in, boxes and classes out, with no HTTP, Redis or Label Studio: checkpoints
(``checkpoints``), the models (``detector``, ``classifier``, ``onnx_engine``), slicing and
merging (``slicing``), and the task score (``scores``)."""
