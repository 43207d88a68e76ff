package docker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"

	orchestrator "github.com/enginefleet/orchestrator"
)

// specHashVersion changes whenever the way Ensure builds a container
// changes, so containers made by an older build are replaced.
const specHashVersion = 2 // 2: engines run as Config.User

// ensureAttempts bounds the adopt-or-replace loop when other callers keep
// winning the name.
const ensureAttempts = 8

// Ensure creates the network, the volume and the container for spec (SPEC
// §8), without starting it. A container with the engine's name is adopted
// when it was made from the same spec (same image, env, port, limits, user,
// mounts and network) and replaced otherwise; the volume is kept. When it
// creates a container (unless it replaces one that ran as the same user)
// it checks that every file of the volume belongs to Config.User and, if
// one does not, rewrites the owners (a brain an older build's engine wrote
// as root keeps working). An image
// missing locally is pulled; there is no registry in most setups, so a
// missing image usually fails with "image X not found locally and pull
// failed".
func (b *Backend) Ensure(ctx context.Context, spec orchestrator.EngineSpec) error {
	if err := b.validSpec(spec); err != nil {
		return fmt.Errorf("ensure engine: %w", err)
	}
	if err := b.ensureImage(ctx, spec.Image); err != nil {
		return err
	}
	if err := b.ensureVolume(ctx, spec.EngineID, spec.ProductID); err != nil {
		return err
	}

	hash := b.specHash(spec)
	name := orchestrator.ContainerName(spec.EngineID)
	log := b.log.With("engine_id", spec.EngineID, "container", name)
	for attempt := range ensureAttempts {
		netID, err := b.ensureNetwork(ctx)
		if err != nil {
			return err
		}
		cur, found, err := b.inspectContainer(ctx, spec.EngineID)
		if err != nil {
			return fmt.Errorf("inspect container: %w", err)
		}
		if found {
			reason := b.mismatch(cur, spec.EngineID, hash, netID)
			if reason == "" {
				log.Debug("adopted container", "container_id", shortID(cur.ID))
				return nil
			}
			log.Info("replacing container", "container_id", shortID(cur.ID), "reason", reason)
			// By id, not name: a concurrent caller may already have
			// replaced it, and its new container must survive.
			if err := b.removeContainerByID(ctx, cur, b.cfg.ReplaceGrace); err != nil {
				return fmt.Errorf("replace container: %w", err)
			}
		}
		res, err := b.cli.ContainerCreate(ctx, b.containerOptions(spec, hash, netID))
		if err == nil {
			log.Info("created container", "container_id", shortID(res.ID), "image", spec.Image)
			// The volume may hold files of another user: a fresh one
			// copied from an image whose /data is not the engine user's,
			// or a brain written by an engine that ran as someone else
			// (an older build left the user to the image). A container
			// replacing one that ran as this user needs no look.
			if found && cur.Config != nil && cur.Config.Labels[LabelUser] == b.cfg.User {
				return nil
			}
			if err := b.ensureOwner(ctx, spec.EngineID, spec.Image, res.ID); err != nil {
				// Remove what was created, so the retry looks again
				// (it would adopt this container without a look).
				cctx, cancel := cleanupCtx(ctx)
				defer cancel()
				if rerr := b.removeContainerRef(cctx, res.ID); rerr != nil {
					log.Warn("remove container after ownership failure", "container_id", shortID(res.ID), "error", rerr)
				}
				return fmt.Errorf("ensure engine: %w", err)
			}
			return nil
		}
		switch {
		case cerrdefs.IsConflict(err):
			// Another caller created it between our inspect and
			// create: inspect again and adopt or replace theirs. Docker
			// reserves the name before the container can be inspected,
			// so give the other create a moment.
			log.Debug("container name taken, retrying", "error", err)
			select {
			case <-ctx.Done():
				return fmt.Errorf("create container: %w", ctx.Err())
			case <-time.After(time.Duration(attempt+1) * 100 * time.Millisecond):
			}
		case cerrdefs.IsNotFound(err) && strings.Contains(err.Error(), "network"):
			// The network was removed since we looked it up.
			log.Info("network vanished, retrying", "error", err)
		default:
			return fmt.Errorf("create container: %w", err)
		}
	}
	return fmt.Errorf("create container: name %s still conflicting after %d attempts", name, ensureAttempts)
}

