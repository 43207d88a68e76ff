package docker_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	orchestrator "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/backend/docker"
)

const engineVersion = "backend-docker-test"

func TestLifecycle(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	b := newBackend(t)
	cli := rawClient(t)
	image := engineImage(t)
	e := newEngine(t, b, image)
	id := e.spec.EngineID

	info, err := b.Inspect(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeMissing, info.State)

	require.NoError(t, b.Ensure(ctx, e.spec))
	info, err = b.Inspect(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeInfo{
		EngineID:  id,
		ProductID: e.spec.ProductID,
		Name:      orchestrator.ContainerName(id),
		State:     orchestrator.RuntimeCreated,
		Image:     image,
		HostPort:  e.spec.HostPort,
		CreatedAt: info.CreatedAt,
	}, info)
	assert.WithinDuration(t, time.Now(), info.CreatedAt, time.Minute)
	first := containerID(t, cli, id)

	// Same spec again: adopted, not recreated.
	require.NoError(t, b.Ensure(ctx, e.spec))
	assert.Equal(t, first, containerID(t, cli, id), "second Ensure must adopt")

	// The container is what docs/engine-contract.md promises.
	raw, err := cli.ContainerInspect(ctx, first, client.ContainerInspectOptions{})
	require.NoError(t, err)
	c := raw.Container
	assert.True(t, c.HostConfig.ReadonlyRootfs)
	assert.Equal(t, []string{"ALL"}, c.HostConfig.CapDrop)
	assert.Contains(t, c.HostConfig.SecurityOpt, "no-new-privileges:true")
	assert.Equal(t, container.RestartPolicyUnlessStopped, c.HostConfig.RestartPolicy.Name)
	// Limits, and a user that is not left to the image.
	assert.Equal(t, docker.DefaultUser, c.Config.User)
	assert.Equal(t, docker.DefaultUser, c.Config.Labels[docker.LabelUser])
	assert.EqualValues(t, docker.DefaultMemoryMB<<20, c.HostConfig.Memory)
	assert.Equal(t, c.HostConfig.Memory, c.HostConfig.MemorySwap, "no swap")
	assert.EqualValues(t, docker.DefaultCPUs*1e9, c.HostConfig.NanoCPUs)
	require.NotNil(t, c.HostConfig.PidsLimit)
	assert.EqualValues(t, docker.DefaultPids, *c.HostConfig.PidsLimit)
	assert.Contains(t, c.HostConfig.Tmpfs, "/tmp")
	bindings := c.HostConfig.PortBindings[network.MustParsePort("8000/tcp")]
	require.Len(t, bindings, 1)
	assert.Equal(t, "127.0.0.1", bindings[0].HostIP.String())
	require.NotNil(t, c.Config.StopTimeout)
	assert.Equal(t, 30, *c.Config.StopTimeout)
	assert.Contains(t, c.Config.Env, "SQLITE_DB_PATH=/data/brain.sqlite")
	assert.Equal(t, "true", c.Config.Labels[orchestrator.LabelManaged])
	assert.Equal(t, id, c.Config.Labels[orchestrator.LabelEngineID])
	assert.Equal(t, e.spec.ProductID, c.Config.Labels[orchestrator.LabelProductID])
	assert.Equal(t, b.Config().Node, c.Config.Labels[orchestrator.LabelNode])
	assert.NotEmpty(t, c.Config.Labels[docker.LabelSpecHash])
	var dataMount *container.MountPoint
	for i := range c.Mounts {
		if c.Mounts[i].Destination == "/data" {
			dataMount = &c.Mounts[i]
		}
	}
	require.NotNil(t, dataMount, "volume at /data")
	assert.Equal(t, mount.TypeVolume, dataMount.Type)
	assert.Equal(t, orchestrator.VolumeName(id), dataMount.Name)
	assert.True(t, dataMount.RW)

	require.NoError(t, b.Start(ctx, id))
	require.NoError(t, b.Start(ctx, id), "starting a running engine is a no-op")
	e.waitHealthy(t)
	info, err = b.Inspect(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeRunning, info.State)
	e.addMemory(t, "the volume outlives the container")
	before := e.export(t)

	// A different env (a rotated key, say) replaces the container and
	// keeps the volume.
	changed := e.spec
	changed.Env = maps.Clone(e.spec.Env)
	changed.Env["ENGINE_EXTRA_SETTING"] = "1"
	require.NoError(t, b.Ensure(ctx, changed))
	second := containerID(t, cli, id)
	assert.NotEqual(t, first, second, "changed env must replace the container")
	info, err = b.Inspect(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeCreated, info.State)
	require.NoError(t, b.Start(ctx, id))
	e.waitHealthy(t)
	assert.JSONEq(t, string(before), string(e.export(t)), "data kept across replace")

	// Stop: SIGTERM, clean exit.
	require.NoError(t, b.Stop(ctx, id, 10*time.Second))
	info, err = b.Inspect(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeExited, info.State)
	assert.Equal(t, 0, info.ExitCode)
	assert.Equal(t, e.spec.HostPort, info.HostPort, "host port known while stopped")
	require.NoError(t, b.Stop(ctx, id, time.Second), "stopping a stopped engine is a no-op")

	// Ensure adopts a stopped container of the same spec.
	require.NoError(t, b.Ensure(ctx, changed))
	assert.Equal(t, second, containerID(t, cli, id))
	require.NoError(t, b.Start(ctx, id))
	e.waitHealthy(t)

	require.NoError(t, b.RemoveContainer(ctx, id))
	require.NoError(t, b.RemoveContainer(ctx, id), "removing twice is a no-op")
	info, err = b.Inspect(ctx, id)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeMissing, info.State)
	require.NoError(t, b.Stop(ctx, id, time.Second), "stopping a missing engine is a no-op")
	require.NoError(t, b.Pause(ctx, id), "pausing a missing engine is a no-op")
	require.NoError(t, b.Unpause(ctx, id))
	err = b.Start(ctx, id)
	require.Error(t, err)
	assert.ErrorIs(t, err, docker.ErrNotFound)

	_, vols, err := b.List(ctx)
	require.NoError(t, err)
	require.Len(t, vols, 1, "volume survives container removal")
	require.NoError(t, b.RemoveVolume(ctx, id))
	require.NoError(t, b.RemoveVolume(ctx, id), "removing twice is a no-op")
	runtimes, vols, err := b.List(ctx)
	require.NoError(t, err)
	assert.Empty(t, runtimes)
	assert.Empty(t, vols)
}

