"""The demo (``scripts/demo``): NMI on a sandbox node, pods asking for tokens as an Azure SDK does.

Brings ``nmi-sandbox`` up from ``examples/workload-identity.yaml``, then from inside the pods calls
the metadata address and checks every answer it shows: ``web`` gets a token and then a cached
one, ``batch`` is denied, ``node-agent`` passes through to the (stand-in) IMDS, a request
without ``Metadata: true`` is refused, ``wi-app`` (workload identity) gets its service account's
app's token by federation (TokenRequest at the API server stand-in, exchange at the Azure AD
stand-in) and never another identity's; then a few metrics. Everything is torn down at the end,
also on Ctrl-C, SIGTERM or failure. Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from standins._jwt import claims_of
from standins.netns import HELPER, HarnessError, cleanup_prefix, require_netns
from standins.sandbox import METADATA_IP, TOKEN_PATH, Sandbox, SandboxError

PREFIX = "nmi-demo"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "workload-identity.yaml"
RESOURCE = "https://vault.azure.net"
TOKEN_URL = f"http://{METADATA_IP}{TOKEN_PATH}?" + urlencode(
    {"api-version": "2018-02-01", "resource": RESOURCE}, safe=":/"
)
SHOWN_METRICS = (
    "aadpodidentity_nmi_operations_duration_seconds_count",
    "nmi_token_cache_requests_total",
    "nmi_identity_decisions_total",
)
WEB_CLIENT_ID = "6f1c3e2a-52b4-4d0e-9a57-2b7c0d1e4f10"


@dataclass
class Answer:
    status: int | None
    """``None`` when no HTTP answer came (connection refused, timeout)."""
    text: str
    error: str = ""

    def json(self) -> Any:
        try:
            return json.loads(self.text)
        except ValueError:
            return None


class Demo:
    def __init__(self, sandbox: Sandbox, *, client: str) -> None:
        self.sandbox = sandbox
        self.client = client
        self.failures: list[str] = []
        self.checks = 0
        self.tty = sys.stdout.isatty()

    # --- output ----------------------------------------------------------------------------

    def bold(self, text: str) -> str:
        return f"\033[1m{text}\033[0m" if self.tty else text

    def step(self, title: str) -> None:
        print(f"\n{self.bold(title)}", flush=True)

    def say(self, text: str) -> None:
        print(f"    {text}", flush=True)

    def check(self, ok: bool, good: str, bad: str) -> bool:
        self.checks += 1
        if ok:
            self.say(f"✓ {good}")
        else:
            self.failures.append(bad)
            self.say(f"✗ UNEXPECTED: {bad}")
        return ok

    # --- requests from inside the pods --------------------------------------------------------

    def command(self, url: str, *, metadata: bool) -> list[str]:
        """What a pod runs: curl when the machine has it, else this package's tiny client."""
        if self.client == "curl":
            header = ["-H", "Metadata: true"] if metadata else []
            return ["curl", "-sS", "--noproxy", "*", "--max-time", "10", *header, url]
        path = url.split(METADATA_IP, 1)[1]
        return [*HELPER, "client", METADATA_IP, "80", "--path", path, "--timeout", "10"] + (
            [] if metadata else ["--no-metadata"]
        )

    def shown(self, pod: str, url: str, *, metadata: bool) -> str:
        if self.client == "curl":
            argv = self.command(url, metadata=metadata)
            argv = [a for a in argv if a not in ("-sS", "--noproxy", "*", "--max-time", "10")]
            return f"{pod}$ {shlex.join(argv)}"
        header = "Metadata: true" if metadata else "no Metadata header"
        return f"{pod}: GET {url}  [{header}]  (no curl here: Python's http.client)"

    def fetch(self, pod: str, url: str, *, metadata: bool = True) -> Answer:
        self.say(self.shown(pod, url, metadata=metadata))
        argv = self.command(url, metadata=metadata)
        if self.client == "curl":
            argv[1:1] = ["-w", "\n%{http_code}"]
            result = self.sandbox.run(self.sandbox.pod(pod).netns or "", argv, timeout=20)
            body, _, code = result.stdout.rpartition("\n")
            if result.returncode != 0 or not code.isdigit() or code == "000":
                return Answer(None, "", result.stderr.strip() or f"curl exited {result.returncode}")
            return Answer(int(code), body)
        result = self.sandbox.run(self.sandbox.pod(pod).netns or "", argv, timeout=20)
        parsed = json.loads(result.stdout)
        if not parsed["ok"]:
            return Answer(None, "", parsed["error"])
        body = parsed["body"]
        return Answer(parsed["status"], body if isinstance(body, str) else json.dumps(body))

    def show_answer(self, answer: Answer) -> None:
        if answer.status is None:
            self.say(f"-> no answer: {answer.error}")
            return
        body = answer.json()
        if isinstance(body, dict) and "access_token" in body:
            token = str(body["access_token"])
            body = {**body, "access_token": f"{token[:24]}…({len(token)} chars)"}
        text = json.dumps(body, ensure_ascii=False) if body is not None else answer.text.strip()
        self.say(f"-> {answer.status} {text}")

    # --- the stand-in and the metrics ---------------------------------------------------------

    def imds_requests(self) -> list[dict[str, Any]]:
        return self.sandbox.imds_requests()

    def metric(self, text: str, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def cache_hits(self) -> float:
        return self.metric(self.sandbox.metrics(), "nmi_token_cache_requests_total", result="hit")

    # --- the story -----------------------------------------------------------------------

    def run(self) -> None:
        self.bound_pod()
        self.unbound_pod()
        self.excepted_pod()
        self.no_metadata_header()
        if self.sandbox.kube is not None:
            self.workload_identity()
        self.metrics()

    def bound_pod(self) -> None:
        self.step("(a) pod web, bound to the user-assigned identity web-identity, asks for a Key Vault token")
        hits_before = self.cache_hits()
        first = self.fetch("web", TOKEN_URL)
        self.show_answer(first)
        body = first.json()
        token = body.get("access_token") if isinstance(body, dict) else None
        claims: dict[str, Any] = {}
        with contextlib.suppress(ValueError, TypeError):
            claims = claims_of(str(token))
        web_client_id = WEB_CLIENT_ID
        self.check(
            first.status == 200 and claims.get("appid") == web_client_id and claims.get("aud") == RESOURCE,
            f"a token of web-identity (appid {web_client_id[:8]}…, aud {RESOURCE}), fetched by NMI from IMDS",
            f"expected 200 and a token of web-identity, got {first.status} {first.text[:200]}{first.error}",
        )
        self.say("the same request again:")
        second = self.fetch("web", TOKEN_URL)
        second_body = second.json()
        same = isinstance(second_body, dict) and second_body.get("access_token") == token
        self.say(f"-> {second.status}, {'the same token' if same else 'a different answer'}")
        hits_after = self.cache_hits()
        token_requests = self.imds_requests()
        self.check(
            second.status == 200 and same and hits_after == hits_before + 1 and len(token_requests) == 1,
            f'served from NMI\'s cache: nmi_token_cache_requests{{result="hit"}} {hits_before:g} -> '
            f"{hits_after:g}; the IMDS stand-in received {len(token_requests)} token request in all",
            f"expected the cached token: status {second.status}, same token {same}, cache hits "
            f"{hits_before:g} -> {hits_after:g}, IMDS token requests {len(token_requests)}",
        )

    def unbound_pod(self) -> None:
        self.step("(b) pod batch, bound to no identity, asks the same")
        before = len(self.imds_requests())
        answer = self.fetch("batch", TOKEN_URL)
        self.show_answer(answer)
        body = answer.json()
        self.check(
            answer.status == 400
            and isinstance(body, dict)
            and body.get("error") == "invalid_request"
            and str(body.get("error_description", "")).startswith("Identity not found")
            and len(self.imds_requests()) == before,
            "denied at once with IMDS's own final answer (400 Identity not found); nothing reached IMDS",
            f"expected a 400 'Identity not found', no IMDS request; got {answer.status} {answer.text[:160]}",
        )

    def excepted_pod(self) -> None:
        self.step("(c) pod node-agent, matched by an AzurePodIdentityException, asks the same")
        before = len(self.imds_requests())
        answer = self.fetch("node-agent", TOKEN_URL)
        self.show_answer(answer)
        new = self.imds_requests()[before:]
        claims: dict[str, Any] = {}
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            claims = claims_of(str(answer.json().get("access_token")))
        pod_ip = self.sandbox.pod("node-agent").ip
        peers = sorted({str(r["peer"]) for r in new})
        self.say(f"IMDS stand-in: {len(new)} new token request(s), from {', '.join(peers) or 'nobody'}")
        self.check(
            answer.status == 200
            and len(new) == 1
            and new[0]["status"] == 200
            and pod_ip not in peers
            and claims.get("appid") == new[0]["client_id"],
            f"passed through to IMDS by the node (not from the pod's {pod_ip}): the IMDS answer, "
            f"a token of the VM's own identity (appid {str(claims.get('appid'))[:8]}…)",
            f"expected the IMDS answer via the node, got {answer.status} {answer.text[:200]}; requests {new}",
        )

    def no_metadata_header(self) -> None:
        self.step(
            "(d) pod web asks without the 'Metadata: true' header (what a server-side request forgery does)"
        )
        answer = self.fetch("web", TOKEN_URL, metadata=False)
        self.show_answer(answer)
        body = answer.json()
        self.check(
            answer.status == 400 and isinstance(body, dict) and body.get("error") == "invalid_request",
            "refused with 400, as IMDS does",
            f"expected 400 invalid_request, got {answer.status} {answer.text[:200]}",
        )

    def workload_pod(self) -> tuple[str, str, str] | None:
        """The first pod labelled for workload identity whose service account is federated:
        (pod, service account, client ID)."""
        from nmi.cluster_file import load
        from podidentity.model import WORKLOAD_IDENTITY_LABEL, Pod

        kube = self.sandbox.kube or {}
        clients = {f["subject"]: f["client_id"] for f in kube.get("federation", [])}
        for obj in load(self.sandbox.state["cluster_state"]):
            if isinstance(obj, Pod) and obj.labels.get(WORKLOAD_IDENTITY_LABEL) == "true":
                client = clients.get(f"system:serviceaccount:{obj.namespace}:{obj.service_account}")
                if client and any(p.name == obj.name and p.netns for p in self.sandbox.pods()):
                    return obj.name, obj.service_account, client
        return None

    def workload_identity(self) -> None:
        found = self.workload_pod()
        if found is None:
            return
        pod, account, client_id = found
        tenant = str((self.sandbox.kube or {}).get("tenant"))
        self.step(
            f"(e) pod {pod}, workload identity: labelled azure.workload.identity/use, its service account "
            f"{account} annotated with client {client_id[:8]}…, asks the same"
        )
        imds_before = len(self.imds_requests())
        before = self.sandbox.exchanges()
        answer = self.fetch(pod, TOKEN_URL)
        self.show_answer(answer)
        body = answer.json()
        claims: dict[str, Any] = {}
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            claims = claims_of(str(body.get("access_token")))
        after = self.sandbox.exchanges()
        self.check(
            answer.status == 200
            and claims.get("appid") == client_id
            and claims.get("tid") == tenant
            and claims.get("aud") == RESOURCE
            and len(self.imds_requests()) == imds_before,
            f"a token of the app its service account names (appid {client_id[:8]}…, tenant "
            f"{tenant[:8]}…), from Azure AD by federation: the IMDS stand-in received nothing",
            f"expected 200 and a token of {client_id}, got {answer.status} {answer.text[:200]}{answer.error}",
        )
        issued = after["token_requests"][len(before["token_requests"]) :]
        calls = after["aad_calls"][len(before["aad_calls"]) :]
        subject = f"system:serviceaccount:default:{account}"
        for token in issued:
            account_key = f"{token['namespace']}/{token['service_account']}"
            self.say(f"NMI -> API server: TokenRequest for {account_key}, bound to pod {token['pod']}")
            self.say(
                f"   <- a service-account token: iss {token['iss']}, sub {token['sub']}, "
                f"aud {', '.join(token['aud'])}"
            )
        for call in calls:
            self.say(
                f"NMI -> Azure AD: that token as client assertion for {call['client_id'][:8]}…; "
                f"federated credential matched (sub {call['federated_subject']}) -> {call['status']}"
            )
        self.check(
            len(issued) == 1
            and issued[0]["sub"] == subject
            and issued[0]["iss"] == after["issuer"]
            and issued[0]["pod"] == pod
            and "api://AzureADTokenExchange" in issued[0]["aud"]
            and len(calls) == 1
            and calls[0]["federated_subject"] == subject
            and calls[0]["status"] == 200,
            f"one service-account token of {account}, bound to the pod, exchanged once at Azure AD",
            f"expected one TokenRequest for {subject} and one exchange; got {issued} and {calls}",
        )
        self.say(f"{pod} names web-identity's client ID instead:")
        named = TOKEN_URL + f"&client_id={WEB_CLIENT_ID}"
        other = self.fetch(pod, named)
        self.show_answer(other)
        other_body = other.json()
        self.check(
            other.status == 400
            and isinstance(other_body, dict)
            and str(other_body.get("error_description", "")).startswith("Identity not found"),
            "refused at once (400 Identity not found): a pod gets its own service account's app and no other",
            f"expected a 400 'Identity not found', got {other.status} {other.text[:200]}{other.error}",
        )

    def metrics(self) -> None:
        label = "f" if self.sandbox.kube is not None else "e"
        self.step(f"({label}) NMI's metrics (node netns, http://127.0.0.1:9090/metrics), a few lines")
        text = self.sandbox.metrics()
        lines = [line for line in text.splitlines() if line.startswith(SHOWN_METRICS)]
        for line in lines:
            self.say(line)
        self.check(
            all(any(line.startswith(name) for line in lines) for name in SHOWN_METRICS)
            and self.metric(text, "nmi_token_cache_requests_total", result="hit") >= 1,
            "the requests above are counted",
            f"expected samples of {', '.join(SHOWN_METRICS)} and a cache hit",
        )


def _client_choice(wanted: str) -> str:
    if wanted == "auto":
        return "curl" if shutil.which("curl") else "python"
    return wanted


@contextlib.contextmanager
def _interrupts_unwind() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP unwind, so the ``finally`` below always tears down."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _teardown(sandbox: Sandbox | None, prefix: str, state_dir: Path) -> None:
    # Teardown is not interruptible: a second Ctrl-C would leave namespaces and processes behind.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    started = time.monotonic()
    try:
        target = sandbox or Sandbox.load(prefix, state_dir)
        if target is not None:
            target.down()
    finally:
        cleanup_prefix(f"{prefix}-")
    print(
        f"\ntorn down in {time.monotonic() - started:.1f}s: NMI and the stand-ins stopped, namespaces deleted"
    )


def _remove_stale(prefix: str, state_dir: Path) -> None:
    stale = Sandbox.load(prefix, state_dir)
    if stale is None:
        return
    owner = int(stale.state.get("owner_pid", 0))
    if owner and owner != os.getpid() and Path(f"/proc/{owner}").exists():
        raise SandboxError(f"another demo (pid {owner}) is running; wait for it or stop it")
    print(f"removing a demo sandbox left behind by an interrupted run (pid {owner})")
    stale.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m standins.demo", description=__doc__)
    parser.add_argument("--cluster-state", type=Path, default=EXAMPLE)
    parser.add_argument("--mode", choices=["standard", "managed"], default="standard")
    parser.add_argument("--client", choices=["auto", "curl", "python"], default="auto")
    parser.add_argument("--prefix", default=PREFIX)
    parser.add_argument("--state-dir", type=Path, default=Path("/run/nmi-sandbox"))
    args = parser.parse_args(argv)
    with contextlib.suppress(AttributeError):
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    try:
        require_netns()
    except HarnessError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    started = time.monotonic()
    sandbox: Sandbox | None = None
    demo: Demo | None = None
    code = 1
    crashed = False
    try:
        with _interrupts_unwind():
            _remove_stale(args.prefix, args.state_dir)
            print(
                "NMI demo: a node and its pods in network namespaces on this machine, "
                f"from {args.cluster_state.name}"
            )
            print(
                "(no cluster, no Azure: stand-ins play IMDS on 169.254.169.254 and, for workload identity, "
                "the API server and Azure AD; NMI is the real daemon)"
            )
            sandbox = Sandbox.up(
                args.cluster_state, mode=args.mode, prefix=args.prefix, state_dir=args.state_dir
            )
            describe(sandbox, time.monotonic() - started)
            demo = Demo(sandbox, client=_client_choice(args.client))
            demo.run()
            code = 1 if demo.failures else 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    except (SandboxError, HarnessError) as exc:
        sys.stdout.flush()
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        crashed = True
    finally:
        _teardown(sandbox, args.prefix, args.state_dir)
    if demo is not None and code != 130:
        if crashed:
            verdict = "stopped by the error above"
        else:
            verdict = "all passed" if not demo.failures else f"{len(demo.failures)} FAILED"
        print(f"{demo.checks} checks, {verdict}, in {time.monotonic() - started:.1f}s")
        for failure in demo.failures:
            print(f"  ✗ {failure}")
    return code


def describe(sandbox: Sandbox, elapsed: float) -> None:
    state = sandbox.state
    pods = "  ".join(f"{p.key} {p.ip}" for p in sandbox.pods() if p.netns)
    print(f"\nsandbox up in {elapsed:.1f}s: node {state['node_name']} = netns {sandbox.node_ns}, ", end="")
    print(f"bridge {state['bridge_ip']} ({state['subnet']}), {state['mode']} mode")
    print(f"    pods: {pods}")
    print(
        f"    IMDS stand-in on {state['metadata']}, NMI on 127.0.0.1:{state['ports']['nmi']}; "
        "its rules (nat):"
    )
    for line in sandbox.nat_rules().splitlines():
        if "aad-metadata" in line and not line.startswith(":"):
            print(f"      {line}")
    kube = sandbox.kube
    if kube is not None:
        print(
            f"    NMI reads the cluster from the API server stand-in {kube['api']} (TLS; issuer "
            f"{kube['issuer']}) and exchanges tokens at the Azure AD stand-in {kube['authority']} (TLS), "
            "where " + "; ".join(f"{f['client_id'][:8]}… trusts {f['subject']}" for f in kube["federation"])
        )


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
