"""bone3d: low-resolution bone CT to micro-CT-like volumes, judged by bone morphometry."""

__version__ = "0.1.0"