func TestRemoveVolumeInUse(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	b := newBackend(t)
	e := newEngine(t, b, engineImage(t))
	require.NoError(t, b.Ensure(ctx, e.spec))
	require.NoError(t, b.Start(ctx, e.spec.EngineID))

	// The running engine still mounts it: its container goes first.
	require.NoError(t, b.RemoveVolume(ctx, e.spec.EngineID))
	info, err := b.Inspect(ctx, e.spec.EngineID)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeMissing, info.State)
	_, vols, err := b.List(ctx)
	require.NoError(t, err)
	assert.Empty(t, vols)
}

func TestEnsureConcurrent(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	// A network of its own, created by racing "processes" (backends).
	netName := testNetwork + "_" + randHex(4)
	t.Cleanup(func() { dockertest.RemoveNetworkIfEmpty(netName) })
	first := newBackend(t, func(c *docker.Config) { c.Network = netName })
	backends := []*docker.Backend{first}
	for range 3 {
		backends = append(backends, newBackend(t, func(c *docker.Config) {
			c.Network = netName
			c.Node = first.Config().Node
		}))
	}
	e := newEngine(t, first, engineImage(t))

	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Go(func() { errs[i] = backends[i%len(backends)].Ensure(ctx, e.spec) })
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}

	cli := rawClient(t)
	nets, err := cli.NetworkList(ctx, client.NetworkListOptions{Filters: make(client.Filters).Add("name", netName)})
	require.NoError(t, err)
	var named []string
	for _, n := range nets.Items {
		if n.Name == netName {
			named = append(named, n.ID)
		}
	}
	assert.Len(t, named, 1, "one network despite concurrent creators")

	runtimes, vols, err := first.List(ctx)
	require.NoError(t, err)
	assert.Len(t, runtimes, 1)
	assert.Len(t, vols, 1)

	require.NoError(t, first.Start(ctx, e.spec.EngineID))
	e.waitHealthy(t)
}

