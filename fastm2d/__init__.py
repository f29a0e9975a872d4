"""fastm2d: fast, tested pre-training and transfer of Masked Modeling Duo (M2D / M2D-X) audio representations."""
__version__ = "0.1.0"


def _map_source_kernels() -> None:
    """kernels/ sits beside this package in the repository and installs as fastm2d.kernels. When the package is
    imported straight from a checkout that pip has not installed (PYTHONPATH=., the GPU machine), map it here."""
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec(__name__ + ".kernels") is not None:
        return
    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.is_file():
        raise ImportError("fastm2d.kernels is missing: reinstall fastm2d (pip install .)")
    spec = importlib.util.spec_from_file_location(__name__ + ".kernels", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_map_source_kernels()

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
