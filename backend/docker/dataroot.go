package docker

import (
	"archive/tar"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/volume"
	"github.com/moby/moby/client"

	orchestrator "github.com/enginefleet/orchestrator"
)

// Brains under the data root.
//
// With Config.DataRoot set, the engine's volume engine-data-<id> is a
// local-driver volume bound (type none, o=bind) to
// <DataRoot>/engines/<id>/data on the Docker host, so a snapshot or a tar
// of the data root holds every brain. A volume rather than a bind mount of
// the directory: the engine still mounts a named, labelled volume (the
// engine contract, List, fleet ownership, the helpers' copies and `docker
// volume ls` all work as before), only where its bytes live changes.
//
// The directories are made, emptied and removed through the Docker API
// only (archive extraction into a helper container that binds the data
// root; the daemon does it as root), so the orchestrator process needs no
// access to the data root and no root: the path is the Docker host's. What
// the API cannot do is remove a directory entry: RemoveVolume replaces the
// engine's directory with an empty file of the same name (a tombstone, a few
// bytes per destroyed engine).
//
// Layout: <DataRoot>/engines/ (0755 root), engines/<id>/ (0700 root: no
// other host user reads a brain), engines/<id>/data/ (the volume's root,
// the engine user's, 0755 as CopyDataIn leaves it).

// rootMount is where helpers that work on the data root bind it.
const rootMount = "/orchestrator-data-root"

// Steps of a migration, for tests that kill one midway.
const (
	stepCopying = "copying" // after the first entries of the copy reached the directory
	stepCopied  = "copied"  // the directory verified equal to the volume, which still exists
	stepRemoved = "removed" // the old volume removed, the bound one not yet created
)

// brainDir is the engine's brain directory on the Docker host.
func (b *Backend) brainDir(engineID string) string {
	return path.Join(b.cfg.DataRoot, "engines", engineID, "data")
}

// boundHere reports whether v is the engine's volume bound to its brain
// directory under the data root.
func (b *Backend) boundHere(v volume.Volume, engineID string) bool {
	if v.Driver != "local" || v.Options["type"] != "none" || path.Clean(v.Options["device"]) != b.brainDir(engineID) {
		return false
	}
	for _, o := range strings.Split(v.Options["o"], ",") {
		if o == "bind" || o == "rbind" {
			return true
		}
	}
	return false
}

// createVolume creates the engine's volume: bound to its brain directory
// (which must exist) with a data root, a Docker-managed one without.
// Creating an existing local volume is a no-op in docker, so concurrent
// callers are safe.
func (b *Backend) createVolume(ctx context.Context, engineID, productID string) error {
	opts := client.VolumeCreateOptions{
		Name:   orchestrator.VolumeName(engineID),
		Driver: "local",
		Labels: b.baseLabels(engineID, productID),
	}
	if b.cfg.DataRoot != "" {
		opts.DriverOpts = map[string]string{"type": "none", "o": "bind", "device": b.brainDir(engineID)}
	}
	if _, err := b.cli.VolumeCreate(ctx, opts); err != nil {
		return fmt.Errorf("create volume: %w", err)
	}
	b.log.Info("created volume", "engine_id", engineID, "volume", opts.Name, "dir", opts.DriverOpts["device"])
	return nil
}

// createRootHelper creates (never starts) a labelled container from image
// with the data root bound at rootMount. A bind in Binds (not Mounts)
// makes docker create a missing data root (root, 0755) on the host.
func (b *Backend) createRootHelper(ctx context.Context, engineID, image string) (string, error) {
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	labels := b.baseLabels(engineID, "")
	labels[LabelRole] = RoleHelper
	res, err := b.cli.ContainerCreate(ctx, client.ContainerCreateOptions{
		Name: "engine-helper-" + engineID + "-" + hex.EncodeToString(rnd[:]),
		Config: &container.Config{
			Image:           image,
			Entrypoint:      []string{helperEntrypoint},
			Cmd:             []string{},
			Labels:          labels,
			NetworkDisabled: true,
		},
		HostConfig: &container.HostConfig{
			NetworkMode: "none",
			Binds:       []string{b.cfg.DataRoot + ":" + rootMount},
			CapDrop:     []string{"ALL"},
			SecurityOpt: []string{"no-new-privileges:true"},
		},
	})
	if err != nil {
		return "", fmt.Errorf("create data root helper: %w", err)
	}
	return res.ID, nil
}

