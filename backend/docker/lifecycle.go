package docker

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"

	orchestrator "github.com/enginefleet/orchestrator"
)

// Start starts the engine's container. Running is a no-op, paused is
// unpaused, restarting (docker's restart policy is bringing it back) is left
// to docker. A missing container is an error with ErrNotFound in its chain,
// a host port taken on the host one with orchestrator.ErrPortUnavailable.
func (b *Backend) Start(ctx context.Context, engineID string) error {
	if err := validID(engineID); err != nil {
		return fmt.Errorf("start container: %w", err)
	}
	// Most starts are of a created or stopped container: start it by name
	// at once (a running one is a no-op for docker too), and look only
	// when docker refuses (paused, missing, a port taken).
	name := orchestrator.ContainerName(engineID)
	_, err := b.cli.ContainerStart(ctx, name, client.ContainerStartOptions{})
	switch {
	case err == nil:
		b.log.Info("started container", "engine_id", engineID)
		return nil
	case portRefused(err):
		return fmt.Errorf("start container: %w: %w", orchestrator.ErrPortUnavailable, err)
	case cerrdefs.IsNotFound(err) && strings.Contains(err.Error(), "network"):
		// Its network was removed while it was stopped: the retry's
		// Ensure must look for the network again and replace it.
		b.forgetNetwork()
	}
	c, found, err := b.inspectContainer(ctx, engineID)
	if err != nil {
		return fmt.Errorf("start container: %w", err)
	}
	if !found {
		return fmt.Errorf("start container %s: %w", orchestrator.ContainerName(engineID), ErrNotFound)
	}
	switch stateOf(c) {
	case container.StateRunning, container.StateRestarting:
		return nil
	case container.StatePaused:
		if _, err := b.cli.ContainerUnpause(ctx, c.ID, client.ContainerUnpauseOptions{}); err != nil {
			return fmt.Errorf("unpause container: %w", err)
		}
		return nil
	}
	if _, err := b.cli.ContainerStart(ctx, c.ID, client.ContainerStartOptions{}); err != nil {
		if portRefused(err) {
			return fmt.Errorf("start container: %w: %w", orchestrator.ErrPortUnavailable, err)
		}
		return fmt.Errorf("start container: %w", err)
	}
	b.log.Info("started container", "engine_id", engineID)
	return nil
}

// portRefused reports whether a start failed on the published host port:
// another container publishes it ("port is already allocated") or another
// program listens there (the proxy's bind: "address already in use").
func portRefused(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "port is already allocated") || strings.Contains(msg, "address already in use")
}

// Stop sends SIGTERM, waits up to grace and then SIGKILLs (docker stop).
// A paused container is unpaused first so it can handle SIGTERM. A missing
// or stopped container is a no-op. ctx must outlive grace.
func (b *Backend) Stop(ctx context.Context, engineID string, grace time.Duration) error {
	if err := validID(engineID); err != nil {
		return fmt.Errorf("stop container: %w", err)
	}
	c, found, err := b.inspectContainer(ctx, engineID)
	if err != nil {
		return fmt.Errorf("stop container: %w", err)
	}
	if !found {
		return nil
	}
	switch stateOf(c) {
	case container.StateCreated, container.StateExited, container.StateDead, container.StateRemoving:
		return nil
	case container.StatePaused:
		if _, err := b.cli.ContainerUnpause(ctx, c.ID, client.ContainerUnpauseOptions{}); err != nil && !cerrdefs.IsNotFound(err) && !cerrdefs.IsConflict(err) {
			return fmt.Errorf("unpause container: %w", err)
		}
	}
	secs := durationSeconds(grace)
	if _, err := b.cli.ContainerStop(ctx, c.ID, client.ContainerStopOptions{Timeout: &secs}); err != nil && !cerrdefs.IsNotFound(err) {
		return fmt.Errorf("stop container: %w", err)
	}
	b.log.Info("stopped container", "engine_id", engineID)
	return nil
}

// RemoveContainer force-removes the engine's container (not its volume);
// missing is a no-op.
func (b *Backend) RemoveContainer(ctx context.Context, engineID string) error {
	if err := validID(engineID); err != nil {
		return fmt.Errorf("remove container: %w", err)
	}
	if err := b.removeContainerRef(ctx, orchestrator.ContainerName(engineID)); err != nil {
		return fmt.Errorf("remove container: %w", err)
	}
	return nil
}

// RemoveVolume removes the engine's brain volume and, with a data root,
// its directory there (leaving an empty file of its name: see
// dataroot.go); missing is a no-op. If the volume is still mounted by the
// engine's container (or a leaked helper), that container is removed
// first; a container not managed for this engine keeps the volume and
// makes this an error.
func (b *Backend) RemoveVolume(ctx context.Context, engineID string) error {
	return b.removeVolume(ctx, engineID, "")
}

