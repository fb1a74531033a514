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
