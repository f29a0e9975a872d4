"""torch.hub / s3prl entry points: `torch.hub.load(REPO, "m2d_local", ckpt=PATH, source="local")`."""
dependencies = ["torch", "torchaudio", "timm"]

from fastm2d.transfer.interfaces.s3prl import m2d_local  # noqa: E402,F401
