package docker

import (
	"archive/tar"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/mount"
	"github.com/moby/moby/client"

	orchestrator "github.com/enginefleet/orchestrator"
)

// EngineUID and EngineGID are DefaultUser's: the reference engine runs as
// 65532 (nonroot) on a read-only root filesystem.
const (
	EngineUID = 65532
	EngineGID = 65532
)

// helperEntrypoint is never run: helpers are created, never started, so
// any image works, even one without an entrypoint.
const helperEntrypoint = "/orchestrator-helper-never-started"

var errCopyDone = errors.New("copy to container finished")

// CopyDataOut writes a tar stream of the engine's volume (paths relative to
// the volume root, no leading directory) to w. With an engine container, in
// any state, it copies from that container: docker (20.10 included) reads
// the archive of a paused container without thawing it, so a caller that
// Pauses first gets a consistent copy. Without a container it copies from
// a helper container (created, never started) mounting the volume; its image
// is Config.HelperImage or the image of another managed container on this
// node. A missing volume is an error with ErrNotFound in the chain.
func (b *Backend) CopyDataOut(ctx context.Context, engineID string, w io.Writer) error {
	if err := validID(engineID); err != nil {
		return fmt.Errorf("copy data out: %w", err)
	}
	c, found, err := b.inspectContainer(ctx, engineID)
	if err != nil {
		return fmt.Errorf("copy data out: %w", err)
	}
	src := ""
	if found && mountsVolume(c, orchestrator.VolumeName(engineID)) {
		switch stateOf(c) {
		case container.StateDead, container.StateRemoving:
		default:
			src = c.ID
		}
	}
	if src == "" {
		if _, err := b.cli.VolumeInspect(ctx, orchestrator.VolumeName(engineID), client.VolumeInspectOptions{}); err != nil {
			if cerrdefs.IsNotFound(err) {
				return fmt.Errorf("copy data out: volume %s: %w", orchestrator.VolumeName(engineID), ErrNotFound)
			}
			return fmt.Errorf("copy data out: inspect volume: %w", err)
		}
		image, err := b.helperImage(ctx, c)
		if err != nil {
			return fmt.Errorf("copy data out: %w", err)
		}
		helper, err := b.createHelper(ctx, engineID, image)
		if err != nil {
			return fmt.Errorf("copy data out: %w", err)
		}
		defer b.removeHelper(ctx, helper)
		src = helper
	}

	res, err := b.cli.CopyFromContainer(ctx, src, client.CopyFromContainerOptions{SourcePath: DataDir})
	if err != nil {
		return fmt.Errorf("copy data out: copy from container: %w", err)
	}
	defer res.Content.Close()
	if err := stripDataDir(res.Content, w, path.Base(DataDir)); err != nil {
		return fmt.Errorf("copy data out: %w", err)
	}
	return nil
}

// CopyDataIn makes the engine's volume contain exactly the tar stream r
// (layout of CopyDataOut). It removes the engine's container (the caller
// Ensures and Starts it again), removes and recreates the volume with the
// same labels, and extracts r through a helper container created from image
// (never started, mounting the volume without docker's copy of the image's
// /data). Every entry, and the volume root (mode 0755), is owned by
// Config.User afterwards, whatever owners r has. Absolute paths, ".."
// escapes and device files are rejected; the volume is then left partly
// restored and a retry starts over.
func (b *Backend) CopyDataIn(ctx context.Context, engineID, image string, r io.Reader) error {
	if err := validID(engineID); err != nil {
		return fmt.Errorf("copy data in: %w", err)
	}
	if image == "" {
		return errors.New("copy data in: empty image")
	}
	if err := b.ensureImage(ctx, image); err != nil {
		return fmt.Errorf("copy data in: %w", err)
	}
	productID, err := b.productOf(ctx, engineID)
	if err != nil {
		return fmt.Errorf("copy data in: %w", err)
	}
	if err := b.RemoveContainer(ctx, engineID); err != nil {
		return fmt.Errorf("copy data in: %w", err)
	}
	if err := b.removeVolume(ctx, engineID, image); err != nil {
		return fmt.Errorf("copy data in: %w", err)
	}
	if _, err := b.ensureVolume(ctx, engineID, productID, image); err != nil {
		return fmt.Errorf("copy data in: %w", err)
	}
	helper, err := b.createHelper(ctx, engineID, image)
	if err != nil {
		return fmt.Errorf("copy data in: %w", err)
	}
	defer b.removeHelper(ctx, helper)

	uid, gid := b.cfg.owner()
	err = b.extractAtRoot(ctx, helper, func(w io.Writer) error {
		return rebaseTar(r, w, strings.TrimPrefix(DataDir, "/"), uid, gid)
	})
	if err != nil {
		return fmt.Errorf("copy data in: %w", err)
	}
	b.log.Info("restored volume", "engine_id", engineID)
	return nil
}

