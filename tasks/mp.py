"""MediaPipe's bundled solutions, imported in one place (call it only inside `tasks.workers` processes)."""

from __future__ import annotations

from types import ModuleType


def solutions() -> ModuleType:
    import mediapipe as mp

    return mp.solutions
