"""One-line errors of the command-line tools: a file that cannot be read (`FileError`) and an optional
package that is not installed (`need`)."""
import contextlib
import gzip
import importlib
import json
import os
import pickle
import zlib

# optional package -> the extra of `pip install 'medconv_ext[EXTRA]'` that installs it
EXTRAS = {"zarr": "io", "tifffile": "io", "nibabel": "io", "matplotlib": "analysis", "onnx": "onnx",
          "onnxscript": "onnx", "onnxruntime": "onnx", "monai": "monai"}


class MissingExtraError(ImportError):
    pass


def need(module: str, what: str):
    """Import the optional package `module`, or raise a one-line ImportError naming the extra
    that installs it (`what` says what needs it, e.g. 'TIFF files')."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        hint = " (or pip install 'medconv_ext[%s]')" % extra if extra else ""
        raise MissingExtraError("%s need the '%s' package, which is not installed: pip install %s%s"
                                % (what, top, top, hint)) from None


class FileError(ValueError):
    """A file that cannot be used: `path` and the problem, printed as one line 'PATH: PROBLEM'."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__("%s: %s" % (self.path, problem))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def problem_of(e: BaseException) -> str:
    """What an exception raised while reading a file says about the file, in a few words."""
    if isinstance(e, FileNotFoundError):
        return "does not exist"
    if isinstance(e, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(e, PermissionError):
        return "cannot be read (permission denied)"
    if isinstance(e, EOFError):
        return "is truncated (the file ends before its data)"
    if isinstance(e, (zlib.error, gzip.BadGzipFile)):
        return "is corrupt (bad compressed data: %s)" % _first_line(e)
    if isinstance(e, pickle.UnpicklingError):
        return "is not a PyTorch checkpoint, or is corrupt (it cannot be unpickled)"
    if isinstance(e, json.JSONDecodeError):
        return "has corrupt metadata (invalid JSON: %s)" % _first_line(e)
    if type(e).__name__ == "ImageFileError":  # nibabel
        return "is corrupt or not a NIfTI file (nibabel cannot read its header)"
    if type(e).__name__ == "TiffFileError":
        return "is corrupt or not a TIFF file (%s)" % _first_line(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[0].lower() + e.strerror[1:]
    msg = _first_line(e)
    low = msg.lower()
    if "pytorchstreamreader" in low or "zip archive" in low or "central directory" in low:
        return "is truncated or corrupt, or not a PyTorch checkpoint (its zip archive cannot be read)"
    if "weights only load failed" in low:
        return "is not a PyTorch checkpoint, or is corrupt (it cannot be unpickled)"
    if "mmap length is greater than file size" in low:
        return "is truncated (shorter than its header says)"
    return "cannot be read (%s: %s)" % (type(e).__name__, msg)


@contextlib.contextmanager
def reading(path):
    """Turn any error raised while reading `path` into a FileError naming it (ImportErrors and our own
    FileErrors pass through)."""
    try:
        yield
    except (FileError, ImportError):
        raise
    except Exception as e:  # third-party readers raise anything: name the file and the problem
        raise FileError(path, problem_of(e)) from e


def check_readable(path, what: str = "file") -> None:
    """A FileError unless `path` exists and can be opened for reading."""
    p = str(path)
    if not os.path.exists(p):
        raise FileError(p, "%s does not exist" % what if what != "file" else "does not exist")
    if os.path.isfile(p):
        try:
            with open(p, "rb"):
                pass
        except OSError as e:
            raise FileError(p, problem_of(e)) from None
