package workers

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivertest"
	"github.com/stretchr/testify/require"

	orch "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/enginefleet/orchestrator/keys"
	"github.com/enginefleet/orchestrator/schema"
)

// fakeBackend is an in-memory orch.Backend for the edge cases a real
// backend cannot easily be made to hit: an engine is a map entry, running
// as soon as it is started; its volume is a tar stream in memory. Its
// /health is served by the rig's HTTP server: healthy while it runs
// unpaused, unless it is marked sick or its brain holds brokenBrain.
// Failures and hooks are injected per method.
type fakeBackend struct {
	mu      sync.Mutex
	engines map[string]*fakeEngine
	volumes map[string][]byte
	sick    map[string]bool
	hang    map[string]bool    // /health never answers
	fails   map[string][]error // method → errors returned by its next calls, in order
	hooks   map[string]func(ctx context.Context, engineID string)
	calls   []string // "Method engine-id", in order
}

type fakeEngine struct {
	spec   orch.EngineSpec
	state  orch.RuntimeState
	paused bool
}

// brokenBrain in a volume makes its engine answer /health with 503.
const brokenBrain = "broken brain"

func newFakeBackend() *fakeBackend {
	return &fakeBackend{engines: map[string]*fakeEngine{}, volumes: map[string][]byte{}, sick: map[string]bool{}, hang: map[string]bool{},
		fails: map[string][]error{}, hooks: map[string]func(context.Context, string){}}
}

// failNext makes the next calls of method return errs, one each.
func (b *fakeBackend) failNext(method string, errs ...error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.fails[method] = append(b.fails[method], errs...)
}

// on runs fn at the start of every call of method.
func (b *fakeBackend) on(method string, fn func(ctx context.Context, engineID string)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.hooks[method] = fn
}

// enter records a call, runs its hook and returns its injected failure.
func (b *fakeBackend) enter(ctx context.Context, method, id string) error {
	b.mu.Lock()
	b.calls = append(b.calls, method+" "+id)
	hook := b.hooks[method]
	var err error
	if errs := b.fails[method]; len(errs) > 0 {
		err, b.fails[method] = errs[0], errs[1:]
	}
	b.mu.Unlock()
	if hook != nil {
		hook(ctx, id)
	}
	return err
}

// called reports how many times method was called.
func (b *fakeBackend) called(method string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, c := range b.calls {
		if strings.HasPrefix(c, method+" ") {
			n++
		}
	}
	return n
}

func (b *fakeBackend) Name() string { return "fake" }

func (b *fakeBackend) Ensure(ctx context.Context, spec orch.EngineSpec) error {
	if err := b.enter(ctx, "Ensure", spec.EngineID); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if e := b.engines[spec.EngineID]; e != nil && e.spec.Image == spec.Image && e.spec.HostPort == spec.HostPort {
		e.spec = spec
		return nil
	}
	b.engines[spec.EngineID] = &fakeEngine{spec: spec, state: orch.RuntimeCreated}
	if _, ok := b.volumes[spec.EngineID]; !ok {
		b.volumes[spec.EngineID] = nil
	}
	return nil
}

func (b *fakeBackend) Start(ctx context.Context, id string) error {
	if err := b.enter(ctx, "Start", id); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	e := b.engines[id]
	if e == nil {
		return fmt.Errorf("start %s: no such engine", id)
	}
	e.state = orch.RuntimeRunning
	return nil
}

func (b *fakeBackend) Stop(ctx context.Context, id string, _ time.Duration) error {
	if err := b.enter(ctx, "Stop", id); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if e := b.engines[id]; e != nil {
		e.state, e.paused = orch.RuntimeExited, false
	}
	return nil
}

func (b *fakeBackend) RemoveContainer(ctx context.Context, id string) error {
	if err := b.enter(ctx, "RemoveContainer", id); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.engines, id)
	return nil
}

func (b *fakeBackend) RemoveVolume(ctx context.Context, id string) error {
	if err := b.enter(ctx, "RemoveVolume", id); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.volumes, id)
	return nil
}