func (b *Backend) validSpec(spec orchestrator.EngineSpec) error {
	if err := validID(spec.EngineID); err != nil {
		return err
	}
	if spec.Image == "" {
		return errors.New("empty image")
	}
	if spec.HostPort <= 0 || spec.HostPort > 65535 {
		return fmt.Errorf("invalid host port %d", spec.HostPort)
	}
	if spec.Node != "" && spec.Node != b.cfg.Node {
		return fmt.Errorf("engine is on node %q, this backend serves %q", spec.Node, b.cfg.Node)
	}
	return nil
}

// mismatch says why an existing container cannot be adopted ("" = it can).
func (b *Backend) mismatch(c container.InspectResponse, engineID, hash, netID string) string {
	var labels map[string]string
	if c.Config != nil {
		labels = c.Config.Labels
	}
	switch {
	case labels[orchestrator.LabelManaged] != "true" || labels[orchestrator.LabelEngineID] != engineID:
		return "not labelled as this engine's"
	case labels[LabelSpecHash] != hash:
		return "spec changed"
	case c.HostConfig == nil || string(c.HostConfig.NetworkMode) != netID:
		return "network changed"
	case stateOf(c) == container.StateDead || stateOf(c) == container.StateRemoving:
		return "container " + string(stateOf(c))
	}
	return ""
}

// specHash summarises everything that goes into the container, so that a
// change of any of it (image, env, key hash, port, limits, mounts) makes
// Ensure replace the container. Env values enter only the hash.
func (b *Backend) specHash(spec orchestrator.EngineSpec) string {
	in := struct {
		V         int
		Image     string
		Env       []string
		HostPort  int
		ProductID string
		Node      string
		Network   string
		Catalog   string
		MemoryMB  int64
		CPUs      float64
		Pids      int64
		Tmpfs     string
		User      string
	}{
		specHashVersion, spec.Image, envList(spec.Env), spec.HostPort, spec.ProductID,
		b.cfg.Node, b.cfg.Network, b.cfg.CatalogMountPath,
		b.cfg.MemoryMB, b.cfg.CPUs, b.cfg.PidsLimit, b.cfg.TmpfsSize, b.cfg.User,
	}
	j, _ := json.Marshal(in) // plain types: cannot fail
	sum := sha256.Sum256(j)
	return hex.EncodeToString(sum[:16])
}

func envList(env map[string]string) []string {
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	slices.Sort(out)
	return out
}

// containerOptions is the engine container (SPEC §8, §9).
func (b *Backend) containerOptions(spec orchestrator.EngineSpec, hash, netID string) client.ContainerCreateOptions {
	port := network.MustParsePort(EnginePort)
	labels := b.baseLabels(spec.EngineID, spec.ProductID)
	labels[LabelRole] = RoleEngine
	labels[LabelSpecHash] = hash
	labels[LabelHostPort] = strconv.Itoa(spec.HostPort)
	labels[LabelImage] = spec.Image
	labels[LabelUser] = b.cfg.User
	timeout := stopTimeout

	mounts := []mount.Mount{{
		Type:   mount.TypeVolume,
		Source: orchestrator.VolumeName(spec.EngineID),
		Target: DataDir,
	}}
	if b.cfg.CatalogMountPath != "" {
		mounts = append(mounts, mount.Mount{
			Type:     mount.TypeBind,
			Source:   b.cfg.CatalogMountPath,
			Target:   CatalogDir,
			ReadOnly: true,
		})
	}

	hc := &container.HostConfig{
		NetworkMode: container.NetworkMode(netID),
		PortBindings: network.PortMap{port: {{
			HostIP:   netip.MustParseAddr("127.0.0.1"),
			HostPort: strconv.Itoa(spec.HostPort),
		}}},
		RestartPolicy:  container.RestartPolicy{Name: container.RestartPolicyUnlessStopped},
		Mounts:         mounts,
		CapDrop:        []string{"ALL"},
		SecurityOpt:    []string{"no-new-privileges:true"},
		ReadonlyRootfs: true,
		Tmpfs:          map[string]string{"/tmp": "rw,nosuid,nodev,noexec,size=" + b.cfg.TmpfsSize},
	}
	if b.cfg.MemoryMB > 0 {
		hc.Memory = b.cfg.MemoryMB << 20
		hc.MemorySwap = hc.Memory // no swap
	}
	if b.cfg.CPUs > 0 {
		hc.NanoCPUs = int64(b.cfg.CPUs * 1e9)
	}
	if b.cfg.PidsLimit > 0 {
		pids := b.cfg.PidsLimit
		hc.PidsLimit = &pids
	}

	return client.ContainerCreateOptions{
		Name: orchestrator.ContainerName(spec.EngineID),
		Config: &container.Config{
			Image:        spec.Image,
			User:         b.cfg.User, // never left to the image: it might say root
			Env:          envList(spec.Env),
			Labels:       labels,
			ExposedPorts: network.PortSet{port: {}},
			StopTimeout:  &timeout,
		},
		HostConfig: hc,
		// NetworkID pins the endpoint to this network: docker resolves
		// endpoints by name at start otherwise, which fails ("network is
		// ambiguous") while a duplicate network exists.
		NetworkingConfig: &network.NetworkingConfig{EndpointsConfig: map[string]*network.EndpointSettings{
			netID: {NetworkID: netID},
		}},
	}
}