func TestDuplicateNetworks(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	// Docker before API 1.44 lets two networks share a name (two
	// orchestrator processes racing at first boot may do that).
	netName := testNetwork + "_dup_" + randHex(4)
	t.Cleanup(func() { dockertest.RemoveNetworkIfEmpty(netName) })
	cli := rawClient(t)
	for range 2 {
		_, err := cli.NetworkCreate(ctx, netName, client.NetworkCreateOptions{
			Driver:  "bridge",
			Options: map[string]string{docker.OptionICC: "false"},
			Labels:  map[string]string{testLabel: "true"},
		})
		require.NoError(t, err)
	}
	b := newBackend(t, func(c *docker.Config) { c.Network = netName })
	e := newEngine(t, b, engineImage(t))
	require.NoError(t, b.Ensure(ctx, e.spec))
	require.NoError(t, b.Start(ctx, e.spec.EngineID))
	e.waitHealthy(t)
	assert.Equal(t, netName, engineNetwork(t, e.spec.EngineID).Name, "one of the duplicates, not a new network")
}

func TestEnsureMissingImage(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	b := newBackend(t)
	e := newEngine(t, b, "enginefleet/engine-does-not-exist:"+randHex(4))
	err := b.Ensure(ctx, e.spec)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "not found locally and pull failed")
	assert.ErrorIs(t, err, orchestrator.ErrImageUnavailable, "workers must not retry it")
	info, err := b.Inspect(ctx, e.spec.EngineID)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeMissing, info.State)
}

func TestEnsureRejectsBadSpec(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	b := newBackend(t)
	e := newEngine(t, b, engineImage(t))
	for name, mod := range map[string]func(*orchestrator.EngineSpec){
		"no port":    func(s *orchestrator.EngineSpec) { s.HostPort = 0 },
		"no image":   func(s *orchestrator.EngineSpec) { s.Image = "" },
		"bad id":     func(s *orchestrator.EngineSpec) { s.EngineID = "a/b" },
		"other node": func(s *orchestrator.EngineSpec) { s.Node = "elsewhere" },
	} {
		spec := e.spec
		mod(&spec)
		assert.Error(t, b.Ensure(ctx, spec), name)
	}
}

func TestEventsDie(t *testing.T) {
	t.Parallel()
	b := newBackend(t)
	cli := rawClient(t)
	e := newEngine(t, b, engineImage(t))
	ctx := t.Context()
	require.NoError(t, b.Ensure(ctx, e.spec))

	ectx, cancel := context.WithCancel(ctx)
	defer cancel()
	events, err := b.Events(ectx)
	require.NoError(t, err)

	require.NoError(t, b.Start(ctx, e.spec.EngineID))
	e.waitHealthy(t)
	killedAt := time.Now()
	_, err = cli.ContainerKill(ctx, orchestrator.ContainerName(e.spec.EngineID), client.ContainerKillOptions{Signal: "KILL"})
	require.NoError(t, err)

	var kinds []string
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ev, ok := <-events:
			require.True(t, ok, "event channel closed early")
			require.Equal(t, e.spec.EngineID, ev.EngineID, "events of other engines or nodes must not arrive")
			kinds = append(kinds, ev.Kind)
			if ev.Kind != "die" {
				continue
			}
			assert.Equal(t, 137, ev.ExitCode)
			assert.WithinDuration(t, killedAt, ev.Time, 5*time.Second)
			assert.Less(t, time.Since(killedAt), 5*time.Second, "die must arrive promptly")
			assert.Contains(t, kinds, "start")
			cancel()
			select {
			case _, ok := <-drain(events):
				assert.False(t, ok)
			case <-time.After(5 * time.Second):
				t.Fatal("event channel not closed after cancel")
			}
			return
		case <-timeout:
			t.Fatalf("no die event; got %v", kinds)
		}
	}
}

// drain returns a channel closed once events is closed.
func drain(events <-chan orchestrator.RuntimeEvent) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		for range events {
		}
		close(done)
	}()
	return done
}

