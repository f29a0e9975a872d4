"""Every error fastm2d raises on purpose, in two families the command line tells apart:

  UserError     something the user gave (a config value, a file, a checkpoint) is wrong or unusable: the
                `fastm2d` command prints one line naming it and exits 2, touching nothing
  MachineFault  the machine failed the run (a peer rank died, the disk filled up): one line, exit 1; the run
                folder is resumable

This module imports nothing, so the command line can name them without loading torch.
"""


class UserError(Exception):
    """Base of the errors a user fixes (exit status 2)."""


class MachineFault(RuntimeError):
    """Base of the faults of the machine, not of the input (exit status 1)."""


class ConfigError(UserError, ValueError):
    """A configuration key is unknown, mistyped or inconsistent."""


class DataError(UserError, RuntimeError):
    """Training data is missing or unusable; the message names the file(s)."""


class AudioReadError(UserError, RuntimeError):
    """An audio file could not be read; the message names the file and the reason."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model; the message names the file."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunFolderInUse(ConfigError):
    """Another process is training in this run folder."""


class RankLost(MachineFault):
    """A peer process died; the message names it and the last good checkpoint."""


class OutOfDeviceMemory(MachineFault):
    """The GPU ran out of memory; the message names the step, the snapshot written and what to change."""


class CheckpointWriteError(MachineFault):
    """A checkpoint could not be written (disk full, quota, unwritable folder)."""


class LinkInTheWay(UserError):
    """A symbolic link stands where fastm2d would write a file: it never writes through a link it did not create."""


class SpecialFileInTheWay(UserError):
    """A FIFO, socket or device stands where fastm2d would write a file: opening it could block forever."""


def message(e: BaseException) -> str:
    """The line to print for an error. One raised in a DataLoader worker arrives re-raised by torch with the
    worker's whole traceback as its message ('Caught DataError in DataLoader worker process 0. Original
    Traceback ...'): its own message is the last line, after the exception's name."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        name = f"{type(e).__module__}.{type(e).__qualname__}: "
        return last[len(name):] if last.startswith(name) else last
    return text
