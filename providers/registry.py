"""Providers by name. Each is imported only when asked for: the cloud SDKs take a second to import."""

from pathlib import Path
from typing import Any

from .base import Provider
from .errors import ProviderError

NAMES = ("aws", "gcp", "local", "vm")

# The options each provider takes, from the CLI's common ones (None values are dropped).
_OPTIONS = {
    "aws": {"region": "region", "endpoint_url": "endpoint_url", "profile": "profile", "key_dir": "key_dir"},
    "gcp": {
        "region": "zone", "zone": "zone", "endpoint_url": "endpoint_url", "project": "project",
        "credentials": "credentials", "cache_dir": "cache_dir",
    },
    "local": {"state": "state", "cidr": "cidr", "wan_spec": "wan_spec"},
    "vm": {"state": "state", "nice": "nice"},
}  # fmt: skip


def get_provider(name: str, **options: Any) -> Provider:
    """`get_provider("aws", region="eu-central-1", endpoint_url=None)`; unknown options are an error,
    options set to None are left to the provider's defaults (environment, profiles)."""
    if name not in _OPTIONS:
        raise ProviderError(f"unknown provider {name!r}", hint=f"use one of: {', '.join(NAMES)}")
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(_OPTIONS[name]))
    if unknown:
        raise ProviderError(f"provider {name} does not take {', '.join(unknown)}")
    kwargs = {_OPTIONS[name][k]: v for k, v in given.items()}
    if name == "aws":
        from .aws import AwsProvider

        return AwsProvider(**kwargs)
    if name == "gcp":
        from .gcp import GcpProvider

        return GcpProvider(**kwargs)
    if "state" not in kwargs:
        raise ProviderError(f"the {name} provider needs a state directory")
    if name == "vm":
        from .vm import VmProvider

        return VmProvider(Path(kwargs.pop("state")), **kwargs)
    from .local import LocalProvider

    return LocalProvider(Path(kwargs.pop("state")), **kwargs)
