package docker

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/moby/moby/client"
)

// ensureOwner makes every file of the engine's volume, and its root, belong
// to Config.User, reading it through the engine's container (created, not
// started: nothing writes the volume). A volume already owned throughout is
// only read: the look stops at the first entry of another owner. Otherwise
// the volume is streamed back into itself through a helper container with
// the owners rewritten: each entry is extracted only after it has been read
// whole, and docker replaces a file rather than writing into it, so the
// rewrite never reads what it wrote. Modes, contents and links are kept.
// fixed says whether any owner had to be rewritten.
func (b *Backend) ensureOwner(ctx context.Context, engineID, image, containerID string) (fixed bool, err error) {
	uid, gid := b.cfg.owner()
	res, err := b.cli.CopyFromContainer(ctx, containerID, client.CopyFromContainerOptions{SourcePath: DataDir})
	if err != nil {
		return false, fmt.Errorf("check volume owner: copy from container: %w", err)
	}
	foreign, err := firstForeign(res.Content, uid, gid)
	res.Content.Close()
	if err != nil {
		return false, fmt.Errorf("check volume owner: %w", err)
	}
	if foreign == nil {
		return false, nil
	}
	b.log.Info("brain volume has files of another user: making them the engine user's", "engine_id", engineID,
		"user", b.cfg.User, "entry", foreign.Name, "entry_owner", fmt.Sprintf("%d:%d", foreign.Uid, foreign.Gid))

	helper, err := b.createHelper(ctx, engineID, image)
	if err != nil {
		return true, fmt.Errorf("fix volume owner: %w", err)
	}
	defer b.removeHelper(ctx, helper)
	src, err := b.cli.CopyFromContainer(ctx, containerID, client.CopyFromContainerOptions{SourcePath: DataDir})
	if err != nil {
		return true, fmt.Errorf("fix volume owner: copy from container: %w", err)
	}
	defer src.Content.Close()
	n := 0
	err = b.extractAtRoot(ctx, helper, func(w io.Writer) error {
		return rewriteTar(src.Content, tar.NewWriter(w), func(hdr *tar.Header) (*tar.Header, error) {
			out := cleanHeader(hdr)
			out.Uid, out.Gid = uid, gid
			out.Uname, out.Gname = "", ""
			n++
			return out, nil
		})
	})
	if err != nil {
		return true, fmt.Errorf("fix volume owner: %w", err)
	}
	b.log.Info("brain volume owner fixed", "engine_id", engineID, "user", b.cfg.User, "entries", n)
	return true, nil
}

// firstForeign returns the first entry of the tar r not owned by uid:gid,
// or nil when every entry is.
func firstForeign(r io.Reader, uid, gid int) (*tar.Header, error) {
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read archive: %w", err)
		}
		if hdr.Uid != uid || hdr.Gid != gid {
			return hdr, nil
		}
	}
}
