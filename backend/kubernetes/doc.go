// Package kubernetes runs engines on a Kubernetes cluster: the
// implementation of orchestrator.Backend behind ORCH_ENGINE_BACKEND=kubernetes.
// It is the only package that imports client-go, as backend/docker is the
// only one that imports the Docker SDK.
//
// # Objects
//
// One engine is, in the configured namespace, all named from its id and all
// carrying the orchestrator labels (managed, engine_id, product_id, node):
//
//   - Secret engine-<id>: the engine's whole environment (ENGINE_KEY_HASH,
//     the _PREVIOUS overlap variables, the passthrough provider keys,
//     SQLITE_DB_PATH, ...). The pod takes it with envFrom, so no value is
//     ever written into a pod spec. Its annotations are also the engine's
//     record: the spec hash, image, host port and whether the engine was
//     stopped (with its last exit code), which is what Inspect reports while
//     no pod exists;
//   - PersistentVolumeClaim engine-data-<id>: the brain, mounted at /data.
//     It survives Stop, sleep, restart, upgrade and key rotation and is
//     removed only by RemoveVolume;
//   - Pod engine-<id>: the engine itself, hardened (non-root uid 65532,
//     read-only root filesystem, every capability dropped, no privilege
//     escalation, seccomp RuntimeDefault, no service-account token, no
//     service links; /tmp is a memory-backed emptyDir), with requests and
//     limits, readiness and liveness probes on GET /health :8000 and a
//     startup probe that gives a slow boot a minute;
//   - Service engine-<id>: a stable address, engine-<id>.<namespace>.svc:8000
//     (ORCH_ENGINE_URL_TEMPLATE=http://engine-{engine_id}.<namespace>.svc:8000);
//   - NetworkPolicy engine-<id>: ingress to the engine's port only from the
//     orchestrator's pods and the configured product peers; engines, never
//     selected by those peers, cannot reach one another.
//
// # A Pod, not a StatefulSet
//
// The orchestrator is already the controller of its engines: Postgres holds
// the wanted state, workers converge the backend to it, the reconciler
// repairs drift and the health sweep restarts what is unhealthy. A
// one-replica StatefulSet would be a second controller with its own idea of
// the pod: it would recreate a pod Stop just deleted unless scaled to zero
// first, roll it on its own schedule when its template changes, and hide the
// replace-on-spec-change decision Ensure must take (adopt when the spec hash
// matches, replace otherwise, exactly as with Docker). A bare Pod with
// restartPolicy Always gives what the Docker backend gets from
// unless-stopped (the kubelet restarts a crashed engine in place, with the
// restart count and last exit code in its status), and its absence means
// "stopped" unambiguously. What a StatefulSet would add, rescheduling away
// from a lost node, the orchestrator does itself: the pod is reported
// exited, and the worker's Start creates it again (the claim's volume
// decides where it may go).
//
// # Lifecycle
//
// Ensure writes the Secret, the claim, the Service and the NetworkPolicy,
// replacing the pod (deleted with ReplaceGrace) when the spec hash changed;
// it creates no pod, so a freshly ensured engine is "created". Start creates
// the pod and waits, within StartTimeout, until it is scheduled (a claim
// that does not bind, or a pod no node can take, is reported with the
// cause) and its container runs; an image that cannot be pulled
// (ErrImagePull, ImagePullBackOff, InvalidImageName) removes the pod again
// and wraps orchestrator.ErrImageUnavailable. Stop deletes the pod with the
// given grace (SIGTERM, then SIGKILL) and keeps everything else.
//
// Reads (Inspect, List, Events) are served from informer caches of this
// node's pods, secrets and claims; every write waits until the caches have
// seen it, so a process reads its own writes. The decisions of Ensure,
// Start and Stop read the API live, since another worker process may have
// acted a moment ago.
//
// # Not on Kubernetes
//
// Pause, Unpause, CopyDataOut and CopyDataIn return ErrNotSupported: there
// is no freezer and no tar access to a claim from the API. Backups on this
// backend go through the engine's own GET /memory/export and
// POST /memory/import.
//
// # Permissions
//
// The orchestrator's service account needs, in the engines' namespace only,
// the Role in deploy/kubernetes/orchestrator-rbac.yaml: pods and claims
// (get, list, watch, create, delete), secrets (the same and update),
// services (get, create, delete), networkpolicies (get, create, update,
// delete) and events (list). A test runs the whole lifecycle with exactly
// that Role.
//
// # Errors
//
// Errors name what was being done and wrap one of ErrUnreachable (the API
// server does not answer), ErrForbidden (RBAC refuses the orchestrator's
// service account), ErrQuotaExceeded (a ResourceQuota refuses the pod or
// the claim), ErrVolumeNotBound (the claim stayed pending),
// orchestrator.ErrImageUnavailable or ErrNotFound, so callers and operators
// can tell them apart. Environment values never appear in errors or logs.
package kubernetes