func (b *fakeBackend) Inspect(ctx context.Context, id string) (orch.RuntimeInfo, error) {
	if err := b.enter(ctx, "Inspect", id); err != nil {
		return orch.RuntimeInfo{}, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	e := b.engines[id]
	if e == nil {
		return orch.RuntimeInfo{EngineID: id, State: orch.RuntimeMissing}, nil
	}
	return orch.RuntimeInfo{EngineID: id, ProductID: e.spec.ProductID, Name: orch.ContainerName(id), State: e.state,
		Image: e.spec.Image, HostPort: e.spec.HostPort}, nil
}

func (b *fakeBackend) List(ctx context.Context) ([]orch.RuntimeInfo, []orch.VolumeInfo, error) {
	if err := b.enter(ctx, "List", ""); err != nil {
		return nil, nil, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	var rts []orch.RuntimeInfo
	for id, e := range b.engines {
		rts = append(rts, orch.RuntimeInfo{EngineID: id, ProductID: e.spec.ProductID, State: e.state, Image: e.spec.Image})
	}
	var vols []orch.VolumeInfo
	for id := range b.volumes {
		vols = append(vols, orch.VolumeInfo{EngineID: id})
	}
	return rts, vols, nil
}

func (b *fakeBackend) Pause(ctx context.Context, id string) error {
	if err := b.enter(ctx, "Pause", id); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if e := b.engines[id]; e != nil {
		e.paused = e.state == orch.RuntimeRunning
	}
	return nil
}

func (b *fakeBackend) Unpause(ctx context.Context, id string) error {
	if err := b.enter(ctx, "Unpause", id); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if e := b.engines[id]; e != nil {
		e.paused = false
	}
	return nil
}

func (b *fakeBackend) CopyDataOut(ctx context.Context, id string, w io.Writer) error {
	if err := b.enter(ctx, "CopyDataOut", id); err != nil {
		return err
	}
	b.mu.Lock()
	vol, ok := b.volumes[id]
	b.mu.Unlock()
	if !ok {
		return fmt.Errorf("copy out %s: no such volume", id)
	}
	_, err := w.Write(vol)
	return err
}

func (b *fakeBackend) CopyDataIn(ctx context.Context, id, _ string, r io.Reader) error {
	if err := b.enter(ctx, "CopyDataIn", id); err != nil {
		return err
	}
	vol, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.engines, id) // the contract: the container goes; the caller Ensures it again
	b.volumes[id] = vol
	return nil
}

func (b *fakeBackend) Events(ctx context.Context) (<-chan orch.RuntimeEvent, error) {
	ch := make(chan orch.RuntimeEvent)
	go func() { <-ctx.Done(); close(ch) }()
	return ch, nil
}

// volume returns an engine's volume.
func (b *fakeBackend) volume(id string) []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Clone(b.volumes[id])
}

// setVolume makes an engine's volume a tar holding one brain file.
func (b *fakeBackend) setVolume(t *testing.T, id, brain string) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	require.NoError(t, tw.WriteHeader(&tar.Header{Name: "brain.sqlite", Mode: 0o600, Size: int64(len(brain)), Typeflag: tar.TypeReg}))
	_, err := tw.Write([]byte(brain))
	require.NoError(t, err)
	require.NoError(t, tw.Close())
	b.mu.Lock()
	defer b.mu.Unlock()
	b.volumes[id] = buf.Bytes()
	return bytes.Clone(buf.Bytes())
}

// setSick makes an engine fail (or pass again) its probes.
func (b *fakeBackend) setSick(id string, sick bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.sick[id] = sick
}

// setHanging makes an engine's /health never answer (or answer again).
func (b *fakeBackend) setHanging(id string, hang bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.hang[id] = hang
}

// state is an engine's runtime state.
func (b *fakeBackend) state(id string) orch.RuntimeState {
	b.mu.Lock()
	defer b.mu.Unlock()
	if e := b.engines[id]; e != nil {
		return e.state
	}
	return orch.RuntimeMissing
}

