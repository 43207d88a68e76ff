package docker_test

import (
	"net"
	"strconv"
	"strings"
	"testing"

	"github.com/enginefleet/orchestrator/backend/docker/dockertest"

	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	orchestrator "github.com/enginefleet/orchestrator"
	"github.com/enginefleet/orchestrator/backend/docker"
)

// engineNetwork is the id of the network the engine's container is on.
func engineNetwork(t *testing.T, engineID string) network.Inspect {
	t.Helper()
	cli := rawClient(t)
	c, err := cli.ContainerInspect(t.Context(), orchestrator.ContainerName(engineID), client.ContainerInspectOptions{})
	require.NoError(t, err)
	n, err := cli.NetworkInspect(t.Context(), string(c.Container.HostConfig.NetworkMode), client.NetworkInspectOptions{})
	require.NoError(t, err)
	return n.Network
}

// Two engines on the engines' network cannot reach each other, nor a
// listener on the host's loopback (the orchestrator's private ports), nor
// each other's published port through the bridge's gateway: a container
// of their network (a tiny dialer standing in for a compromised engine)
// finds all of it closed. From the host's network namespace, where the
// workers probe and products connect, both engines answer.
func TestEnginesCannotReachEachOther(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	netName := testNetwork + "_iso_" + randHex(4)
	t.Cleanup(func() {
		dockertest.RemoveNetworkIfEmpty(netName)
		dockertest.RemoveNetworkIfEmpty(netName + docker.IsolatedSuffix)
	})
	b := newBackend(t, func(c *docker.Config) { c.Network = netName })
	image := engineImage(t)
	one, two := newEngine(t, b, image), newEngine(t, b, image)
	for _, e := range []*testEngine{one, two} {
		require.NoError(t, b.Ensure(ctx, e.spec))
		require.NoError(t, b.Start(ctx, e.spec.EngineID))
		e.waitHealthy(t) // the workers' probe: 127.0.0.1:<published port>
	}
	n := engineNetwork(t, one.spec.EngineID)
	assert.Equal(t, netName, n.Name)
	assert.Equal(t, "false", n.Options[docker.OptionICC], "inter-container communication is off")
	require.NotEmpty(t, n.IPAM.Config)
	gw := n.IPAM.Config[0].Gateway.String()

	// What stands for the orchestrator's own private listeners (metrics on
	// 127.0.0.1:9464, Postgres on the host's loopback).
	private, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer private.Close()
	go func() {
		for {
			c, err := private.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	privatePort := strconv.Itoa(private.Addr().(*net.TCPAddr).Port)

	ipOne := dockertest.ContainerIP(t, orchestrator.ContainerName(one.spec.EngineID), n.ID)
	ipTwo := dockertest.ContainerIP(t, orchestrator.ContainerName(two.spec.EngineID), n.ID)
	targets := []string{
		ipOne + ":8000", ipTwo + ":8000", // the engines, directly
		gw + ":" + strconv.Itoa(one.spec.HostPort), gw + ":" + strconv.Itoa(two.spec.HostPort), // their published ports, via the host
		gw + ":" + privatePort, // the host's loopback-only listener
	}
	for addr, verdict := range dockertest.RunDialer(t, n.ID, targets...) {
		assert.True(t, strings.HasPrefix(verdict, "blocked"), "a container on the engines' network reaches %s: %s", addr, verdict)
	}

	// The control: from the host's namespace the same dialer reaches both.
	hostTargets := []string{"127.0.0.1:" + strconv.Itoa(one.spec.HostPort), "127.0.0.1:" + strconv.Itoa(two.spec.HostPort)}
	for addr, verdict := range dockertest.RunDialer(t, "host", hostTargets...) {
		assert.Equal(t, "open", verdict, addr)
	}
}

// A deployment upgraded from a version whose engines' network let
// containers reach each other: that network is never used again. While
// engines are still on it, new containers go on "<name>_isolated" and List
// reports the old engines Unisolated; Ensure moves an engine over; once
// nothing uses the old network it is removed (it is this node's).
func TestOpenNetworkReplaced(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	netName := testNetwork + "_open_" + randHex(4)
	t.Cleanup(func() {
		dockertest.RemoveNetworkIfEmpty(netName)
		dockertest.RemoveNetworkIfEmpty(netName + docker.IsolatedSuffix)
	})
	b := newBackend(t, func(c *docker.Config) { c.Network = netName })
	cli := rawClient(t)
	image := engineImage(t)

	// What the older version left: its network (ICC on), labelled as
	// this node's, and an engine container on it.
	old, err := cli.NetworkCreate(ctx, netName, client.NetworkCreateOptions{Driver: "bridge",
		Labels: map[string]string{testLabel: "true", orchestrator.LabelManaged: "true", orchestrator.LabelNode: b.Config().Node}})
	require.NoError(t, err)
	legacy := newEngine(t, b, image)
	_, err = cli.ContainerCreate(ctx, client.ContainerCreateOptions{
		Name: orchestrator.ContainerName(legacy.spec.EngineID),
		Config: &container.Config{Image: image, Env: []string{"ENGINE_KEY_HASH=" + legacy.spec.Env["ENGINE_KEY_HASH"]},
			Labels: map[string]string{testLabel: "true", orchestrator.LabelManaged: "true", orchestrator.LabelNode: b.Config().Node,
				orchestrator.LabelEngineID: legacy.spec.EngineID}},
		HostConfig: &container.HostConfig{NetworkMode: container.NetworkMode(old.ID)},
	})
	require.NoError(t, err)

	require.NoError(t, b.Prepare(ctx))
	_, err = cli.NetworkInspect(ctx, old.ID, client.NetworkInspectOptions{})
	require.NoError(t, err, "a network still in use is kept")

	fresh := newEngine(t, b, image)
	require.NoError(t, b.Ensure(ctx, fresh.spec))
	n := engineNetwork(t, fresh.spec.EngineID)
	assert.Equal(t, netName+docker.IsolatedSuffix, n.Name)
	assert.Equal(t, "false", n.Options[docker.OptionICC])

	rts, _, err := b.List(ctx)
	require.NoError(t, err)
	unisolated := map[string]bool{}
	for _, r := range rts {
		unisolated[r.EngineID] = r.Unisolated
	}
	assert.Equal(t, map[string]bool{legacy.spec.EngineID: true, fresh.spec.EngineID: false}, unisolated)

	// Recreating the old engine puts it on the isolated network, which
	// empties the old one: the next look removes it.
	require.NoError(t, b.Ensure(ctx, legacy.spec))
	assert.Equal(t, n.ID, engineNetwork(t, legacy.spec.EngineID).ID)
	again := newBackend(t, func(c *docker.Config) { c.Network = netName; c.Node = b.Config().Node })
	require.NoError(t, again.Prepare(ctx))
	_, err = cli.NetworkInspect(ctx, old.ID, client.NetworkInspectOptions{})
	assert.Error(t, err, "the emptied old network is removed")
	other := newEngine(t, again, image)
	require.NoError(t, again.Ensure(ctx, other.spec))
	assert.Equal(t, n.ID, engineNetwork(t, other.spec.EngineID).ID, "engines stay on the isolated network")
	rts, _, err = again.List(ctx)
	require.NoError(t, err)
	for _, r := range rts {
		assert.False(t, r.Unisolated, r.EngineID)
	}

	// Someone else's open network of that name is never removed.
	foreignName := testNetwork + "_foreign_" + randHex(4)
	t.Cleanup(func() {
		dockertest.RemoveNetworkIfEmpty(foreignName)
		dockertest.RemoveNetworkIfEmpty(foreignName + docker.IsolatedSuffix)
	})
	foreign, err := cli.NetworkCreate(ctx, foreignName, client.NetworkCreateOptions{Driver: "bridge", Labels: map[string]string{testLabel: "true"}})
	require.NoError(t, err)
	fb := newBackend(t, func(c *docker.Config) { c.Network = foreignName })
	require.NoError(t, fb.Prepare(ctx))
	_, err = cli.NetworkInspect(ctx, foreign.ID, client.NetworkInspectOptions{})
	require.NoError(t, err, "a network that is not this node's is left alone")
	fe := newEngine(t, fb, image)
	require.NoError(t, fb.Ensure(ctx, fe.spec))
	assert.Equal(t, foreignName+docker.IsolatedSuffix, engineNetwork(t, fe.spec.EngineID).Name)
}
