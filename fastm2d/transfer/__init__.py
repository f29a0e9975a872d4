"""Using a trained model: the released weights or ours -> features of any length (`runtime`), tags (`classifier`),
zero-shot (`clap`), a corpus of files (`embed_corpus`), exports (`onnx_export`, `pretrained` model folders) and the
benchmark suites' interfaces (`interfaces/`: HEAR, s3prl, X-ARES). Files are decoded and batched in one way
(`batching`); device and arithmetic come from fastm2d/devices.py. Nothing here imports the training stack."""