// health serves GET /e/{engine_id}/health for the fake engines.
func (b *fakeBackend) health(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	b.mu.Lock()
	hang := b.hang[id]
	b.mu.Unlock()
	if hang {
		<-r.Context().Done()
		return
	}
	b.mu.Lock()
	e := b.engines[id]
	ok := e != nil && e.state == orch.RuntimeRunning && !e.paused && !b.sick[id] &&
		!bytes.Contains(b.volumes[id], []byte(brokenBrain))
	b.mu.Unlock()
	if !ok {
		http.Error(w, `{"status":"starting"}`, http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write([]byte(`{"status":"ok"}`)) //nolint:errcheck
}

// fakeRig is a Workers on a fresh database and a fakeBackend, with one
// product.
type fakeRig struct {
	w    *Workers
	be   *fakeBackend
	pool *pgxpool.Pool
	q    *schema.Queries
	p    orch.Product
	node string
	dir  string // ORCH_BACKUP_DIR
}

// newFakeRig builds the rig; tune adjusts the workers' Config.
func newFakeRig(t *testing.T, tune func(*Config)) *fakeRig {
	t.Helper()
	ctx := context.Background()
	r := &fakeRig{be: newFakeBackend(), pool: testenv.Pool(t, testenv.DB(t)), node: "fake-" + uuid.NewString()[:8], dir: t.TempDir()}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /e/{id}/health", r.be.health)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	cfg := Config{Node: r.node,
		Engines: EngineConfig{BootTimeout: 5 * time.Second, ProbeTimeout: time.Second, StopGrace: time.Second,
			ProbeURLTemplate: srv.URL + "/e/{engine_id}"},
		Backups: BackupConfig{Dir: r.dir}}
	if tune != nil {
		tune(&cfg)
	}
	r.w = New(cfg, r.pool, r.be, testenv.Quiet())
	r.q = schema.New(r.pool)
	var err error
	r.p, err = r.q.InsertProduct(ctx, "acme-"+r.node, "acme", orch.Policy{}, keys.Hash(keys.Generate()))
	require.NoError(t, err)
	return r
}

var fakePorts struct {
	sync.Mutex
	next int
}

// engine records an engine of user in status, running on the fake
// backend when status says it should (running, sleeping).
func (r *fakeRig) engine(t *testing.T, user string, status orch.State) orch.Engine {
	t.Helper()
	ctx := context.Background()
	fakePorts.Lock()
	fakePorts.next++
	port := 20000 + fakePorts.next
	fakePorts.Unlock()
	e := orch.Engine{ID: uuid.NewString(), ProductID: r.p.ID, UserID: user, Status: orch.StateProvisioning, Node: r.node,
		Port: port, EngineVersion: "enginefleet/engine:fake", KeyHash: keys.Hash(keys.Generate()), KeyEnc: "unused"}
	require.NoError(t, r.q.InsertEngine(ctx, e))
	if status == orch.StateProvisioning {
		return e
	}
	spec := r.w.r.currentSpec(e)
	require.NoError(t, r.be.Ensure(ctx, spec))
	r.be.setVolume(t, e.ID, "brain of "+user)
	if status == orch.StateRunning || status == orch.StateSleeping {
		require.NoError(t, r.be.Start(ctx, e.ID))
	}
	e, err := r.q.SetEngineState(ctx, e, schema.EngineChange{Status: orch.StateRunning})
	require.NoError(t, err)
	if status != orch.StateRunning {
		e, err = r.q.SetEngineState(ctx, e, schema.EngineChange{Status: status})
		require.NoError(t, err)
	}
	r.be.mu.Lock()
	r.be.calls = nil // the set-up is not what a test counts
	r.be.mu.Unlock()
	return e
}

// operation records a pending operation on e; owns points the engine's
// operation slot at it (every lifecycle operation does; a backup does not).
func (r *fakeRig) operation(t *testing.T, e orch.Engine, kind orch.OpKind, p schema.OpPayload, owns bool) orch.Operation {
	t.Helper()
	ctx := context.Background()
	op := orch.Operation{ID: uuid.NewString(), ProductID: e.ProductID, EngineID: e.ID, UserID: e.UserID, Kind: kind, Actor: "acme",
		Deadline: time.Now().Add(time.Hour)}
	require.NoError(t, r.q.InsertOperation(ctx, op, p, 0))
	if owns {
		cur, err := r.q.EngineByID(ctx, e.ID)
		require.NoError(t, err)
		_, err = r.q.SetEngineState(ctx, cur, schema.EngineChange{Status: cur.Status, OperationID: &op.ID})
		require.NoError(t, err)
	}
	return op
}

// op reads an operation back.
func (r *fakeRig) op(t *testing.T, id string) orch.Operation {
	t.Helper()
	op, _, err := r.q.OperationByID(context.Background(), id)
	require.NoError(t, err)
	return op
}

// row reads an engine back.
func (r *fakeRig) row(t *testing.T, id string) orch.Engine {
	t.Helper()
	e, err := r.q.EngineByID(context.Background(), id)
	require.NoError(t, err)
	return e
}

// audits returns the audit rows of an engine with action, oldest first,
// as their metadata.
func (r *fakeRig) audits(t *testing.T, engineID string, action orch.Action) []map[string]any {
	t.Helper()
	rows, err := r.pool.Query(context.Background(),
		`SELECT metadata FROM audit_log WHERE engine_id = $1 AND action = $2 ORDER BY id`, engineID, string(action))
	require.NoError(t, err)
	metas, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (map[string]any, error) {
		var m map[string]any
		err := row.Scan(&m)
		return m, err
	})
	require.NoError(t, err)
	return metas
}

// stealLease gives the engine's lease to another attempt, as the liveness
// rescuer lets the retry of an attempt presumed dead take it.
func (r *fakeRig) stealLease(ctx context.Context, t *testing.T, engineID string) {
	_, err := r.pool.Exec(context.WithoutCancel(ctx), `UPDATE engines SET lease_job_id = -424242, lease_attempt = 1,
		lease_owner = 'another-worker', lease_until = now() + interval '1 hour' WHERE id = $1`, engineID)
	if err != nil {
		t.Errorf("steal lease: %v", err)
	}
}

// testWorker is a River test worker for one of the rig's workers: it
// inserts and works jobs inside a transaction that the test rolls back
// (the workers' own reads and commits go through the pool, as in
// production).
func testWorker[T river.JobArgs](t *testing.T, r *fakeRig, w river.Worker[T]) (*rivertest.Worker[T, pgx.Tx], pgx.Tx) {
	t.Helper()
	ctx := context.Background()
	tw := rivertest.NewWorker(t, riverpgxv5.New(r.pool), &river.Config{Logger: testenv.Quiet()}, w)
	tx, err := r.pool.Begin(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { tx.Rollback(context.Background()) }) //nolint:errcheck
	return tw, tx
}

// errTransient is a backend failure a retry may not see again.
var errTransient = errors.New("daemon busy")