func TestPauseCopyOutCopyIn(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	b := newBackend(t)
	image := engineImage(t)
	src := newEngine(t, b, image)
	sid := src.spec.EngineID
	require.NoError(t, b.Ensure(ctx, src.spec))
	require.NoError(t, b.Start(ctx, sid))
	src.waitHealthy(t)
	src.addMemory(t, "first memory")
	src.addMemory(t, "second memory")
	want := src.export(t)

	// Backup: pause, copy, unpause.
	require.NoError(t, b.Pause(ctx, sid))
	require.NoError(t, b.Pause(ctx, sid), "pausing a paused engine is a no-op")
	info, err := b.Inspect(ctx, sid)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimePaused, info.State)
	var backup bytes.Buffer
	require.NoError(t, b.CopyDataOut(ctx, sid, &backup))
	info, err = b.Inspect(ctx, sid)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimePaused, info.State, "copy must not thaw the engine")
	require.NoError(t, b.Unpause(ctx, sid))
	require.NoError(t, b.Unpause(ctx, sid), "unpausing a running engine is a no-op")
	src.waitHealthy(t)

	entries := tarEntries(t, backup.Bytes())
	t.Logf("backup entries: %v", names(entries))
	assert.Contains(t, names(entries), "brain.sqlite")
	for _, h := range entries {
		assert.False(t, strings.HasPrefix(h.Name, "data/") || strings.HasPrefix(h.Name, "/") || h.Name == "data", "entry %q must be relative to the volume root", h.Name)
	}

	// Restore into another engine that already has data of its own.
	dst := newEngine(t, b, image)
	did := dst.spec.EngineID
	require.NoError(t, b.Ensure(ctx, dst.spec))
	require.NoError(t, b.Start(ctx, did))
	dst.waitHealthy(t)
	dst.addMemory(t, "must be gone after the restore")

	require.NoError(t, b.CopyDataIn(ctx, did, image, bytes.NewReader(backup.Bytes())))
	info, err = b.Inspect(ctx, did)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeMissing, info.State, "copy-in removes the container")
	_, vols, err := b.List(ctx)
	require.NoError(t, err)
	for _, v := range vols {
		if v.EngineID == did {
			assert.Equal(t, orchestrator.VolumeName(did), v.Name)
		}
	}

	require.NoError(t, b.Ensure(ctx, dst.spec))
	require.NoError(t, b.Start(ctx, did))
	dst.waitHealthy(t)
	assert.Equal(t, string(want), string(dst.export(t)), "restored brain equals the backup")
	dst.addMemory(t, "the restored brain is writable")

	// Every file, and the volume root, belongs to the engine's user.
	cli := rawClient(t)
	raw, err := cli.CopyFromContainer(ctx, orchestrator.ContainerName(did), client.CopyFromContainerOptions{SourcePath: "/data"})
	require.NoError(t, err)
	all, err := io.ReadAll(raw.Content)
	raw.Content.Close()
	require.NoError(t, err)
	owned := tarEntries(t, all)
	assert.Contains(t, names(owned), "data/")
	for _, h := range owned {
		assert.Equal(t, docker.EngineUID, h.Uid, "owner of %s", h.Name)
		assert.Equal(t, docker.EngineGID, h.Gid, "group of %s", h.Name)
	}
	assertNoHelpers(t, did)
}

func TestCopyDataOutWithoutRunningEngine(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	b := newBackend(t)
	image := engineImage(t)
	e := newEngine(t, b, image)
	id := e.spec.EngineID
	require.NoError(t, b.Ensure(ctx, e.spec))
	require.NoError(t, b.Start(ctx, id))
	e.waitHealthy(t)
	e.addMemory(t, "copied while stopped")
	require.NoError(t, b.Stop(ctx, id, 10*time.Second))

	var stopped bytes.Buffer
	require.NoError(t, b.CopyDataOut(ctx, id, &stopped))
	assert.Contains(t, names(tarEntries(t, stopped.Bytes())), "brain.sqlite")

	// No container: no image known on this node either.
	require.NoError(t, b.RemoveContainer(ctx, id))
	bare := newBackend(t, func(c *docker.Config) {
		c.Node = b.Config().Node
		c.DataRoot = b.Config().DataRoot
		c.HelperImage = ""
	})
	err := bare.CopyDataOut(ctx, id, io.Discard)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no image for a helper container")

	// With a helper image configured, a helper container does the copy.
	withHelper := b
	var absent bytes.Buffer
	require.NoError(t, withHelper.CopyDataOut(ctx, id, &absent))
	assert.Equal(t, tarContents(t, stopped.Bytes()), tarContents(t, absent.Bytes()))
	assertNoHelpers(t, id)

	// A second engine's image also serves as the helper's.
	other := newEngine(t, b, image)
	require.NoError(t, bare.Ensure(ctx, other.spec))
	require.NoError(t, bare.CopyDataOut(ctx, id, io.Discard))
	assertNoHelpers(t, id)

	require.NoError(t, b.RemoveVolume(ctx, id))
	err = withHelper.CopyDataOut(ctx, id, io.Discard)
	assert.ErrorIs(t, err, docker.ErrNotFound)
}