// extractAtRoot extracts the tar stream that write produces at "/" of the
// helper container, whose entries are all under "data/": the "data/" entry
// itself then sets the volume root's owner (docker ignores a root entry
// extracted at the directory itself). The daemon applies the archive's
// owners as they are.
func (b *Backend) extractAtRoot(ctx context.Context, helper string, write func(io.Writer) error) error {
	return b.extractAt(ctx, helper, false, write)
}

// extractAt is extractAtRoot; with replaceDirs, a file entry where a
// directory is replaces the directory and everything in it (the only way
// the API removes a tree).
func (b *Backend) extractAt(ctx context.Context, helper string, replaceDirs bool, write func(io.Writer) error) error {
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := write(pw)
		pw.CloseWithError(err)
		done <- err
	}()
	_, cerr := b.cli.CopyToContainer(ctx, helper, client.CopyToContainerOptions{
		DestinationPath:           "/",
		Content:                   pr,
		AllowOverwriteDirWithFile: replaceDirs,
	})
	pr.CloseWithError(errCopyDone) // unblocks the writer if the daemon stopped reading
	terr := <-done
	switch {
	case terr != nil && !errors.Is(terr, errCopyDone) && !errors.Is(terr, io.ErrClosedPipe):
		return terr // bad or unreadable archive
	case cerr != nil:
		return fmt.Errorf("copy to container: %w", cerr)
	case terr != nil:
		return fmt.Errorf("archive not fully read by the daemon: %w", terr)
	}
	return nil
}

// productOf reads the product id from the volume's or the container's
// labels, so a recreated volume keeps it.
func (b *Backend) productOf(ctx context.Context, engineID string) (string, error) {
	v, err := b.cli.VolumeInspect(ctx, orchestrator.VolumeName(engineID), client.VolumeInspectOptions{})
	switch {
	case err == nil:
		if p := v.Volume.Labels[orchestrator.LabelProductID]; p != "" {
			return p, nil
		}
	case !cerrdefs.IsNotFound(err):
		return "", fmt.Errorf("inspect volume: %w", err)
	}
	c, found, err := b.inspectContainer(ctx, engineID)
	if err != nil {
		return "", fmt.Errorf("inspect container: %w", err)
	}
	if found && c.Config != nil {
		return c.Config.Labels[orchestrator.LabelProductID], nil
	}
	return "", nil
}

func mountsVolume(c container.InspectResponse, volume string) bool {
	for _, m := range c.Mounts {
		if m.Type == mount.TypeVolume && m.Name == volume && m.Destination == DataDir {
			return true
		}
	}
	return false
}

// helperImage picks an image available locally for a helper container:
// the engine container's own, Config.HelperImage, then the image of any
// managed container on this node.
func (b *Backend) helperImage(ctx context.Context, engine container.InspectResponse) (string, error) {
	var candidates []string
	if engine.Config != nil && engine.Config.Image != "" {
		candidates = append(candidates, engine.Config.Image)
	}
	if b.cfg.HelperImage != "" {
		candidates = append(candidates, b.cfg.HelperImage)
	}
	res, err := b.cli.ContainerList(ctx, client.ContainerListOptions{All: true, Filters: b.managedFilters()})
	if err != nil {
		return "", fmt.Errorf("list containers: %w", err)
	}
	for _, c := range res.Items {
		if img := c.Labels[LabelImage]; img != "" {
			candidates = append(candidates, img)
		}
		candidates = append(candidates, c.ImageID)
	}
	seen := map[string]bool{}
	for _, img := range candidates {
		if img == "" || seen[img] {
			continue
		}
		seen[img] = true
		if _, err := b.cli.ImageInspect(ctx, img); err == nil {
			return img, nil
		}
	}
	return "", errors.New("no image for a helper container: engine has no container, no helper image configured and no managed container's image is available")
}

// createHelper creates (never starts) a labelled container from image with
// the engine's volume at /data and no network. NoCopy keeps docker from
// copying the image's /data into an empty volume: a helper never changes
// what it reads, and a restore gets exactly its archive.
func (b *Backend) createHelper(ctx context.Context, engineID, image string) (string, error) {
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	name := "engine-helper-" + engineID + "-" + hex.EncodeToString(rnd[:])
	labels := b.baseLabels(engineID, "")
	labels[LabelRole] = RoleHelper
	res, err := b.cli.ContainerCreate(ctx, client.ContainerCreateOptions{
		Name: name,
		Config: &container.Config{
			Image:           image,
			Entrypoint:      []string{helperEntrypoint},
			Cmd:             []string{},
			Labels:          labels,
			NetworkDisabled: true,
		},
		HostConfig: &container.HostConfig{
			NetworkMode: "none",
			Mounts: []mount.Mount{{
				Type:          mount.TypeVolume,
				Source:        orchestrator.VolumeName(engineID),
				Target:        DataDir,
				VolumeOptions: &mount.VolumeOptions{NoCopy: true},
			}},
			CapDrop:     []string{"ALL"},
			SecurityOpt: []string{"no-new-privileges:true"},
		},
	})
	if err != nil {
		return "", fmt.Errorf("create helper container: %w", err)
	}
	return res.ID, nil
}