// ensureImage pulls image only when it is not available locally.
func (b *Backend) ensureImage(ctx context.Context, image string) error {
	_, err := b.cli.ImageInspect(ctx, image)
	if err == nil {
		return nil
	}
	if !cerrdefs.IsNotFound(err) {
		return fmt.Errorf("inspect image %s: %w", image, err)
	}
	b.log.Info("pulling image", "image", image)
	pctx, cancel := context.WithTimeout(ctx, b.cfg.PullTimeout)
	defer cancel()
	resp, err := b.cli.ImagePull(pctx, image, client.ImagePullOptions{})
	if err == nil {
		err = resp.Wait(pctx) // reads the stream to the end: errors come inside it
		resp.Close()
	}
	if err != nil {
		return fmt.Errorf("image %s not found locally and pull failed: %w: %w", image, orchestrator.ErrImageUnavailable, err)
	}
	return nil
}

// ensureVolume creates the engine's named volume unless it exists. Creating
// an existing local volume is a no-op in docker, so concurrent callers are
// safe.
func (b *Backend) ensureVolume(ctx context.Context, engineID, productID string) error {
	name := orchestrator.VolumeName(engineID)
	_, err := b.cli.VolumeInspect(ctx, name, client.VolumeInspectOptions{})
	if err == nil {
		return nil
	}
	if !cerrdefs.IsNotFound(err) {
		return fmt.Errorf("inspect volume: %w", err)
	}
	if _, err := b.cli.VolumeCreate(ctx, client.VolumeCreateOptions{
		Name:   name,
		Driver: "local",
		Labels: b.baseLabels(engineID, productID),
	}); err != nil {
		return fmt.Errorf("create volume: %w", err)
	}
	b.log.Info("created volume", "engine_id", engineID, "volume", name)
	return nil
}

// networkSettle bounds how long the daemon takes to create a network. A
// network stamps its Created time when its creation starts and is listed
// only when it ends, so a creator that lists right after creating may not
// yet see a rival that started earlier and will win by age. Once the oldest
// listed network is this old, every network older than it is listed too.
const networkSettle = 2 * time.Second

// ensureNetwork returns the id of the engines' bridge network, creating it
// when missing. Docker (API < 1.44) lets two networks share a name, so
// concurrent creators (several worker processes at first boot) may all
// succeed: every caller waits until the winner is settled, picks the same
// one (oldest, then lowest id) and removes the unused losers. Containers
// join by id, never by the (possibly ambiguous) name. The settled id is
// remembered, so only the first call after a network appears pays the wait.
func (b *Backend) ensureNetwork(ctx context.Context) (string, error) {
	b.netMu.Lock()
	defer b.netMu.Unlock()

	nets, err := b.networksNamed(ctx)
	if err != nil {
		return "", err
	}
	if len(nets) == 0 {
		res, err := b.cli.NetworkCreate(ctx, b.cfg.Network, client.NetworkCreateOptions{
			Driver: "bridge",
			Labels: b.nodeLabels(),
		})
		if err != nil && !cerrdefs.IsConflict(err) {
			return "", fmt.Errorf("create network %s: %w", b.cfg.Network, err)
		}
		if res.ID != "" {
			b.log.Info("created network", "network", b.cfg.Network, "network_id", shortID(res.ID))
		}
		if nets, err = b.networksNamed(ctx); err != nil {
			return "", err
		}
		if len(nets) == 0 {
			return "", fmt.Errorf("create network %s: gone right after creation", b.cfg.Network)
		}
	}
	win := pickNetwork(nets)
	if win.ID == b.netID {
		return win.ID, nil
	}
	// The daemon is local to this node, so its clock is ours.
	if wait := networkSettle - time.Since(win.Created); wait > 0 {
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("ensure network %s: %w", b.cfg.Network, ctx.Err())
		case <-time.After(wait):
		}
		if nets, err = b.networksNamed(ctx); err != nil {
			return "", err
		}
		if len(nets) == 0 {
			return "", fmt.Errorf("ensure network %s: removed while settling", b.cfg.Network)
		}
		win = pickNetwork(nets)
	}
	b.removeLosers(ctx, nets, win.ID)
	b.netID = win.ID
	return win.ID, nil
}