func TestCopyDataInRejectsUnsafeArchive(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	image := engineImage(t)
	b := newBackend(t, func(c *docker.Config) { c.HelperImage = image })
	e := newEngine(t, b, image)
	require.NoError(t, b.Ensure(ctx, e.spec))

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	require.NoError(t, tw.WriteHeader(&tar.Header{Name: "../escape", Mode: 0o644, Size: 1, Typeflag: tar.TypeReg}))
	_, err := tw.Write([]byte("x"))
	require.NoError(t, err)
	require.NoError(t, tw.Close())

	err = b.CopyDataIn(ctx, e.spec.EngineID, image, &buf)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "unsafe path")
	assertNoHelpers(t, e.spec.EngineID)

	// An empty archive empties the volume.
	var empty bytes.Buffer
	require.NoError(t, tar.NewWriter(&empty).Close())
	require.NoError(t, b.CopyDataIn(ctx, e.spec.EngineID, image, &empty))
	var out bytes.Buffer
	require.NoError(t, b.CopyDataOut(ctx, e.spec.EngineID, &out))
	assert.Empty(t, tarEntries(t, out.Bytes()))
}

func TestList(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	b := newBackend(t)
	image := engineImage(t)
	running := newEngine(t, b, image)
	created := newEngine(t, b, image)
	require.NoError(t, b.Ensure(ctx, running.spec))
	require.NoError(t, b.Ensure(ctx, created.spec))
	require.NoError(t, b.Start(ctx, running.spec.EngineID))

	// Another node's engine is not ours to list.
	elsewhere := newBackend(t)
	foreign := newEngine(t, elsewhere, image)
	require.NoError(t, elsewhere.Ensure(ctx, foreign.spec))

	runtimes, vols, err := b.List(ctx)
	require.NoError(t, err)
	byID := map[string]orchestrator.RuntimeInfo{}
	for _, r := range runtimes {
		byID[r.EngineID] = r
	}
	assert.ElementsMatch(t, []string{running.spec.EngineID, created.spec.EngineID}, slices.Collect(maps.Keys(byID)))
	var volIDs []string
	for _, v := range vols {
		volIDs = append(volIDs, v.EngineID)
		assert.Equal(t, orchestrator.VolumeName(v.EngineID), v.Name)
		assert.WithinDuration(t, time.Now(), v.CreatedAt, time.Minute)
	}
	assert.ElementsMatch(t, []string{running.spec.EngineID, created.spec.EngineID}, volIDs)

	r := byID[running.spec.EngineID]
	assert.Equal(t, orchestrator.RuntimeRunning, r.State)
	assert.Equal(t, running.spec.HostPort, r.HostPort)
	assert.Equal(t, image, r.Image)
	assert.Equal(t, running.spec.ProductID, r.ProductID)
	assert.Equal(t, orchestrator.ContainerName(running.spec.EngineID), r.Name)
	assert.Equal(t, orchestrator.RuntimeCreated, byID[created.spec.EngineID].State)

	// A stopped container is still listed, with its exit code.
	require.NoError(t, b.Stop(ctx, running.spec.EngineID, 10*time.Second))
	runtimes, _, err = b.List(ctx)
	require.NoError(t, err)
	for _, r := range runtimes {
		if r.EngineID == running.spec.EngineID {
			assert.Equal(t, orchestrator.RuntimeExited, r.State)
			assert.Equal(t, 0, r.ExitCode)
		}
	}
}

func TestStopPausedEngine(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	b := newBackend(t)
	e := newEngine(t, b, engineImage(t))
	require.NoError(t, b.Ensure(ctx, e.spec))
	require.NoError(t, b.Start(ctx, e.spec.EngineID))
	e.waitHealthy(t)
	require.NoError(t, b.Pause(ctx, e.spec.EngineID))
	require.NoError(t, b.Stop(ctx, e.spec.EngineID, 10*time.Second))
	info, err := b.Inspect(ctx, e.spec.EngineID)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeExited, info.State)
	assert.Equal(t, 0, info.ExitCode, "a paused engine still shuts down cleanly on SIGTERM")

	// Start on a paused engine unpauses it.
	require.NoError(t, b.Start(ctx, e.spec.EngineID))
	e.waitHealthy(t)
	require.NoError(t, b.Pause(ctx, e.spec.EngineID))
	require.NoError(t, b.Start(ctx, e.spec.EngineID))
	info, err = b.Inspect(ctx, e.spec.EngineID)
	require.NoError(t, err)
	assert.Equal(t, orchestrator.RuntimeRunning, info.State)
}

