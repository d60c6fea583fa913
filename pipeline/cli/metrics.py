"""`skyferry metrics HOST`: a host's Prometheus metrics, for a quick look without Prometheus."""

from typing import Any

import typer

from . import output
from .app import app


@app.command()
def metrics(
    host: str = typer.Argument(..., help="The mesh host whose agent to ask."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Print HOST's metrics as its agent exposes them to Prometheus (GET /v1/metrics, mutual TLS).

    The metric names and what they mean: docs/observability.md.

    Examples:

        skyferry metrics local-2 | grep skyferry_migrations_total

        skyferry metrics local-2 --json | jq '.[] | select(.name == "skyferry_migration_freeze_seconds")'
    """
    from skyferry.netplane.mesh import Mesh
    from skyferry.pipeline.controller import agentctl
    from skyferry.pipeline.controller.state import state_dir

    state = state_dir()
    text = agentctl.client(state, Mesh.load(state), host).call("GET", "/v1/metrics").decode()
    if json_out:
        output.print_json(families(text))
    else:
        typer.echo(text, nl=False)


def families(text: str) -> list[dict[str, Any]]:
    """An exposition as data: one entry per metric family, each sample with its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        {"name": f.name, "type": f.type, "help": f.documentation,
         "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
        for f in text_string_to_metric_families(text)
    ]  # fmt: skip
