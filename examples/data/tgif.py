"""The four TGIF-QA animated GIFs and their questions (``tgif-qa/``).

``tgif-qa/qa.json`` is a list of ``{"gif", "type", "question", "answer"}``; each GIF decodes with
Pillow's :class:`~PIL.ImageSequence.Iterator` (27-76 frames of 225 x 225). :func:`decode_gif`
turns any GIF into a ``(T, H, W, 3)`` uint8 array, optionally resized and subsampled to at most
``max_frames`` evenly spaced frames.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import DataError, data_file

__all__ = ["GifQuestion", "decode_gif", "load_tgif_qa"]


@dataclass(frozen=True)
class GifQuestion:
    """One TGIF-QA question: the GIF's path, its question type, question and answer."""

    gif: Path
    type: str
    question: str
    answer: str


def decode_gif(path: str | os.PathLike[str], size: int | None = None,
               max_frames: int | None = None) -> np.ndarray:
    """Every frame of an animated GIF as RGB.

    :param path: the GIF file.
    :param size: resize each frame to ``size x size`` (bilinear) if given.
    :param max_frames: keep at most this many frames, evenly spaced (first and last included).
    :return: ``(T, H, W, 3)`` uint8.
    :raises DataError: naming the file if it is missing or not a readable image.
    """
    from PIL import Image, ImageSequence, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            frames = []
            for frame in ImageSequence.Iterator(im):
                rgb = frame.convert("RGB")
                if size is not None:
                    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                frames.append(np.asarray(rgb, dtype=np.uint8))
    except FileNotFoundError as e:
        raise DataError(f"GIF {str(path)!r} not found") from e
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot decode {str(path)!r} as an image ({e})") from e
    if not frames:
        raise DataError(f"GIF {str(path)!r} has no frames")
    if max_frames is not None and len(frames) > max_frames:
        keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in keep]
    return np.stack(frames)


def load_tgif_qa(folder: str | os.PathLike[str] | None = None) -> list[GifQuestion]:
    """The questions of ``tgif-qa/qa.json``, each with the path of its GIF (checked to exist).

    :param folder: the data folder (``--data-dir``), else ``$PLATED_DATA``.
    :raises DataError: naming the file and entry on a missing file or a malformed entry.
    """
    path = data_file(folder, "tgif-qa", "qa.json")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(entries, list):
        raise DataError(f"{str(path)!r} must hold a list of {{gif, type, question, answer}}")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in
                                              ("gif", "type", "question", "answer")):
            raise DataError(f"{str(path)!r}, entry {i}: expected string fields gif, type, "
                            f"question and answer, got {e!r}")
        out.append(GifQuestion(data_file(folder, "tgif-qa", e["gif"]), e["type"],
                               e["question"], e["answer"]))
    return out