func TestNewRejectsBadConfig(t *testing.T) {
	_, err := docker.New(docker.Config{MemoryMB: -1, CatalogMountPath: "relative"}, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "memory")
	assert.Contains(t, err.Error(), "catalog")
}

func tarEntries(t *testing.T, b []byte) []*tar.Header {
	t.Helper()
	var out []*tar.Header
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		require.NoError(t, err)
		out = append(out, h)
	}
}

func names(hs []*tar.Header) []string {
	var out []string
	for _, h := range hs {
		out = append(out, h.Name)
	}
	return out
}

// tarContents maps regular files to their contents.
func tarContents(t *testing.T, b []byte) map[string]string {
	t.Helper()
	out := map[string]string{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		require.NoError(t, err)
		if h.Typeflag == tar.TypeReg {
			c, err := io.ReadAll(tr)
			require.NoError(t, err)
			out[h.Name] = string(c)
		}
	}
}

// assertNoHelpers checks no helper container of engineID is left.
func assertNoHelpers(t *testing.T, engineID string) {
	t.Helper()
	cli := rawClient(t)
	res, err := cli.ContainerList(t.Context(), client.ContainerListOptions{
		All: true,
		Filters: make(client.Filters).Add("label",
			orchestrator.LabelEngineID+"="+engineID,
			docker.LabelRole+"="+docker.RoleHelper),
	})
	require.NoError(t, err)
	assert.Empty(t, res.Items, "helper containers left behind")
}

// Prepare creates the engines' network up front (the worker calls it at
// start), labelled as this node's, and is idempotent.
func TestPrepareCreatesNetwork(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	netName := testNetwork + "_prep_" + randHex(4)
	t.Cleanup(func() { dockertest.RemoveNetworkIfEmpty(netName) })
	b := newBackend(t, func(c *docker.Config) { c.Network = netName })
	require.NoError(t, b.Prepare(ctx))
	require.NoError(t, b.Prepare(ctx))
	nets, err := rawClient(t).NetworkList(ctx, client.NetworkListOptions{Filters: make(client.Filters).Add("name", netName)})
	require.NoError(t, err)
	var found int
	for _, n := range nets.Items {
		if n.Name == netName {
			found++
			assert.Equal(t, b.Config().Node, n.Labels[orchestrator.LabelNode])
			assert.Equal(t, "false", n.Options[docker.OptionICC], "engines cannot reach each other")
		}
	}
	assert.Equal(t, 1, found)
}