// removeVolume is RemoveVolume with a helper image ("" = look for one).
// The volume goes first: killed in between, a retry finds no volume and
// still removes the directory.
func (b *Backend) removeVolume(ctx context.Context, engineID, image string) error {
	if err := validID(engineID); err != nil {
		return fmt.Errorf("remove volume: %w", err)
	}
	if err := b.dropVolume(ctx, engineID, orchestrator.VolumeName(engineID)); err != nil {
		return fmt.Errorf("remove volume: %w", err)
	}
	if b.cfg.DataRoot != "" {
		if err := b.removeBrainDir(ctx, engineID, image); err != nil {
			return fmt.Errorf("remove volume: %w", err)
		}
	}
	return nil
}

// dropVolume removes the docker volume name (missing is fine), removing
// first the containers managed for this engine that mount it.
func (b *Backend) dropVolume(ctx context.Context, engineID, name string) error {
	_, err := b.cli.VolumeRemove(ctx, name, client.VolumeRemoveOptions{})
	if err == nil || cerrdefs.IsNotFound(err) {
		if err == nil {
			b.log.Info("removed volume", "engine_id", engineID, "volume", name)
		}
		return nil
	}
	if !cerrdefs.IsConflict(err) {
		return err
	}
	// In use: remove our containers that mount it, then retry.
	res, lerr := b.cli.ContainerList(ctx, client.ContainerListOptions{
		All:     true,
		Filters: make(client.Filters).Add("volume", name),
	})
	if lerr != nil {
		return fmt.Errorf("list users: %w", lerr)
	}
	for _, c := range res.Items {
		if mine, _ := b.ours(c.Labels); !mine || c.Labels[orchestrator.LabelManaged] != "true" || c.Labels[orchestrator.LabelEngineID] != engineID {
			return fmt.Errorf("in use by container %s, not managed for this engine", strings.TrimPrefix(firstName(c.Names), "/"))
		}
		if err := b.removeContainerRef(ctx, c.ID); err != nil {
			return fmt.Errorf("remove container: %w", err)
		}
	}
	if _, err := b.cli.VolumeRemove(ctx, name, client.VolumeRemoveOptions{}); err != nil && !cerrdefs.IsNotFound(err) {
		return err
	}
	b.log.Info("removed volume", "engine_id", engineID, "volume", name)
	return nil
}

// Inspect reports the engine's container: RuntimeMissing when there is
// none.
func (b *Backend) Inspect(ctx context.Context, engineID string) (orchestrator.RuntimeInfo, error) {
	info := orchestrator.RuntimeInfo{
		EngineID: engineID,
		Name:     orchestrator.ContainerName(engineID),
		State:    orchestrator.RuntimeMissing,
	}
	if err := validID(engineID); err != nil {
		return info, fmt.Errorf("inspect container: %w", err)
	}
	c, found, err := b.inspectContainer(ctx, engineID)
	if err != nil {
		return info, fmt.Errorf("inspect container: %w", err)
	}
	if !found {
		return info, nil
	}
	return runtimeFromInspect(engineID, c), nil
}

func runtimeFromInspect(engineID string, c container.InspectResponse) orchestrator.RuntimeInfo {
	info := orchestrator.RuntimeInfo{
		EngineID: engineID,
		Name:     strings.TrimPrefix(c.Name, "/"),
		State:    mapState(stateOf(c)),
	}
	if c.Config != nil {
		info.ProductID = c.Config.Labels[orchestrator.LabelProductID]
		info.Image = c.Config.Image
	}
	if c.State != nil {
		info.ExitCode = c.State.ExitCode
		info.OOMKilled = c.State.OOMKilled
	}
	if c.HostConfig != nil {
		info.HostPort = hostPort(c.HostConfig.PortBindings)
	}
	if info.HostPort == 0 && c.NetworkSettings != nil {
		info.HostPort = hostPort(c.NetworkSettings.Ports)
	}
	if t, err := time.Parse(time.RFC3339Nano, c.Created); err == nil {
		info.CreatedAt = t
	}
	return info
}

func hostPort(pm network.PortMap) int {
	for _, b := range pm[network.MustParsePort(EnginePort)] {
		if p := atoiOr0(b.HostPort); p > 0 {
			return p
		}
	}
	return 0
}