// dirEntries writes the tar entries (relative to "/" of a root helper)
// that make the engine's directories, merging with what exists (docker
// applies a directory entry's owner and mode to an existing directory and
// keeps its contents). With reset, the brain directory is first replaced
// by a file, which removes everything in it, then made again empty.
func (b *Backend) dirEntries(tw *tar.Writer, engineID string, reset bool) error {
	uid, gid := b.cfg.owner()
	engines := strings.TrimPrefix(rootMount, "/") + "/engines"
	now := time.Now()
	hdrs := []*tar.Header{
		{Typeflag: tar.TypeDir, Name: engines + "/", Mode: 0o755, ModTime: now},
		{Typeflag: tar.TypeDir, Name: engines + "/" + engineID + "/", Mode: 0o700, ModTime: now},
	}
	if reset {
		hdrs = append(hdrs, &tar.Header{Typeflag: tar.TypeReg, Name: engines + "/" + engineID + "/data", Mode: 0o600, ModTime: now})
	}
	hdrs = append(hdrs, &tar.Header{Typeflag: tar.TypeDir, Name: engines + "/" + engineID + "/data/", Mode: 0o755, Uid: uid, Gid: gid, ModTime: now})
	for _, h := range hdrs {
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("write archive: %w", err)
		}
	}
	return nil
}

// makeBrainDir makes the engine's brain directory through a root helper
// (kept as it is when it exists, emptied with reset).
func (b *Backend) makeBrainDir(ctx context.Context, helper, engineID string, reset bool) error {
	err := b.extractAt(ctx, helper, true, func(w io.Writer) error {
		tw := tar.NewWriter(w)
		if err := b.dirEntries(tw, engineID, reset); err != nil {
			return err
		}
		return tw.Close()
	})
	if err != nil {
		return fmt.Errorf("make brain directory %s: %w", b.brainDir(engineID), err)
	}
	return nil
}

// newBrainDir makes the brain directory of a volume about to be created.
func (b *Backend) newBrainDir(ctx context.Context, engineID, image string) error {
	helper, err := b.createRootHelper(ctx, engineID, image)
	if err != nil {
		return err
	}
	defer b.removeHelper(ctx, helper)
	return b.makeBrainDir(ctx, helper, engineID, false)
}

// removeBrainDir removes the engine's directory under the data root,
// leaving an empty file of its name (the API extracts, never deletes).
// Nothing there is a no-op. image may be ""; a helper image is looked for
// as CopyDataOut does.
func (b *Backend) removeBrainDir(ctx context.Context, engineID, image string) error {
	if image == "" {
		var err error
		if image, err = b.helperImage(ctx, container.InspectResponse{}); err != nil {
			// The last engine of the node gone and the helper image
			// not local: pull it rather than fail every retry.
			if b.cfg.HelperImage == "" {
				return fmt.Errorf("remove brain directory: %w", err)
			}
			if err := b.ensureImage(ctx, b.cfg.HelperImage); err != nil {
				return fmt.Errorf("remove brain directory: %w", err)
			}
			image = b.cfg.HelperImage
		}
	}
	helper, err := b.createRootHelper(ctx, engineID, image)
	if err != nil {
		return fmt.Errorf("remove brain directory: %w", err)
	}
	defer b.removeHelper(ctx, helper)
	dir := rootMount + "/engines/" + engineID
	st, err := b.cli.ContainerStatPath(ctx, helper, client.ContainerStatPathOptions{Path: dir})
	if cerrdefs.IsNotFound(err) || err == nil && !st.Stat.Mode.IsDir() {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove brain directory: stat: %w", err)
	}
	err = b.extractAt(ctx, helper, true, func(w io.Writer) error {
		tw := tar.NewWriter(w)
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(dir, "/"), Mode: 0o600, ModTime: time.Now()}); err != nil {
			return fmt.Errorf("write archive: %w", err)
		}
		return tw.Close()
	})
	if err != nil {
		return fmt.Errorf("remove brain directory %s: %w", path.Dir(b.brainDir(engineID)), err)
	}
	b.log.Info("removed brain directory", "engine_id", engineID, "dir", path.Dir(b.brainDir(engineID)))
	return nil
}

