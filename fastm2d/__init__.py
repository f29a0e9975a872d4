"""fastm2d: fast, tested pre-training and transfer of Masked Modeling Duo (M2D / M2D-X) audio representations."""
__version__ = "0.1.0"

from .config import Config, ConfigError, ModelConfig, load_config
from .frontend import AudioReadError, LogMelSpectrogram, read_audio
from .model import M2D, ViTEncoder

__all__ = ["Config", "ConfigError", "ModelConfig", "load_config", "LogMelSpectrogram", "read_audio",
           "AudioReadError", "M2D", "ViTEncoder", "load_model", "load_encoder", "__version__"]


def __getattr__(name):  # transfer helpers import lazily to keep `import fastm2d` light
    if name in ("load_model", "load_encoder"):
        from . import checkpoint, runtime
        return {"load_model": checkpoint.load_model, "load_encoder": runtime.load_encoder}[name]
    raise AttributeError(name)
