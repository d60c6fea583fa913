"""providers.registry: names, options, and errors before any cloud call."""

import pytest
from skyferry.providers.errors import ProviderError
from skyferry.providers.naming import check_plan, missing_names
from skyferry.providers.registry import get_provider


def test_unknown_provider() -> None:
    with pytest.raises(ProviderError, match="unknown provider 'azure'") as exc:
        get_provider("azure")
    assert "aws, gcp, local" in (exc.value.hint or "")


def test_option_a_provider_does_not_take() -> None:
    with pytest.raises(ProviderError, match="provider local does not take endpoint_url"):
        get_provider("local", state="/tmp/x", endpoint_url="http://127.0.0.1:1")


def test_local_is_imported_lazily_and_built(tmp_path) -> None:
    local = get_provider("local", state=tmp_path, cidr=None)
    assert local.name == "local" and local.list() == []


@pytest.mark.parametrize("bad", ["", "Upper", "9lives", "has_underscore", "x" * 41])
def test_plan_names_follow_gce_rules(bad: str) -> None:
    with pytest.raises(ProviderError, match="invalid plan name"):
        check_plan(bad)


def test_missing_names_fill_gaps() -> None:
    assert missing_names("p", [], 2) == ["p-0", "p-1"]
    assert missing_names("p", ["p-1"], 3) == ["p-0", "p-2"]
    assert missing_names("p", ["p-0", "p-1", "p-2"], 2) == []
