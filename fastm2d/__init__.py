"""fastm2d: fast, tested pre-training and transfer of Masked Modeling Duo (M2D / M2D-X) audio representations."""
__version__ = "0.1.0"

from .errors import AudioReadError, ConfigError

# Everything that needs torch is imported on first use (PEP 562), so `import fastm2d` and `fastm2d --help` are
# instant: name -> the module that defines it.
_LAZY = {"Config": "config", "ModelConfig": "config", "load_config": "config", "LogMelSpectrogram": "frontend",
         "read_audio": "frontend", "M2D": "model", "ViTEncoder": "model", "load_model": "checkpoint",
         "load_encoder": "transfer.runtime", "load_classifier": "transfer.classifier",
         "audioset_classes": "transfer.classifier", "save_pretrained": "transfer.pretrained",
         "from_pretrained": "transfer.pretrained"}

__all__ = ["ConfigError", "AudioReadError", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fastm2d' has no attribute {name!r}")
