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

from .errors import AudioReadError, ConfigError  # noqa: E402

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
