"""skyferry.providers: where hosts come from (local namespaces, AWS, GCP)."""

import warnings

# google-api-core warns on import that its new releases drop Python 3.11 after 2027-10-24. The lock pins
# the release we use; docs/host-setup.md ("Python 3.11's end of life") says what we do before that date.
# Set here because every import of the GCP provider passes through this package first.
warnings.filterwarnings(
    "ignore", "You are using a Python version", FutureWarning, "google.api_core._python_version_support"
)
