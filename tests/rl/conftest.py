import pytest


@pytest.fixture(scope="module", autouse=True)
def _float32(float32_forward):
    """Every module here checks identities in float32, on any processor (tests/conftest.py)."""
