"""Alias of ``apr-gpu-check`` (``python -m apr.gpu_check``): see docs/gpu.md."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apr.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
