"""``kubectl pod-identity``: what ``az aks pod-identity`` does on AKS, in any cluster.

A kubectl plugin (the console script ``kubectl-pod_identity``) that adds, deletes and lists pod
identities (an ``AzureIdentity`` with its ``AzureIdentityBinding``) and ``AzurePodIdentityException``
objects, with the checks AKS makes and nothing left half-created. It stands on the core
(``podidentity``) only: its object model, kubeconfig adapter and API client.

Modules: ``cli`` (arguments, exit codes), ``validation`` and ``objects`` (pure: checks, object
bodies, rendering), ``connect`` (which kubeconfig and context), ``operations`` (the API calls).
"""

__version__ = "0.1.0"