// removeLosers removes this node's duplicate networks other than the
// winner. One that containers still use stays (they joined it by id and
// keep working); networks someone else labelled are never touched.
func (b *Backend) removeLosers(ctx context.Context, nets []network.Summary, winID string) {
	for _, n := range nets {
		if n.ID == winID || n.Labels[orchestrator.LabelManaged] != "true" || n.Labels[orchestrator.LabelNode] != b.cfg.Node {
			continue
		}
		b.log.Info("removing duplicate network", "network", b.cfg.Network, "network_id", shortID(n.ID))
		if _, err := b.cli.NetworkRemove(ctx, n.ID, client.NetworkRemoveOptions{}); err != nil && !cerrdefs.IsNotFound(err) {
			b.log.Warn("remove duplicate network", "network_id", shortID(n.ID), "error", err)
		}
	}
}

// networksNamed lists the networks named exactly cfg.Network (docker's name
// filter also matches substrings).
func (b *Backend) networksNamed(ctx context.Context) ([]network.Summary, error) {
	res, err := b.cli.NetworkList(ctx, client.NetworkListOptions{
		Filters: make(client.Filters).Add("name", b.cfg.Network),
	})
	if err != nil {
		return nil, fmt.Errorf("list networks: %w", err)
	}
	var out []network.Summary
	for _, n := range res.Items {
		if n.Name == b.cfg.Network {
			out = append(out, n)
		}
	}
	return out, nil
}

func pickNetwork(nets []network.Summary) network.Summary {
	return slices.MinFunc(nets, func(a, b network.Summary) int {
		if c := a.Created.Compare(b.Created); c != 0 {
			return c
		}
		if a.ID < b.ID {
			return -1
		}
		if a.ID > b.ID {
			return 1
		}
		return 0
	})
}

// removeContainerByID removes c, first giving a running container grace
// to stop on SIGTERM. Already gone is fine. Named volumes are never
// removed (RemoveVolumes only drops anonymous ones).
func (b *Backend) removeContainerByID(ctx context.Context, c container.InspectResponse, grace time.Duration) error {
	if c.State != nil && (c.State.Running || c.State.Paused) && grace > 0 {
		if c.State.Paused {
			if _, err := b.cli.ContainerUnpause(ctx, c.ID, client.ContainerUnpauseOptions{}); err != nil && !cerrdefs.IsNotFound(err) {
				b.log.Debug("unpause before remove", "container_id", shortID(c.ID), "error", err)
			}
		}
		secs := durationSeconds(grace)
		if _, err := b.cli.ContainerStop(ctx, c.ID, client.ContainerStopOptions{Timeout: &secs}); err != nil && !cerrdefs.IsNotFound(err) {
			b.log.Debug("stop before remove", "container_id", shortID(c.ID), "error", err)
		}
	}
	return b.removeContainerRef(ctx, c.ID)
}

// removeContainerRef force-removes a container by id or name and waits for
// a removal already in progress elsewhere to finish.
func (b *Backend) removeContainerRef(ctx context.Context, ref string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := b.cli.ContainerRemove(ctx, ref, client.ContainerRemoveOptions{Force: true, RemoveVolumes: true})
		if err == nil || cerrdefs.IsNotFound(err) {
			return nil
		}
		// A conflict is "removal already in progress": wait for it.
		if !cerrdefs.IsConflict(err) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func durationSeconds(d time.Duration) int {
	if d <= 0 {
		return 0
	}
	return int((d + time.Second - 1) / time.Second)
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