// removeHelper removes a helper container, also when ctx is done.
func (b *Backend) removeHelper(ctx context.Context, id string) {
	cctx, cancel := cleanupCtx(ctx)
	defer cancel()
	if err := b.removeContainerRef(cctx, id); err != nil {
		b.log.Warn("remove helper container", "container_id", shortID(id), "error", err)
	}
}

// stripDataDir copies the tar docker made of /data (entries "data/...")
// to w with paths relative to the volume root; the root entry is dropped.
func stripDataDir(r io.Reader, w io.Writer, dir string) error {
	prefix := dir + "/"
	return rewriteTar(r, tar.NewWriter(w), func(hdr *tar.Header) (*tar.Header, error) {
		name := strings.TrimPrefix(hdr.Name, "./")
		if name == dir || name == prefix {
			return nil, nil
		}
		if !strings.HasPrefix(name, prefix) {
			return nil, fmt.Errorf("read archive: unexpected entry %q outside %s", hdr.Name, dir)
		}
		out := cleanHeader(hdr)
		out.Name = strings.TrimPrefix(name, prefix)
		if hdr.Typeflag == tar.TypeLink {
			out.Linkname = strings.TrimPrefix(strings.TrimPrefix(hdr.Linkname, "./"), prefix)
		}
		return out, nil
	})
}

// rebaseTar copies the tar r (paths relative to the volume root) to w with
// every path under dir/, a dir/ entry first, and every entry owned by
// uid:gid: the daemon applies the archive's owners as they are (without
// copyUIDGID), so this is what makes the files the engine's. Entries that
// would land outside dir, and device files, are rejected.
func rebaseTar(r io.Reader, w io.Writer, dir string, uid, gid int) error {
	tw := tar.NewWriter(w)
	if err := tw.WriteHeader(&tar.Header{
		Typeflag: tar.TypeDir,
		Name:     dir + "/",
		Mode:     0o755,
		Uid:      uid,
		Gid:      gid,
		ModTime:  time.Now(),
	}); err != nil {
		return fmt.Errorf("write archive: %w", err)
	}
	return rewriteTar(r, tw, func(hdr *tar.Header) (*tar.Header, error) {
		name, ok := safeName(hdr.Name)
		if !ok {
			return nil, fmt.Errorf("read archive: unsafe path %q", hdr.Name)
		}
		if name == "." {
			return nil, nil // the root entry was written above
		}
		switch hdr.Typeflag {
		case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
			return nil, fmt.Errorf("read archive: device or fifo %q not allowed", hdr.Name)
		}
		out := cleanHeader(hdr)
		out.Name = dir + "/" + name
		if hdr.Typeflag == tar.TypeDir {
			out.Name += "/"
		}
		if hdr.Typeflag == tar.TypeLink {
			link, ok := safeName(hdr.Linkname)
			if !ok || link == "." {
				return nil, fmt.Errorf("read archive: unsafe hard link %q", hdr.Linkname)
			}
			out.Linkname = dir + "/" + link
		}
		out.Uid, out.Gid = uid, gid
		out.Uname, out.Gname = "", ""
		return out, nil
	})
}

// rewriteTar copies every entry of r to tw as rewrite says (nil header:
// leave the entry out), then closes tw.
func rewriteTar(r io.Reader, tw *tar.Writer, rewrite func(*tar.Header) (*tar.Header, error)) error {
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read archive: %w", err)
		}
		out, err := rewrite(hdr)
		if err != nil {
			return err
		}
		if out == nil {
			continue
		}
		if err := tw.WriteHeader(out); err != nil {
			return fmt.Errorf("write archive: %w", err)
		}
		if _, err := io.Copy(tw, tr); err != nil {
			return fmt.Errorf("copy archive: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("write archive: %w", err)
	}
	return nil
}

// safeName cleans a relative archive path; ok is false for absolute paths
// and paths escaping the root.
func safeName(name string) (string, bool) {
	if strings.HasPrefix(name, "/") {
		return "", false
	}
	clean := path.Clean(name)
	if clean == ".." || strings.HasPrefix(clean, "../") {
		return "", false
	}
	return clean, true
}

// cleanHeader copies hdr for a tar.Writer: PAX records the Reader already
// folded into fields are dropped, and the writer picks the format.
func cleanHeader(hdr *tar.Header) *tar.Header {
	out := *hdr
	out.Format = tar.FormatUnknown
	if len(hdr.PAXRecords) > 0 {
		out.PAXRecords = make(map[string]string, len(hdr.PAXRecords))
		for k, v := range hdr.PAXRecords {
			switch k {
			case "path", "linkpath", "size", "uid", "gid", "uname", "gname", "mtime", "atime", "ctime":
				continue
			}
			out.PAXRecords[k] = v
		}
	}
	return &out
}