// List returns this node's managed engine containers (any state) and brain
// volumes of this fleet, and those with no fleet label (NoFleet); another
// fleet's are left out. Helper containers are not listed; leaked ones older than 15
// minutes are removed on the way. A container attached to a network that
// lets containers reach each other is Unisolated. From a list, ExitCode comes from docker's
// status text and OOMKilled is not known (Inspect has both).
func (b *Backend) List(ctx context.Context) ([]orchestrator.RuntimeInfo, []orchestrator.VolumeInfo, error) {
	cres, err := b.cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: b.managedFilters()})
	if err != nil {
		return nil, nil, fmt.Errorf("list containers: %w", err)
	}
	isolatedNet, err := b.isolation(ctx)
	if err != nil {
		return nil, nil, err
	}
	var runtimes []orchestrator.RuntimeInfo
	for _, c := range cres.Items {
		mine, noFleet := b.ours(c.Labels)
		if !mine {
			continue // another fleet's, on a host it shares with us
		}
		if c.Labels[LabelRole] == RoleHelper {
			b.reapHelper(ctx, c)
			continue
		}
		id := c.Labels[orchestrator.LabelEngineID]
		if id == "" {
			continue
		}
		rt := runtimeFromSummary(id, c)
		rt.Unisolated = isolatedNet.unisolated(c)
		rt.NoFleet = noFleet
		runtimes = append(runtimes, rt)
	}

	vres, err := b.cli.VolumeList(ctx, client.VolumeListOptions{Filters: b.managedFilters()})
	if err != nil {
		return nil, nil, fmt.Errorf("list volumes: %w", err)
	}
	var volumes []orchestrator.VolumeInfo
	for _, v := range vres.Items {
		id := v.Labels[orchestrator.LabelEngineID]
		mine, noFleet := b.ours(v.Labels)
		if id == "" || !mine {
			continue
		}
		vi := orchestrator.VolumeInfo{EngineID: id, Name: v.Name, NoFleet: noFleet}
		if t, err := time.Parse(time.RFC3339, v.CreatedAt); err == nil {
			vi.CreatedAt = t
		}
		volumes = append(volumes, vi)
	}
	return runtimes, volumes, nil
}

var exitedStatus = regexp.MustCompile(`^Exited \((-?\d+)\)`)

func runtimeFromSummary(engineID string, c container.Summary) orchestrator.RuntimeInfo {
	info := orchestrator.RuntimeInfo{
		EngineID:  engineID,
		ProductID: c.Labels[orchestrator.LabelProductID],
		Name:      strings.TrimPrefix(firstName(c.Names), "/"),
		State:     mapState(c.State),
		Image:     c.Labels[LabelImage],
		HostPort:  atoiOr0(c.Labels[LabelHostPort]),
		CreatedAt: time.Unix(c.Created, 0),
	}
	if info.Image == "" {
		info.Image = c.Image
	}
	if info.HostPort == 0 {
		for _, p := range c.Ports {
			if p.PrivatePort == 8000 && p.PublicPort != 0 {
				info.HostPort = int(p.PublicPort)
			}
		}
	}
	if m := exitedStatus.FindStringSubmatch(c.Status); m != nil {
		info.ExitCode, _ = strconv.Atoi(m[1])
	}
	return info
}

func firstName(names []string) string {
	if len(names) == 0 {
		return ""
	}
	return names[0]
}

// reapHelper removes a helper container left behind by a crash.
func (b *Backend) reapHelper(ctx context.Context, c container.Summary) {
	if time.Since(time.Unix(c.Created, 0)) < helperMaxAge {
		return
	}
	b.log.Info("removing leaked helper container", "container_id", shortID(c.ID), "engine_id", c.Labels[orchestrator.LabelEngineID])
	if err := b.removeContainerRef(ctx, c.ID); err != nil {
		b.log.Warn("remove leaked helper container", "container_id", shortID(c.ID), "error", err)
	}
}

// Pause freezes the engine's processes (cgroup freezer) so its volume can
// be copied consistently. Paused already is a no-op, and so are a missing
// or stopped container: nothing writes the volume then. A container docker
// is restarting cannot be frozen and is an error.
func (b *Backend) Pause(ctx context.Context, engineID string) error {
	if err := validID(engineID); err != nil {
		return fmt.Errorf("pause container: %w", err)
	}
	c, found, err := b.inspectContainer(ctx, engineID)
	if err != nil {
		return fmt.Errorf("pause container: %w", err)
	}
	if !found {
		return nil
	}
	switch stateOf(c) {
	case container.StatePaused, container.StateCreated, container.StateExited, container.StateDead:
		return nil
	case container.StateRunning:
	default:
		return fmt.Errorf("pause container: container is %s", stateOf(c))
	}
	if _, err := b.cli.ContainerPause(ctx, c.ID, client.ContainerPauseOptions{}); err != nil {
		return fmt.Errorf("pause container: %w", err)
	}
	return nil
}

// Unpause thaws a paused engine; anything else (including missing) is a
// no-op.
func (b *Backend) Unpause(ctx context.Context, engineID string) error {
	if err := validID(engineID); err != nil {
		return fmt.Errorf("unpause container: %w", err)
	}
	c, found, err := b.inspectContainer(ctx, engineID)
	if err != nil {
		return fmt.Errorf("unpause container: %w", err)
	}
	if !found || stateOf(c) != container.StatePaused {
		return nil
	}
	if _, err := b.cli.ContainerUnpause(ctx, c.ID, client.ContainerUnpauseOptions{}); err != nil {
		return fmt.Errorf("unpause container: %w", err)
	}
	return nil
}
