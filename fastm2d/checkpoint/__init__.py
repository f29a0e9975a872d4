"""Checkpoints, by job: `files` (safe reading and atomic writing, safetensors, model folders), `original` (the
original implementation's names, wrappers, heads and folder names), `loading` (any path -> weights in a model,
`load_model`, `init_from`), `export` (to the original's layout or safetensors).

A fastm2d checkpoint is a superset of the original one: {'model': state_dict with the original key names,
'optimizer', 'epoch', 'scaler', 'args'} plus 'model_config', 'config', 'step', 'rng', 'fastm2d_version'.
"""
from ..errors import CheckpointError
from .export import export_original
from .files import (MAX_INFLATION, PRETRAINED_CONFIG, PRETRAINED_FORMAT, PRETRAINED_WEIGHTS, SAFE_GLOBALS, atomic_save,
                    check_deepspeed_checkpoint, check_zip_members, deepspeed_safe_globals, is_pretrained_folder,
                    load_weights_file, read_pretrained_config, safe_load, save_safetensors)
from .loading import (TEXT_ENCODER_PREFIX, check_tensors, init_from_weights, latest_checkpoint, list_checkpoints, load_model, load_weights,
                      read_checkpoint, resolve_checkpoint_file)
from .original import (ENCODER_PREFIXES, EXTRA_PREFIXES, HEAD_LAYOUTS, PROJECTION_PREFIXES, WRAPPER_PREFIXES,
                       canonical_heads, infer_model_config, original_folder_name, parse_original_name, strip_wrappers)

__all__ = ["CheckpointError", "export_original", "MAX_INFLATION", "PRETRAINED_CONFIG", "PRETRAINED_FORMAT",
           "PRETRAINED_WEIGHTS", "SAFE_GLOBALS", "atomic_save", "check_deepspeed_checkpoint", "check_zip_members",
           "deepspeed_safe_globals", "is_pretrained_folder", "load_weights_file", "read_pretrained_config",
           "safe_load", "save_safetensors", "check_tensors", "init_from_weights", "latest_checkpoint",
           "list_checkpoints", "load_model", "load_weights", "read_checkpoint", "resolve_checkpoint_file",
           "ENCODER_PREFIXES", "EXTRA_PREFIXES", "HEAD_LAYOUTS", "PROJECTION_PREFIXES", "WRAPPER_PREFIXES",
           "canonical_heads", "infer_model_config", "original_folder_name", "parse_original_name",
           "strip_wrappers", "TEXT_ENCODER_PREFIX"]