// migrateVolume moves the brain of an engine whose volume v is not bound
// to its directory under the data root (a Docker-managed named volume made
// before brains lived there, or a volume of another data root) into that
// directory, then replaces v by a volume of the same name and labels bound
// there. The engine's container is removed first (nothing may write the
// brain meanwhile; Ensure creates it again).
//
// Crash-safe at every step, because v is removed only once the directory
// is verified equal to it (every entry's name, type, mode, owner, size,
// link target and SHA-256): killed while copying, v is intact and the next
// run empties the directory and copies again; killed after the check, the
// next run checks again (v is recopied if anything wrote it meanwhile) and
// switches; killed between removing v and creating the bound volume, the
// next run finds no volume and creates the bound one on the directory,
// which is never emptied on that path.
func (b *Backend) migrateVolume(ctx context.Context, engineID, productID, image string, v volume.Volume) error {
	log := b.log.With("engine_id", engineID, "volume", v.Name, "dir", b.brainDir(engineID))
	if productID == "" {
		productID = v.Labels[orchestrator.LabelProductID]
	}
	from := v.Mountpoint
	if d := v.Options["device"]; d != "" {
		from = d
	}
	log.Info("moving brain volume under the data root", "from", from)
	started := time.Now()

	if c, found, err := b.inspectContainer(ctx, engineID); err != nil {
		return fmt.Errorf("move brain volume: inspect container: %w", err)
	} else if found {
		if c.Config == nil || !b.ownsLabels(c.Config.Labels) {
			return fmt.Errorf("move brain volume: container %s is another fleet's: left alone", orchestrator.ContainerName(engineID))
		}
		if err := b.removeContainerByID(ctx, c, b.cfg.ReplaceGrace); err != nil {
			return fmt.Errorf("move brain volume: remove container: %w", err)
		}
	}
	entries, size, err := b.copyToBrainDir(ctx, engineID, image)
	if err != nil {
		return fmt.Errorf("move brain volume: %w", err)
	}
	if err := b.step(stepCopied); err != nil {
		return err
	}
	if err := b.dropVolume(ctx, engineID, v.Name); err != nil {
		return fmt.Errorf("move brain volume: %w", err)
	}
	if err := b.step(stepRemoved); err != nil {
		return err
	}
	if err := b.createVolume(ctx, engineID, productID); err != nil {
		return fmt.Errorf("move brain volume: %w", err)
	}
	log.Info("brain volume moved under the data root", "entries", entries, "bytes", size, "took", time.Since(started).Round(time.Millisecond))
	return nil
}