// An engine runs as the configured user, never the image's, and a brain
// whose files belong to someone else (an older build left the user to the
// image, and an image running as root wrote it) is made that user's when a
// container is created on it: the engine keeps its memories and can write.
func TestEngineUserOwnsItsVolume(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	image := engineImage(t)

	t.Run("legacy root-owned brain", func(t *testing.T) {
		t.Parallel()
		b := newBackend(t)
		e := newEngine(t, b, image)
		id := e.spec.EngineID
		require.NoError(t, b.Ensure(ctx, e.spec))
		require.NoError(t, b.Start(ctx, id))
		e.waitHealthy(t)
		e.addMemory(t, "written before the upgrade")
		before := e.export(t)
		require.NoError(t, b.Stop(ctx, id, 10*time.Second))
		// As an older version would leave it: files root's, no container
		// of this version.
		chownVolume(t, id, image, 0, 0)
		require.NoError(t, b.RemoveContainer(ctx, id))

		require.NoError(t, b.Ensure(ctx, e.spec))
		for name, owner := range volumeOwners(t, id) {
			assert.Equal(t, docker.DefaultUser, owner, "owner of %s", name)
		}
		require.NoError(t, b.Start(ctx, id))
		e.waitHealthy(t)
		assert.Equal(t, string(before), string(e.export(t)), "the brain is kept")
		e.addMemory(t, "and writable by the engine's user")
	})

	t.Run("configured user, fresh volume", func(t *testing.T) {
		t.Parallel()
		// The image's /data belongs to 65532: a fresh volume copied from it
		// is made the configured user's.
		b := newBackend(t, func(c *docker.Config) { c.User = "4242" })
		e := newEngine(t, b, image)
		require.NoError(t, b.Ensure(ctx, e.spec))
		raw, err := rawClient(t).ContainerInspect(ctx, orchestrator.ContainerName(e.spec.EngineID), client.ContainerInspectOptions{})
		require.NoError(t, err)
		assert.Equal(t, "4242:4242", raw.Container.Config.User)
		require.NoError(t, b.Start(ctx, e.spec.EngineID))
		e.waitHealthy(t)
		e.addMemory(t, "written as 4242")
		owners := volumeOwners(t, e.spec.EngineID)
		assert.Contains(t, owners, "data/brain.sqlite")
		for name, owner := range owners {
			assert.Equal(t, "4242:4242", owner, "owner of %s", name)
		}

		// The next fresh volume of that image is made the user's too:
		// Ensure remembers only images whose fresh volumes needed nothing.
		next := newEngine(t, b, image)
		require.NoError(t, b.Ensure(ctx, next.spec))
		for name, owner := range volumeOwners(t, next.spec.EngineID) {
			assert.Equal(t, "4242:4242", owner, "owner of %s", name)
		}
	})

	t.Run("image user, fresh volumes", func(t *testing.T) {
		t.Parallel()
		// The image's /data is the engine user's: the first fresh volume
		// is looked at, the next ones are known to be the same, and every
		// one is the user's and writable.
		b := newBackend(t)
		for i := range 3 {
			e := newEngine(t, b, image)
			require.NoError(t, b.Ensure(ctx, e.spec))
			require.NoError(t, b.Start(ctx, e.spec.EngineID))
			e.waitHealthy(t)
			e.addMemory(t, fmt.Sprintf("engine %d writes its brain", i))
			for name, owner := range volumeOwners(t, e.spec.EngineID) {
				assert.Equal(t, docker.DefaultUser, owner, "owner of %s", name)
			}
		}
	})

	_, err := docker.New(docker.Config{User: "0:0"}, nil)
	assert.ErrorContains(t, err, "root")
	_, err = docker.New(docker.Config{User: "nonroot"}, nil)
	assert.ErrorContains(t, err, "numeric")
}

// Two fleets on one node: each lists its own engines (and those of no
// fleet, an older version's), never the other's, and Ensure refuses to
// touch the other's container even under the same engine id.
func TestFleetsOnOneNode(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	image := engineImage(t)
	a := newBackend(t, func(c *docker.Config) { c.Fleet = "fleet-a-" + randHex(4) })
	b := newBackend(t, func(c *docker.Config) { c.Node = a.Config().Node; c.Fleet = "fleet-b-" + randHex(4) })
	older := newBackend(t, func(c *docker.Config) { c.Node = a.Config().Node }) // labels no fleet
	ea, eb, eo := newEngine(t, a, image), newEngine(t, b, image), newEngine(t, older, image)
	require.NoError(t, a.Ensure(ctx, ea.spec))
	require.NoError(t, b.Ensure(ctx, eb.spec))
	require.NoError(t, older.Ensure(ctx, eo.spec))

	listed := func(be *docker.Backend) (map[string]bool, map[string]bool) {
		rts, vols, err := be.List(ctx)
		require.NoError(t, err)
		cs, vs := map[string]bool{}, map[string]bool{}
		for _, r := range rts {
			cs[r.EngineID] = r.NoFleet
		}
		for _, v := range vols {
			vs[v.EngineID] = v.NoFleet
		}
		return cs, vs
	}
	cs, vs := listed(a)
	want := map[string]bool{ea.spec.EngineID: false, eo.spec.EngineID: true}
	assert.Equal(t, want, cs)
	assert.Equal(t, want, vs)
	cs, _ = listed(b)
	assert.Equal(t, map[string]bool{eb.spec.EngineID: false, eo.spec.EngineID: true}, cs)

	cli := rawClient(t)
	raw, err := cli.ContainerInspect(ctx, orchestrator.ContainerName(ea.spec.EngineID), client.ContainerInspectOptions{})
	require.NoError(t, err)
	assert.Equal(t, a.Config().Fleet, raw.Container.Config.Labels[orchestrator.LabelFleet])
	before := containerID(t, cli, ea.spec.EngineID)
	err = b.Ensure(ctx, ea.spec)
	require.ErrorContains(t, err, "another fleet")
	assert.Equal(t, before, containerID(t, cli, ea.spec.EngineID), "left alone")
	dev, _ := volumeDevice(t, ea.spec.EngineID)
	assert.Equal(t, docker.BrainDir(a, ea.spec.EngineID), dev, "its brain is not moved under another fleet's data root")

	// An older version's container of a's engine is a's to replace.
	require.NoError(t, a.Ensure(ctx, eo.spec))
	raw, err = cli.ContainerInspect(ctx, orchestrator.ContainerName(eo.spec.EngineID), client.ContainerInspectOptions{})
	require.NoError(t, err)
	assert.Equal(t, a.Config().Fleet, raw.Container.Config.Labels[orchestrator.LabelFleet])
}

