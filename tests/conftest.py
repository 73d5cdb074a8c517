import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_v4():
    d = SHARED / "v4"
    if not d.is_dir():
        pytest.skip("../shared/v4 is not present")
    return d
