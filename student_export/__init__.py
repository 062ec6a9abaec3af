"""student-export: a trained student as a self-contained ONNX or PyTorch directory, FP32 or INT8,
checked against its source model before it is reported as written."""
