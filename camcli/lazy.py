"""Heavy modules imported on first attribute use, so light commands never pay for them.

`from camcli.lazy import cv2` reads like a plain import in modules whose top level
must stay cheap (`camcli --help` imports them for their constants); the real import
happens at the first `cv2.something`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _Lazy(ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        module = importlib.import_module(self.__name__)
        return getattr(module, attr)


cv2: Any = _Lazy("cv2")
