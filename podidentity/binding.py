"""When a binding gives a pod its identity: one rule for MIC (which assigns) and NMI (which waits
for the assignment, or decides by itself in managed mode). Pure."""

from __future__ import annotations

from podidentity.model import BINDING_LABEL, AzureIdentity, AzureIdentityBinding, Pod


def binds(
    binding: AzureIdentityBinding, identity: AzureIdentity, pod: Pod, *, force_namespaced: bool
) -> bool:
    """``binding`` selects ``pod`` (its selector equals the pod's non-empty ``aadpodidbinding`` label)
    for ``identity`` (the one it names, in its own namespace); namespaced — by the flag or the
    identity's annotation — pod, binding and identity must also share one namespace (mic-spec §3.4)."""
    label = pod.labels.get(BINDING_LABEL, "")
    if not label or binding.selector != label:
        return False
    if identity.namespace != binding.namespace or identity.name != binding.identity_name:
        return False
    return not (force_namespaced or identity.namespaced) or binding.namespace == pod.namespace
