package dockertest

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/enginefleet/orchestrator/internal/testenv"
	"github.com/moby/moby/api/pkg/stdcopy"
	"github.com/moby/moby/api/types/build"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/client"
)

// dialerSource is a program that tries a TCP connection to each of its
// arguments ("host:port"), all at once, and prints one line per argument:
// "<addr> open" or "<addr> blocked <why>". It stands in for a compromised
// engine probing its neighbours, without exec into an engine.
const dialerSource = `package main

import (
	"fmt"
	"net"
	"os"
	"sync"
	"time"
)

func main() {
	out := make([]string, len(os.Args)-1)
	var wg sync.WaitGroup
	for i, addr := range os.Args[1:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", addr, 3*time.Second)
			if err != nil {
				out[i] = addr + " blocked " + err.Error()
				return
			}
			c.Close()
			out[i] = addr + " open"
		}()
	}
	wg.Wait()
	for _, l := range out {
		fmt.Println(l)
	}
}
`

// DialerImage returns a tiny image (a static Go binary FROM scratch, built
// here, labelled LabelTest) that dials each of its arguments and reports:
// see RunDialer. It is built once per source and Go version.
func DialerImage(t testing.TB) string {
	t.Helper()
	cli := RequireDocker(t)
	sum := sha256.Sum256([]byte(runtime.Version() + "\n" + dialerSource))
	ref := "enginefleet/test-dialer:" + hex.EncodeToString(sum[:6])
	imageMu.Lock()
	defer imageMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := cli.ImageInspect(ctx, ref); err == nil {
		return ref
	} else if !cerrdefs.IsNotFound(err) {
		t.Fatalf("inspect image %s: %v", ref, err)
	}
	unlock := testenv.LockFile(t, "enginefleet-dialer-image.lock")
	defer unlock()
	if _, err := cli.ImageInspect(ctx, ref); err == nil {
		return ref
	}
	dir := t.TempDir()
	for name, content := range map[string]string{"main.go": dialerSource, "go.mod": "module dialer\n\ngo 1.26\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w", "-o", "dialer", ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOFLAGS=-mod=mod", "GOWORK=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build dialer: %v\n%s", err, out)
	}
	bin, err := os.ReadFile(filepath.Join(dir, "dialer"))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range []struct {
		name string
		mode int64
		data []byte
	}{
		{"Dockerfile", 0o644, []byte("FROM scratch\nCOPY dialer /dialer\nUSER 65532:65532\nENTRYPOINT [\"/dialer\"]\n")},
		{"dialer", 0o755, bin},
	} {
		if err := tw.WriteHeader(&tar.Header{Name: f.name, Mode: f.mode, Size: int64(len(f.data)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		tw.Write(f.data) //nolint:errcheck
	}
	tw.Close() //nolint:errcheck
	res, err := cli.ImageBuild(ctx, &buf, client.ImageBuildOptions{Tags: []string{ref}, Dockerfile: "Dockerfile",
		Remove: true, ForceRemove: true, Version: build.BuilderV1, Labels: map[string]string{LabelTest: "true"}})
	if err != nil {
		t.Fatalf("build dialer image: %v", err)
	}
	defer res.Body.Close()
	if err := readBuildStream(res.Body); err != nil {
		t.Fatalf("build dialer image: %v", err)
	}
	return ref
}

// RunDialer runs the dialer image in network mode netMode (a network id,
// or "host") and returns, per target, "open" or "blocked <why>". The
// container is labelled LabelTest and removed.
func RunDialer(t testing.TB, netMode string, targets ...string) map[string]string {
	t.Helper()
	cli := RequireDocker(t)
	image := DialerImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := cli.ContainerCreate(ctx, client.ContainerCreateOptions{
		Name:       "enginefleet-test-dialer-" + randName(""),
		Config:     &container.Config{Image: image, Cmd: targets, Labels: map[string]string{LabelTest: "true"}},
		HostConfig: &container.HostConfig{NetworkMode: container.NetworkMode(netMode), CapDrop: []string{"ALL"}},
	})
	if err != nil {
		t.Fatalf("create dialer: %v", err)
	}
	defer cli.ContainerRemove(context.Background(), res.ID, client.ContainerRemoveOptions{Force: true}) //nolint:errcheck
	wait := cli.ContainerWait(ctx, res.ID, client.ContainerWaitOptions{Condition: container.WaitConditionNextExit})
	if _, err := cli.ContainerStart(ctx, res.ID, client.ContainerStartOptions{}); err != nil {
		t.Fatalf("start dialer: %v", err)
	}
	select {
	case r := <-wait.Result:
		if r.StatusCode != 0 {
			t.Fatalf("dialer exited %d", r.StatusCode)
		}
	case err := <-wait.Error:
		t.Fatalf("wait for dialer: %v", err)
	}
	logs, err := cli.ContainerLogs(ctx, res.ID, client.ContainerLogsOptions{ShowStdout: true, ShowStderr: true})
	if err != nil {
		t.Fatalf("dialer logs: %v", err)
	}
	defer logs.Close()
	var stdout, stderr bytes.Buffer
	if _, err := stdcopy.StdCopy(&stdout, &stderr, logs); err != nil {
		t.Fatalf("dialer logs: %v", err)
	}
	out := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(stdout.String()), "\n") {
		addr, verdict, _ := strings.Cut(line, " ")
		out[addr] = verdict
	}
	for _, tgt := range targets {
		if _, ok := out[tgt]; !ok {
			t.Fatalf("dialer said nothing of %s: %s%s", tgt, stdout.String(), stderr.String())
		}
	}
	return out
}

// ContainerIP is a container's address on network netID.
func ContainerIP(t testing.TB, ref, netID string) string {
	t.Helper()
	res, err := RequireDocker(t).ContainerInspect(context.Background(), ref, client.ContainerInspectOptions{})
	if err != nil {
		t.Fatalf("inspect %s: %v", ref, err)
	}
	if res.Container.NetworkSettings != nil {
		for _, ep := range res.Container.NetworkSettings.Networks {
			if ep != nil && ep.NetworkID == netID && ep.IPAddress.IsValid() {
				return ep.IPAddress.String()
			}
		}
	}
	t.Fatalf("%s has no address on network %s", ref, shortID(netID))
	return ""
}

func randName(prefix string) string {
	b := make([]byte, 6)
	rand.Read(b) //nolint:errcheck
	return prefix + hex.EncodeToString(b)
}
