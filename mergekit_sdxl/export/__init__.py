"""Export a single-file SDXL / SD1.5 checkpoint as a diffusers pipeline folder or an ONNX (optimum) folder."""
