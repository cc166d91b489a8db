import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch, request):
    """Tests that pull or list models get their own KVLIFE_HOME unless they ask for the real one."""
    if "real_model" not in request.fixturenames:
        monkeypatch.setenv("KVLIFE_HOME", str(tmp_path_factory.mktemp("kvlife-home")))


@pytest.fixture(scope="session")
def real_model():
    """The embedded test model (SmolLM2-135M), if pulled; `.ci/run` pulls it."""
    from kvlife import models

    if not models.is_pulled(models.TEST_MODEL):
        pytest.skip(f"{models.TEST_MODEL} is not pulled (run `kvlife models pull {models.TEST_MODEL}`)")
    return models.load(models.TEST_MODEL)
