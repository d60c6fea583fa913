"""`skyferry provision`, `skyferry decommission` and `skyferry inventory`: hosts from clouds.

The work is pipeline/controller/provision.py's; this module parses and prints.
"""

from pathlib import Path
from typing import Any

import typer
from skyferry.netplane.mesh import Mesh
from skyferry.pipeline.controller import provision as provisioning
from skyferry.pipeline.controller.state import state_dir
from skyferry.providers.naming import check_plan, host_name

from . import output
from .app import app

HELP_PROVIDER = "Where the hosts come from: aws, gcp or local."
HELP_ENDPOINT = (
    "Send every API call here instead of the public cloud (a local moto or GCE fake, or a private endpoint). "
    "Also read from SKYFERRY_AWS_ENDPOINT_URL / SKYFERRY_GCE_ENDPOINT_URL."
)


def _print_hosts(title: str, hosts: list[dict[str, Any]]) -> None:
    cols = ["name", "provider", "id", "address", "overlay_ip", "state", "region", "size"]
    output.print_table(title, cols, [[h.get(c) for c in cols] for h in hosts])


@app.command(rich_help_panel="Hosts")
def provision(
    provider: str = typer.Option(..., "--provider", help=HELP_PROVIDER),
    count: int = typer.Option(1, "--count", "-n", min=1, help="How many hosts the plan should have."),
    size: str | None = typer.Option(None, "--size", help="Instance type / machine type (t3.medium, e2-medium)."),
    region: str | None = typer.Option(None, "--region", help="AWS region, or GCE zone (us-central1-a)."),
    image: str | None = typer.Option(None, "--image", help="Image id or URL; default: Debian 12."),
    plan: str | None = typer.Option(
        None,
        "--plan",
        help=f"Name tagging everything made (default {provisioning.DEFAULT_PLAN}; for local, the mesh id).",
    ),
    endpoint_url: str | None = typer.Option(None, "--endpoint-url", help=HELP_ENDPOINT),
    timeout: float = typer.Option(600, "--timeout", help="Seconds to wait for the hosts to run."),
    join_timeout: float = typer.Option(
        1200, "--join-timeout", help="Seconds to wait for new hosts to join; 0: return at once (mesh serve)."
    ),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Make sure a plan has COUNT hosts, joined into the mesh by cloud-init and a one-time token each.

    No key travels in user-data: each host makes its own and joins through the enrolment service this
    command serves while it waits (TCP 7421 on the controller's endpoint address).

    Idempotent: hosts are tagged skyferry-plan=PLAN, and a second run creates only what is missing.
    A failed run removes what it created. Credentials come from the usual places (AWS_* variables or
    profiles; GOOGLE_APPLICATION_CREDENTIALS for a service-account key) and are never printed.

      skyferry provision --provider aws --count 2 --region eu-central-1 --plan exit1

      skyferry provision --provider gcp --count 2 --size e2-standard-2 --region europe-west1-b

      skyferry provision --provider aws --count 2 --endpoint-url http://127.0.0.1:5000 --json
    """
    result = provisioning.provision(
        state_dir(), provider, count, plan, size=size, region=region, image=image, endpoint_url=endpoint_url,
        timeout=timeout, join_timeout=join_timeout,
    )  # fmt: skip
    plan, result = result["plan"], result["hosts"]
    if json_out:
        output.print_json({"plan": plan, "provider": provider, "hosts": result})
    else:
        _print_hosts(f"plan {plan} on {provider}: {len(result)} host(s)", result)


@app.command(rich_help_panel="Hosts")
def decommission(
    plan: str = typer.Option(..., "--plan", help="The plan whose hosts, firewall rules and keys go."),
    provider: str | None = typer.Option(
        None, "--provider", help="aws, gcp or local; default: the provider of the plan's hosts in the mesh."
    ),
    region: str | None = typer.Option(None, "--region", help="AWS region, or GCE zone."),
    endpoint_url: str | None = typer.Option(None, "--endpoint-url", help=HELP_ENDPOINT),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Remove everything a plan made and take its hosts out of the mesh. Safe to run twice.

    skyferry decommission --plan exit1

    skyferry decommission --plan exit1 --provider gcp --region europe-west1-b --json
    """
    done = provisioning.decommission(state_dir(), plan, provider, region=region, endpoint_url=endpoint_url)
    provider, removed, left = done["provider"], done["removed"], done["left_mesh"]
    if json_out:
        output.print_json({"plan": plan, "provider": provider, "removed": removed, "left_mesh": left})
    else:
        what = ", ".join(removed) or "nothing (already gone)"
        output.console.print(f"plan {plan} on {provider}: removed {what}; left the mesh: {', '.join(left) or '-'}")


inventory_app = typer.Typer(
    no_args_is_help=True,
    help=(
        "Hosts made outside skyferry (Terraform): user-data that joins them, and what their cloud says.\n\n"
        "  skyferry inventory tfvars --plan tfaws --count 2 > aws.json\n\n"
        "  skyferry mesh serve    # while terraform apply runs and the hosts boot\n\n"
        "  terraform -chdir=terraform/examples/aws-and-gcp output -json > hosts.json\n\n"
        "  skyferry inventory import --terraform hosts.json"
    ),
)
app.add_typer(inventory_app, name="inventory", rich_help_panel="Hosts")


@inventory_app.command("import")
def import_(
    terraform: Path = typer.Option(
        ...,
        "--terraform",
        help="`terraform output -json` saved to a file, or a directory holding terraform-output.json.",
    ),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Record the hosts of a Terraform environment (its skyferry_hosts output) and say which have joined.

    Hosts join by themselves, with the token in their user-data, while `skyferry mesh serve` runs; this
    adds no one to the mesh. It keeps each host's cloud identity (provider, instance id, address, region)
    for `decommission`, ingress and `hosts ls`, updates a joined host's provider and endpoint, and lists
    the hosts still waiting to join. Idempotent; run again after they joined or after a terraform apply.

    skyferry inventory import --terraform terraform/examples/aws-and-gcp

    skyferry inventory import --terraform hosts.json --json
    """
    result = provisioning.import_terraform(state_dir(), terraform)
    rows = result["hosts"]
    if json_out:
        output.print_json(result)
        return
    cols = ["name", "provider", "id", "address", "region", "join", "overlay_ip", "changed"]
    title = f"mesh {result['mesh']}: {len(result['joined'])} of {len(rows)} host(s) joined"
    output.print_table(title, cols, [[r[c] for c in cols] for r in rows])
    for r in rows:
        if r["endpoint_was"]:
            output.err_console.print(
                f"{r['name']} was reached at {r['endpoint_was']}, Terraform says {r['address']}: now {r['endpoint']}."
                f" If {r['name']} joined from an address not its own, someone else used its token: decommission it"
            )
    if any(r["join"] == "no-token" for r in rows):
        output.err_console.print(
            "hosts marked no-token hold no valid join token: make new user-data (skyferry inventory tfvars) and"
            " replace them, or run `skyferry hosts join NAME` and the command it prints on the host"
        )


@inventory_app.command("tfvars")
def tfvars(
    plan: str = typer.Option(
        ..., "--plan", help="Plan name; hosts are PLAN-0 … PLAN-(COUNT-1), as the modules name them."
    ),
    count: int = typer.Option(1, "--count", "-n", min=1, help="How many hosts the module will make."),
    ttl: float = typer.Option(86400, "--ttl", help="Seconds the join tokens stay valid."),
) -> None:
    """Print per-host cloud-init user-data as JSON, for terraform/modules/*.

    Each document carries a one-time join token (valid TTL seconds) and no key; the hosts make their own
    keys and join while `skyferry mesh serve` runs. Then `inventory import` records them.

      skyferry inventory tfvars --plan tfaws --count 2 > terraform/examples/aws-and-gcp/aws.json
    """
    state = state_dir()
    check_plan(plan)
    boot = provisioning.Bootstrapper(state, Mesh.load(state), provisioning.TERRAFORM, ttl=ttl)
    names = [host_name(plan, i) for i in range(count)]
    output.print_json({"plan": plan, "user_data": [boot(n) for n in names]})