// copyToBrainDir makes the brain directory an exact copy of the engine's
// (old) volume, unless it already is one, and verifies it.
func (b *Backend) copyToBrainDir(ctx context.Context, engineID, image string) (entries int, size int64, err error) {
	src, err := b.createHelper(ctx, engineID, image)
	if err != nil {
		return 0, 0, err
	}
	defer b.removeHelper(ctx, src)
	dst, err := b.createRootHelper(ctx, engineID, image)
	if err != nil {
		return 0, 0, err
	}
	defer b.removeHelper(ctx, dst)
	if err := b.makeBrainDir(ctx, dst, engineID, false); err != nil {
		return 0, 0, err
	}

	want, err := b.treeSums(ctx, src, DataDir)
	if err != nil {
		return 0, 0, fmt.Errorf("read volume: %w", err)
	}
	dirPath := rootMount + "/engines/" + engineID + "/data"
	have, err := b.treeSums(ctx, dst, dirPath)
	if err != nil {
		return 0, 0, fmt.Errorf("read brain directory: %w", err)
	}
	if diff := want.diff(have); diff != "" {
		res, err := b.cli.CopyFromContainer(ctx, src, client.CopyFromContainerOptions{SourcePath: DataDir})
		if err != nil {
			return 0, 0, fmt.Errorf("copy from volume: %w", err)
		}
		defer res.Content.Close()
		prefix := strings.TrimPrefix(dirPath, "/")
		n := 0
		err = b.extractAt(ctx, dst, true, func(w io.Writer) error {
			tw := tar.NewWriter(w)
			if err := b.dirEntries(tw, engineID, true); err != nil {
				return err
			}
			return rewriteTar(res.Content, tw, func(hdr *tar.Header) (*tar.Header, error) {
				// Owners, modes and times as they are: a copy, not a restore.
				name := strings.TrimPrefix(hdr.Name, "./")
				rest, ok := strings.CutPrefix(name, "data")
				if !ok || rest != "" && !strings.HasPrefix(rest, "/") {
					return nil, fmt.Errorf("read archive: unexpected entry %q", hdr.Name)
				}
				out := cleanHeader(hdr)
				out.Name = prefix + rest
				if hdr.Typeflag == tar.TypeLink {
					link := strings.TrimPrefix(hdr.Linkname, "./")
					lrest, ok := strings.CutPrefix(link, "data/")
					if !ok {
						return nil, fmt.Errorf("read archive: unexpected hard link %q", hdr.Linkname)
					}
					out.Linkname = prefix + "/" + lrest
				}
				if n++; n == 3 {
					if err := b.step(stepCopying); err != nil {
						return nil, err
					}
				}
				return out, nil
			})
		})
		if err != nil {
			return 0, 0, fmt.Errorf("copy into brain directory: %w", err)
		}
		if have, err = b.treeSums(ctx, dst, dirPath); err != nil {
			return 0, 0, fmt.Errorf("read brain directory: %w", err)
		}
		if diff := want.diff(have); diff != "" {
			return 0, 0, fmt.Errorf("copy differs from the volume (%s): volume kept", diff)
		}
	}
	for _, s := range want {
		size += s.size
	}
	return len(want), size, nil
}

func (b *Backend) ownsLabels(l map[string]string) bool {
	mine, _ := b.ours(l)
	return mine
}

// step runs the test hook for a migration step (nil in production).
func (b *Backend) step(name string) error {
	if b.migrateHook == nil {
		return nil
	}
	return b.migrateHook(name)
}

// entrySum is what a migration compares of one entry.
type entrySum struct {
	typ        byte
	mode       int64
	uid, gid   int
	size       int64
	link, hash string
}

type treeSum map[string]entrySum

// treeSums reads the tree at dir of a container as docker archives it and
// sums every entry; names are relative to dir ("." is dir itself).
func (b *Backend) treeSums(ctx context.Context, containerID, dir string) (treeSum, error) {
	res, err := b.cli.CopyFromContainer(ctx, containerID, client.CopyFromContainerOptions{SourcePath: dir})
	if err != nil {
		return nil, fmt.Errorf("copy from container: %w", err)
	}
	defer res.Content.Close()
	base := path.Base(dir)
	out := treeSum{}
	tr := tar.NewReader(res.Content)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read archive: %w", err)
		}
		rel := func(name string) string {
			name = strings.TrimSuffix(strings.TrimPrefix(name, "./"), "/")
			if name == base {
				return "."
			}
			return strings.TrimPrefix(name, base+"/")
		}
		s := entrySum{typ: hdr.Typeflag, mode: hdr.Mode, uid: hdr.Uid, gid: hdr.Gid, size: hdr.Size}
		switch hdr.Typeflag {
		case tar.TypeReg:
			h := sha256.New()
			if _, err := io.Copy(h, tr); err != nil {
				return nil, fmt.Errorf("read archive: %w", err)
			}
			s.hash = hex.EncodeToString(h.Sum(nil))
		case tar.TypeLink:
			s.link = rel(hdr.Linkname)
		case tar.TypeSymlink:
			s.link = hdr.Linkname
		}
		out[rel(hdr.Name)] = s
	}
}

// diff names the first difference between two trees ("" = none).
func (t treeSum) diff(other treeSum) string {
	for name, s := range t {
		o, ok := other[name]
		switch {
		case !ok:
			return name + " missing"
		case o != s:
			return name + " differs"
		}
	}
	for name := range other {
		if _, ok := t[name]; !ok {
			return name + " not in the volume"
		}
	}
	return ""
}