// A host port the host refuses is ErrPortUnavailable from Start, whether a
// container publishes it (another deployment's, or one this database does
// not know) or another program listens there.
func TestStartOnRefusedPort(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	image := engineImage(t)
	b := newBackend(t)
	holder, second := newEngine(t, b, image), newEngine(t, b, image)
	second.spec.HostPort = holder.spec.HostPort
	require.NoError(t, b.Ensure(ctx, holder.spec))
	require.NoError(t, b.Start(ctx, holder.spec.EngineID))
	require.NoError(t, b.Ensure(ctx, second.spec))
	err := b.Start(ctx, second.spec.EngineID)
	require.ErrorIs(t, err, orchestrator.ErrPortUnavailable, "a container holds it")

	third := newEngine(t, b, image)
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", third.spec.HostPort))
	require.NoError(t, err)
	defer ln.Close()
	require.NoError(t, b.Ensure(ctx, third.spec))
	err = b.Start(ctx, third.spec.EngineID)
	require.ErrorIs(t, err, orchestrator.ErrPortUnavailable, "a program holds it")
}

// A stopped engine whose network was removed meanwhile (docker lets a
// network go once no running container uses it) fails to start once;
// the next Ensure looks for the network again, recreates it and replaces
// the container, and the engine starts with its brain. An engine as it
// should be is adopted as it stands.
func TestNetworkRemovedWhileStopped(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	image := engineImage(t)
	b := newBackend(t, func(c *docker.Config) { c.Network = "enginefleet_test_gone_" + randHex(4) })
	cli := rawClient(t)
	// Registered first, so it runs after the engine's own cleanup has
	// removed the container (a network in use cannot be removed).
	t.Cleanup(func() {
		res, err := cli.NetworkList(context.Background(), client.NetworkListOptions{Filters: make(client.Filters).Add("name", b.Config().Network)})
		if err == nil {
			for _, n := range res.Items {
				cli.NetworkRemove(context.Background(), n.ID, client.NetworkRemoveOptions{}) //nolint:errcheck
			}
		}
	})
	e := newEngine(t, b, image)
	id := e.spec.EngineID
	require.NoError(t, b.Ensure(ctx, e.spec))
	require.NoError(t, b.Start(ctx, id))
	e.waitHealthy(t)
	e.addMemory(t, "kept across a lost network")
	before := e.export(t)
	require.NoError(t, b.Stop(ctx, id, 10*time.Second))
	first := containerID(t, cli, id)
	require.NoError(t, b.Ensure(ctx, e.spec))
	require.Equal(t, first, containerID(t, cli, id), "adopted")

	raw, err := cli.ContainerInspect(ctx, orchestrator.ContainerName(id), client.ContainerInspectOptions{})
	require.NoError(t, err)
	netID := string(raw.Container.HostConfig.NetworkMode)
	_, err = cli.NetworkRemove(ctx, netID, client.NetworkRemoveOptions{})
	require.NoError(t, err)

	require.Error(t, b.Start(ctx, id), "its network is gone")
	require.NoError(t, b.Ensure(ctx, e.spec))
	require.NotEqual(t, first, containerID(t, cli, id), "replaced on the new network")
	require.NoError(t, b.Start(ctx, id))
	e.waitHealthy(t)
	require.Equal(t, string(before), string(e.export(t)), "the brain is kept")
}
