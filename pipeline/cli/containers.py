"""`skyferry run | ps | logs | exec | cp | rm`: containers on mesh hosts, each with a stable overlay /32."""

import base64
import sys
from pathlib import Path

import typer
from skyferry.pipeline.controller import containers, copy
from skyferry.pipeline.controller.state import state_dir
from skyferry.pipeline.errors import SkyferryError
from skyferry.pipeline.runbooks import ingress

from . import output
from .app import app

PANEL = "Containers"


@app.command(rich_help_panel=PANEL, context_settings={"allow_interspersed_args": False})
def run(
    host: str = typer.Option(..., "--host", help="Mesh host to run on, e.g. local-1."),
    name: str = typer.Option(..., "--name", help="Container name, unique in the mesh."),
    command: list[str] = typer.Argument(..., help="The command to run, after `--`."),
    rootfs: Path | None = typer.Option(None, help="A directory to copy as the container's rootfs."),
    image: Path | None = typer.Option(None, help="An OCI-layout or `docker save` tarball to unpack as rootfs."),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE, repeatable."),
    runtime: str | None = typer.Option(
        None, "--runtime", help="runc (default), podman or docker; or prefix the name: --name podman:web."
    ),
    label: list[str] = typer.Option(
        [], "--label", "-l", help="k=v metadata, repeatable: priority=10, ingress=eip:eipalloc-…:80 (docs/runbooks.md)."
    ),
    volume: list[str] = typer.Option(
        [], "--volume", "-v", help="A path in the container backed by a volume that moves with it, repeatable."
    ),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Start a container (runc, Podman or Docker) on HOST with its own netns and overlay IP.

    With neither --rootfs nor --image the container sees the host's /usr and /etc read-only, so host
    programs such as python3 work inside. Stdio goes to a log (`skyferry logs NAME`).

    Podman and Docker containers need --image (a rootfs tarball, imported, or a `docker save` archive).

    A local host gets a copy of --rootfs or --image; a joined machine's agent reads them only from its
    own /var/lib/skyferry/host/imports/, so put them there first (docs/security.md).

    Example: skyferry run --host local-1 --name web -- python3 -m http.server 8080

    Example: skyferry run --host local-1 --name db --volume /data -- python3 /app/db.py

    Example: skyferry run --host local-1 --name podman:db --image rootfs.tar -- /app/serve
    """
    environment = dict(_kv(e, "--env") for e in env)
    labels = dict(_kv(item, "--label") for item in label)
    # A bad label is refused before anything starts; one with ports is applied at once (docs/runbooks.md).
    deliver = ingress.LABEL in labels and bool(ingress.parse(labels[ingress.LABEL], name).ports)
    state = state_dir()
    info = containers.run(
        state, host, name, command, rootfs=rootfs, image=image, env=environment, labels=labels,
        runtime=runtime, volumes=volume,
    )  # fmt: skip
    if deliver:  # its public address points here, and the host delivers the ports to it
        info["ingress"] = ingress.at_start(state, info["name"])
    if json_out:
        output.print_json(info)
    else:
        who = f"{info['name']} ({info['runtime']})"
        output.console.print(f"{who} running on {host} at {info['ip']} (pid {info.get('pid')})")
        if info.get("ingress"):
            output.console.print(f"ingress: {info['ingress']['summary']}")
    if (info.get("ingress") or {}).get("error"):
        if not json_out:
            output.console.print(f"error: {info['ingress']['error']}\nhint: {info['ingress']['hint']}")
        raise typer.Exit(1)  # the container runs; its ingress did not apply


def _kv(text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SkyferryError(f"{option} {text!r} is not KEY=VALUE")
    return key, value


@app.command(rich_help_panel=PANEL)
def ps(json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP)) -> None:
    """List containers of every engine (runc, Podman, Docker): name, runtime, host, IP, state, PID."""
    rows = containers.live(state_dir())
    if json_out:
        output.print_json(rows)
        return
    output.print_table(
        None,
        ["NAME", "RUNTIME", "HOST", "IP", "STATE", "PID", "COMMAND"],
        [[r["name"], r["runtime"], r["host"], r["ip"], r["state"], r["pid"], r["command"]] for r in rows],
    )


@app.command(rich_help_panel=PANEL)
def logs(name: str = typer.Argument(..., help="Container name.")) -> None:
    """Print a container's stdout and stderr (from wherever it runs now)."""
    sys.stdout.buffer.write(containers.logs(state_dir(), name))


@app.command("exec", rich_help_panel=PANEL, context_settings={"allow_interspersed_args": False})
def exec_(
    name: str = typer.Argument(..., help="Container name."),
    command: list[str] = typer.Argument(..., help="The command to run inside, after `--`."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Pass this command's stdin to it."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the command (runc then kills it)."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Run a command inside a running container, wherever it runs now, and exit with its exit code.

    It runs as the engine's own exec would (the container's namespaces, cgroup, capabilities and
    seccomp), without a terminal: `skyferry exec web -- cat /etc/hostname`,
    `skyferry exec -i web -- sh -c 'cat > /tmp/x' < x`.
    """
    command = command[1:] if command[:1] == ["--"] else command  # options end at NAME, so `--` is optional
    if not command:
        raise SkyferryError("no command given", hint="skyferry exec NAME -- CMD ARGS…")
    stdin = sys.stdin.buffer.read() if interactive else b""
    done = containers.exec_(state_dir(), name, command, stdin, timeout)
    if json_out:
        output.print_json(
            {"exit_code": done.exit_code, **{k: base64.b64decode(getattr(done, k)).decode(errors="replace")
                                             for k in ("stdout", "stderr")}}
        )  # fmt: skip
    else:
        sys.stdout.buffer.write(base64.b64decode(done.stdout))
        sys.stderr.buffer.write(base64.b64decode(done.stderr))
    raise typer.Exit(done.exit_code)


@app.command(rich_help_panel=PANEL)
def cp(
    src: str = typer.Argument(..., help="A local path, or NAME:/PATH in a container."),
    dest: str = typer.Argument(..., help="A local path, or NAME:/PATH in a container."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Copy files between this machine and a container, wherever it runs, like `docker cp`.

    `skyferry cp app.conf web:/etc/app/` puts a file into a directory; `skyferry cp web:/var/log ./logs`
    takes a directory out. The container's own tar does its side (up to 16 MiB per copy); what comes
    out is unpacked safely (no absolute paths, `..`, links out or devices).
    """
    (src_name, src_path), (dest_name, dest_path) = copy.split(src), copy.split(dest)
    if src_name is None and dest_name is not None:
        sent = copy.copy_in(state_dir(), Path(src_path), dest_name, dest_path)
    elif src_name is not None and dest_name is None:
        sent = copy.copy_out(state_dir(), src_name, src_path, Path(dest_path))
    else:
        raise SkyferryError("give one container path and one local path", hint="skyferry cp FILE NAME:/DIR")
    if json_out:
        output.print_json({"copied": src, "to": dest, "bytes": sent})
    else:
        output.console.print(f"copied {src} to {dest} ({sent} B)")


@app.command(rich_help_panel=PANEL)
def rm(
    name: str = typer.Argument(..., help="Container name."),
    json_out: bool = typer.Option(False, "--json", help=output.JSON_OPTION_HELP),
) -> None:
    """Stop and remove a container, and release its overlay IP. Safe to run twice."""
    removed = containers.remove(state_dir(), name)
    if json_out:
        output.print_json({"removed": name if removed else None})
    else:
        output.console.print(f"removed {name}" if removed else f"{name}: no such container (nothing to do)")
