"""``kubectl pod-identity``: arguments, validation before any request, exit statuses.

Exit 0 on success; 1 when the operation was refused (by the API server, or by a check against the
cluster: already exists, not found, a limit reached) or the cluster could not be reached; 2 on bad
usage or an invalid value, before anything is sent. Messages go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from kubectl_pod_identity import __version__
from kubectl_pod_identity import operations as ops
from kubectl_pod_identity.connect import connect
from kubectl_pod_identity.errors import PluginError, UsageError
from kubectl_pod_identity.objects import (
    dump,
    exception_record,
    exception_table,
    identity_body,
    identity_record,
    identity_table,
)
from kubectl_pod_identity.validation import (
    check_client_id,
    check_identity_name,
    check_identity_type,
    check_name,
    check_namespace,
    check_resource_id,
    check_secret_ref,
    check_selector,
    parse_pod_labels,
)
from podidentity.cliargs import positive
from podidentity.kube.client import KubeClient
from podidentity.kube.settings import KubeSettings
from podidentity.model import IdentityType

PROG = "kubectl pod-identity"


@dataclass
class Output:
    lines: list[str] = field(default_factory=list)
    """Printed to stdout, each followed by a newline unless it ends with one."""
    warnings: list[str] = field(default_factory=list)
    """Printed to stderr as ``warning: ...``."""
    note: str = ""
    """Printed to stderr as is (``No pod identities found.``, as kubectl's ``No resources found``)."""


Command = Callable[[ops.Api], Awaitable[Output]]


# --- the parser ----------------------------------------------------------------------------------


def _connection_flags(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Accepted before or after the subcommand (kubectl passes everything after the plugin name);
    # in subcommands the default is SUPPRESS so that a value given earlier is not overwritten.
    default = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("connection (as kubectl)")
    group.add_argument(
        "--kubeconfig", default=default, help="kubeconfig file (else $KUBECONFIG, ~/.kube/config, in-cluster)"
    )
    group.add_argument(
        "--context", default=default, help="kubeconfig context to use instead of current-context"
    )
    group.add_argument(
        "--request-timeout",
        type=positive,
        default=argparse.SUPPRESS if suppress else 30.0,
        metavar="SECONDS",
        help="deadline of each request to the API server (default 30)",
    )


def _sub(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, epilog: str = ""
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help=help, description=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _connection_flags(parser, suppress=True)
    return parser


def _target(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("-n", "--namespace", required=True, help=f"namespace of the {what}")
    parser.add_argument("--name", required=True, help=f"name of the {what} (an RFC 1123 DNS subdomain)")


def _scope(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-n", "--namespace", help="only this namespace (default: all namespaces)")
    group.add_argument("-A", "--all-namespaces", action="store_true", help="all namespaces (the default)")
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")


def _pod_labels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pod-labels",
        required=True,
        nargs="+",
        action="extend",
        metavar="LABELS",
        help="KEY=VALUE[,KEY=VALUE...]: labels of the pods that bypass NMI (one matching label is enough)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage Azure AD pod identities (aadpodidentity.k8s.io/v1) as 'az aks pod-identity' "
        "does on AKS, in any cluster.",
        epilog="Exit status: 0 success, 1 refused by the cluster (or unreachable), 2 bad usage or value.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _connection_flags(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add = _sub(
        commands,
        "add",
        "create a pod identity: an AzureIdentity NAME and its AzureIdentityBinding NAME-binding",
        "Pods use it with the label aadpodidbinding=<selector> (the selector defaults to NAME).",
    )
    _target(add, "pod identity")
    add.add_argument(
        "--identity-resource-id", metavar="RESOURCE_ID", help="ARM ID of the user-assigned identity"
    )
    add.add_argument("--client-id", required=True, help="client (application) ID of the identity, a GUID")
    add.add_argument(
        "--binding-selector", metavar="SELECTOR", help="value of the pods' aadpodidbinding label"
    )
    add.add_argument(
        "--type",
        type=int,
        default=0,
        help="0 user-assigned managed identity (default), 1 service principal with secret, "
        "2 service principal with certificate, "
        "3 federated workload identity (the pods' service-account tokens)",
    )
    add.add_argument(
        "--tenant-id", help="tenant of a service principal (types 1, 2); optional for a federated one (3)"
    )
    add.add_argument(
        "--client-password-secret",
        metavar="[NAMESPACE/]NAME",
        help="Secret holding the service principal's secret or certificate (types 1 and 2)",
    )

    delete = _sub(
        commands, "delete", "delete a pod identity: its AzureIdentity and the bindings that name it"
    )
    _target(delete, "pod identity")

    _scope(_sub(commands, "list", "list pod identities with their client ID, resource ID and selectors"))

    exception = _sub(commands, "exception", "manage AzurePodIdentityExceptions (pods that bypass NMI)")
    actions = exception.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help in (
        ("add", "create an exception"),
        ("update", "replace an existing exception's pod labels"),
    ):
        sub = _sub(actions, name, help)
        _target(sub, "exception")
        _pod_labels(sub)
    _target(_sub(actions, "delete", "delete an exception"), "exception")
    _scope(_sub(actions, "list", "list exceptions"))
    return parser


# --- from arguments to a command -----------------------------------------------------------------


def prepare(args: argparse.Namespace) -> Command:
    """Validate everything the arguments say (``UsageError``) and return the command to run."""
    if args.command == "add":
        return _prepare_add(args)
    if args.command == "delete":
        ns, name = check_namespace(args.namespace), check_name(args.name)
        return lambda api: _lines(ops.delete_identity(api, ns, name))
    if args.command == "list":
        scope = _list_scope(args)
        fmt = args.output
        return lambda api: _list_identities(api, scope, fmt)
    action = args.action
    if action == "list":
        scope = _list_scope(args)
        fmt = args.output
        return lambda api: _list_exceptions(api, scope, fmt)
    ns, name = check_namespace(args.namespace), check_name(args.name)
    if action == "delete":
        return lambda api: _lines(ops.delete_exception(api, ns, name))
    labels = parse_pod_labels(args.pod_labels)
    if action == "add":
        return lambda api: _lines(ops.add_exception(api, ns, name, labels))
    return lambda api: _lines(ops.update_exception(api, ns, name, labels))


def _prepare_add(args: argparse.Namespace) -> Command:
    ns = check_namespace(args.namespace)
    name = check_identity_name(args.name)
    id_type = check_identity_type(args.type)
    client_id = check_client_id(args.client_id)
    selector = check_selector(args.binding_selector if args.binding_selector is not None else name)
    if id_type == IdentityType.USER_ASSIGNED_MSI:
        if args.identity_resource_id is None:
            raise UsageError("--identity-resource-id is required for a user-assigned identity (--type 0)")
        if args.tenant_id is not None or args.client_password_secret is not None:
            raise UsageError(
                "--tenant-id and --client-password-secret are for service principals (--type 1, 2)"
            )
        body = identity_body(
            ns,
            name,
            id_type=id_type,
            client_id=client_id,
            resource_id=check_resource_id(args.identity_resource_id),
        )
    elif id_type == IdentityType.FEDERATED:
        # Federated with the service accounts of the pods it is bound to: no secret, no resource ID.
        if args.identity_resource_id is not None or args.client_password_secret is not None:
            raise UsageError(
                "--type 3 (federated) takes only --client-id and, optionally, --tenant-id: the pods' "
                "service-account tokens are its credential"
            )
        body = identity_body(ns, name, id_type=id_type, client_id=client_id, tenant_id=args.tenant_id or "")
    else:
        if args.identity_resource_id is not None:
            raise UsageError(
                f"--identity-resource-id is for user-assigned identities, not --type {int(id_type)}"
            )
        if not args.tenant_id or args.client_password_secret is None:
            raise UsageError(f"--type {int(id_type)} needs --tenant-id and --client-password-secret")
        body = identity_body(
            ns,
            name,
            id_type=id_type,
            client_id=client_id,
            tenant_id=args.tenant_id,
            secret=check_secret_ref(args.client_password_secret, ns),
        )
    request = ops.AddIdentity(namespace=ns, name=name, selector=selector, identity=body)
    return lambda api: _lines(ops.add_identity(api, request))


def _list_scope(args: argparse.Namespace) -> str | None:
    return check_namespace(args.namespace) if args.namespace else None


async def _lines(pending: Awaitable[list[str]]) -> Output:
    return Output(lines=await pending)


async def _list_identities(api: ops.Api, namespace: str | None, fmt: str) -> Output:
    rows, warnings = await ops.list_identities(api, namespace)
    if fmt in ("json", "yaml"):
        return Output(
            [dump([identity_record(r) for r in rows], "json" if fmt == "json" else "yaml")], warnings
        )
    if not rows:
        return Output([], warnings, _none_found("pod identities", namespace))
    return Output([identity_table(rows)], warnings)


async def _list_exceptions(api: ops.Api, namespace: str | None, fmt: str) -> Output:
    found, warnings = await ops.list_exceptions(api, namespace)
    if fmt in ("json", "yaml"):
        return Output(
            [dump([exception_record(e) for e in found], "json" if fmt == "json" else "yaml")], warnings
        )
    if not found:
        return Output([], warnings, _none_found("pod identity exceptions", namespace))
    return Output([exception_table(found)], warnings)


def _none_found(what: str, namespace: str | None) -> str:
    return f"No {what} found" + (f" in namespace {namespace}." if namespace else ".")


# --- running -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, command: Command) -> Output:
    settings = KubeSettings(
        user_agent=f"kubectl-pod_identity/{__version__}",
        request_timeout_s=args.request_timeout,
        connect_timeout_s=min(5.0, args.request_timeout),
    )
    connection = await connect(args.kubeconfig, args.context, settings)
    client = KubeClient(connection, settings)
    try:
        return await command(ops.Api(client, page_size=settings.list_page_size))
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad usage: argparse prints it and exits 2
    try:
        command = prepare(args)
        output = asyncio.run(run(args, command))
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    for warning in output.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if output.note:
        print(output.note, file=sys.stderr)
    for line in output.lines:
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
    return 0
