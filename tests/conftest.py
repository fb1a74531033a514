from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    """The real awkward clips of ../shared/videos (never copied into the repo)."""
    path = (REPO_ROOT / ".." / "shared" / "videos").resolve()
    if not path.is_dir():
        pytest.skip(f"real test videos not found at {path}; these tests need the shared "
                    "clips next to the repository (../shared/videos)")
    return path


@pytest.fixture
def garbage_vp9(shared_videos, tmp_path) -> Path:
    """A copy of the shared VP9 webm with 4 KiB of random bytes written at half its size.

    PyAV decodes it to the end without raising: FFmpeg only logs demuxer errors, so this
    is the file that trains "fine" while printing errors.
    """
    import random

    data = bytearray((shared_videos / "derived_juggle_vp9.webm").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = random.Random(0).randbytes(4096)
    path = tmp_path / "garbage_vp9.webm"
    path.write_bytes(bytes(data))
    return path
