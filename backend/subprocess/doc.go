// Package subprocess is the development engine backend
// (ORCH_ENGINE_BACKEND=subprocess): every engine is the engine
// binary run as a local process, its brain volume a directory under
// ORCH_DATA_ROOT_PATH. No Docker is needed, so it is what `make run` uses on
// laptops without Docker and what the large health-sweep benchmarks run
// against. It is a real backend, not a test fake.
//
// # Layout
//
// Everything lives under <DataRoot>/engines/<engine_id>/:
//
//	data/         the "volume": the engine's SQLITE_DB_PATH is data/brain.sqlite
//	volume.json   when the volume was created
//	spec.json     the "container": the recorded spec (image, binary, port, env)
//	pid           the running process: pid + start time from /proc/<pid>/stat
//	stopped       marker left by Stop (Inspect says exited, not missing)
//	paused        marker left by Pause
//	exit.json     exit status of the last process, when it was observed
//	engine.log    the engine's stdout and stderr (engine.log.1: previous one)
//
// Because the state is on disk, a new orchestrator process on the same
// DataRoot adopts what the previous one left: List and Inspect report the
// running engines, and Stop, Pause and so on act on them.
//
// # Processes
//
// Engines run in their own process group (so ^C in `make run` does not
// kill them) and survive the death of the orchestrator process that started
// them. A pid is trusted only while /proc/<pid>/stat still shows the start
// time recorded at Start, so a recycled pid is never mistaken for an engine.
// Children this process started are reaped by a goroutine that emits a "die"
// event with the exit code (128+signal when killed by a signal, as Docker
// reports it); engines adopted from a previous orchestrator process are
// polled once a second while someone listens to Events, and their "die"
// carries ExitCode -1 (unknown), as does Inspect for them.
//
// # Differences from the Docker backend
//
//   - No automatic restart. Docker runs engines with restart policy
//     unless-stopped and restarts a crashed container by itself; this backend
//     never restarts a process. A crashed engine stays exited until the
//     orchestrator's health sweep and auto-restart start it again.
//   - No isolation: no resource limits, no capability dropping, no read-only
//     root filesystem, no network namespace. The engine listens on
//     127.0.0.1:<HostPort> (ENGINE_LISTEN_ADDR) instead of a published port.
//   - No mounts: SQLITE_DB_PATH and CATALOG_DIR are real host paths (the
//     caller's SQLITE_DB_PATH is overridden; CATALOG_DIR is set to
//     Config.CatalogMountPath when that is set). The catalog is not read-only.
//   - Images are labels: an image that is an absolute path to an executable is
//     run as the engine binary; any other image name (enginefleet/engine:1.2)
//     is recorded as the version but runs Config.EngineBinary.
//   - The child's environment is spec.Env plus ENGINE_LISTEN_ADDR, PATH, HOME
//     and TMPDIR; nothing else of the orchestrator's environment leaks in.
//     spec.json holds that environment (mode 0600), as Docker's container
//     config does.
//   - OOMKilled is never set, and there is no "oom" event.
//   - Per-engine operations are serialized inside one Backend; two
//     orchestrator processes must not drive the same engine at once (the
//     orchestrator's unique jobs guarantee that).
//
// Liveness and pid-recycling protection read /proc (Linux). Elsewhere (macOS)
// liveness falls back to kill(pid, 0) and Pause cannot confirm the stop.
package subprocess
