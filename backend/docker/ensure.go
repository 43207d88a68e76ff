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
	hash := b.specHash(spec)
	if b.adoptAtOnce(ctx, spec, hash) {
		return nil
	}
	if err := b.ensureImage(ctx, spec.Image); err != nil {
		return err
	}
	freshVolume, err := b.ensureVolume(ctx, spec.EngineID, spec.ProductID, spec.Image)
	if err != nil {
		return err
	}

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
		if found && cur.Config != nil {
			if mine, _ := b.ours(cur.Config.Labels); !mine {
				return fmt.Errorf("ensure engine: container %s belongs to another fleet (%s): left alone", name, cur.Config.Labels[orchestrator.LabelFleet])
			}
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
			// A volume this call created holds only what the image's
			// /data holds: once one such volume was found the user's,
			// every other one of that image is.
			imageID := b.images.id(spec.Image)
			if freshVolume && b.images.clean(imageID, b.cfg.User) {
				return nil
			}
			fixed, err := b.ensureOwner(ctx, spec.EngineID, spec.Image, res.ID)
			if err == nil && freshVolume && !fixed {
				b.images.markClean(imageID, b.cfg.User)
			}
			if err != nil {
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
		case cerrdefs.IsNotFound(err) && strings.Contains(err.Error(), "image") && attempt == 0:
			// Removed since ensureImage remembered it: look (and pull) again.
			b.images.forget(spec.Image)
			if err := b.ensureImage(ctx, spec.Image); err != nil {
				return err
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

// adoptAtOnce reports whether the engine's container exists as spec
// wants it on the network this process settled on (and, with a data
// root, its volume bound there): a start, a wake or a restart then costs
// an inspect or two, not an image, volume and network look too. Its image and volume are there (docker removes neither while a
// container uses it); a network removed since is found by Start, which
// makes the next Ensure look again (forgetNetwork).
func (b *Backend) adoptAtOnce(ctx context.Context, spec orchestrator.EngineSpec, hash string) bool {
	b.netMu.Lock()
	netID := b.netID
	b.netMu.Unlock()
	if netID == "" {
		return false
	}
	cur, found, err := b.inspectContainer(ctx, spec.EngineID)
	if err != nil || !found || cur.Config == nil {
		return false
	}
	if mine, _ := b.ours(cur.Config.Labels); !mine || b.mismatch(cur, spec.EngineID, hash, netID) != "" {
		return false
	}
	if b.cfg.DataRoot != "" {
		// A volume of an older version (or another data root) is moved
		// under this one by ensureVolume: look at it.
		v, err := b.cli.VolumeInspect(ctx, orchestrator.VolumeName(spec.EngineID), client.VolumeInspectOptions{})
		return err == nil && b.boundHere(v.Volume, spec.EngineID)
	}
	return true
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
	case labels[orchestrator.LabelFleet] != b.cfg.Fleet:
		return "made before fleets were labelled" // another fleet's: refused by Ensure
	case labels[LabelSpecHash] != hash:
		return "spec changed"
	case c.HostConfig == nil || string(c.HostConfig.NetworkMode) != netID:
		return "network changed"
	case onOtherNetwork(c, netID):
		return "attached to another network"
	case stateOf(c) == container.StateDead || stateOf(c) == container.StateRemoving:
		return "container " + string(stateOf(c))
	}
	return ""
}

// onOtherNetwork reports whether c has an endpoint on a network other than
// netID (connected by hand, or left by an older version): an engine joins
// one network only.
func onOtherNetwork(c container.InspectResponse, netID string) bool {
	if c.NetworkSettings == nil {
		return false
	}
	for _, ep := range c.NetworkSettings.Networks {
		if ep != nil && ep.NetworkID != "" && ep.NetworkID != netID {
			return true
		}
	}
	return false
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
		Fleet     string
	}{
		specHashVersion, spec.Image, envList(spec.Env), spec.HostPort, spec.ProductID,
		b.cfg.Node, b.cfg.Network, b.cfg.CatalogMountPath,
		b.cfg.MemoryMB, b.cfg.CPUs, b.cfg.PidsLimit, b.cfg.TmpfsSize, b.cfg.User, b.cfg.Fleet,
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

// containerOptions is the engine container.
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

// ensureImage pulls image only when it is not available locally. An image
// seen in the last imageMemoFor is taken as still there without asking
// the daemon (a create that finds it gone makes Ensure look again).
func (b *Backend) ensureImage(ctx context.Context, image string) error {
	if b.images.present(image) {
		return nil
	}
	res, err := b.cli.ImageInspect(ctx, image)
	if err == nil {
		b.images.saw(image, res.ID)
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

// ensureVolume creates the engine's volume unless it exists: with a data
// root, bound to its brain directory there (made first, through a helper
// container of image). An existing volume that is not bound there (a
// Docker-managed one of an older version, or of another data root) is
// moved there first (migrateVolume). A volume already right costs one
// inspect. fresh says the volume holds nothing but what the image's /data
// gives it: a Docker-managed volume it created (a brain directory under a
// data root may hold a brain a killed migration left there).
func (b *Backend) ensureVolume(ctx context.Context, engineID, productID, image string) (fresh bool, err error) {
	v, err := b.cli.VolumeInspect(ctx, orchestrator.VolumeName(engineID), client.VolumeInspectOptions{})
	if err == nil {
		if b.cfg.DataRoot == "" || b.boundHere(v.Volume, engineID) {
			return false, nil
		}
		if mine, _ := b.ours(v.Volume.Labels); !mine {
			return false, fmt.Errorf("ensure engine: volume %s belongs to another fleet (%s): left alone", v.Volume.Name, v.Volume.Labels[orchestrator.LabelFleet])
		}
		return false, b.migrateVolume(ctx, engineID, productID, image, v.Volume)
	}
	if !cerrdefs.IsNotFound(err) {
		return false, fmt.Errorf("inspect volume: %w", err)
	}
	if b.cfg.DataRoot != "" {
		// Kept as it is when it exists: a migration killed after
		// removing the old volume left the brain there.
		if err := b.newBrainDir(ctx, engineID, image); err != nil {
			return false, err
		}
		return false, b.createVolume(ctx, engineID, productID)
	}
	return true, b.createVolume(ctx, engineID, productID)
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
