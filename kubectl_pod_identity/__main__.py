"""``python -m kubectl_pod_identity`` runs the plugin as the console script does."""

from kubectl_pod_identity.cli import main

raise SystemExit(main())
