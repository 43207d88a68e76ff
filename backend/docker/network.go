package docker

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/container"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"

	orchestrator "github.com/enginefleet/orchestrator"
)

// Engines share one bridge network with inter-container communication
// disabled: an engine reaches the outside world (its model provider) but
// not another engine, nor any other container on that bridge. Its only way
// in is the port published on the host's 127.0.0.1, which containers
// cannot reach either (their 127.0.0.1 is their own, and the proxy
// listens on the host's loopback only): whoever talks to engines (the
// workers' probe, products) does so from the engine host's own network
// namespace. One bridge holds about 1,000 endpoints (a Linux bridge's port
// limit); the isolation costs nothing per engine (one DROP rule per
// bridge), where a network per engine would cost a bridge, a subnet and
// iptables chains each and exhaust docker's default address pools after
// about 30 engines.

// OptionICC is the bridge driver option that allows (or, "false", forbids)
// traffic between containers of one bridge network.
const OptionICC = "com.docker.network.bridge.enable_icc"

// IsolatedSuffix names the engines' network when the configured name is
// taken by a network that lets containers reach each other, which an older
// version created (or compose did): engines move to "<name>_isolated" while
// the old one still has containers, and the old one is removed once empty
// (if it is this node's).
const IsolatedSuffix = "_isolated"

// networkSettle bounds how long the daemon takes to create a network. A
// network stamps its Created time when its creation starts and is listed
// only when it ends, so a creator that lists right after creating may not
// yet see a rival that started earlier and will win by age. Once the oldest
// listed network is this old, every network older than it is listed too.
const networkSettle = 2 * time.Second

// legacyWarnEvery spaces the warnings about an open network still in use.
const legacyWarnEvery = 10 * time.Minute

// isolated reports whether n is a bridge whose containers cannot reach
// each other.
func isolated(n network.Summary) bool {
	return n.Driver == "bridge" && n.Options[OptionICC] == "false"
}

// ensureNetwork returns the id of the engines' isolated bridge network,
// creating it when missing. Docker (API < 1.44) lets two networks share a
// name, so concurrent creators (several worker processes at first boot)
// may all succeed: every caller waits until the winner is settled, picks
// the same one (oldest, then lowest id) and removes the unused losers.
// Containers join by id, never by the (possibly ambiguous) name. The
// settled id is remembered, so only the first call after a network appears
// pays the wait.
//
// A network of the configured name that lets containers reach each other
// (inter-container communication on, made by an older version or by hand)
// is never used: it is removed when it is this node's and nothing uses it,
// and otherwise reported while engines go on "<name>_isolated"; the
// containers still on it move as they are recreated (Ensure replaces a
// container on another network, and reconcile recreates running ones:
// RuntimeInfo.Unisolated).
func (b *Backend) ensureNetwork(ctx context.Context) (string, error) {
	b.netMu.Lock()
	defer b.netMu.Unlock()

	name, nets, err := b.isolatedNetworks(ctx)
	if err != nil {
		return "", err
	}
	if len(nets) == 0 {
		res, err := b.cli.NetworkCreate(ctx, name, client.NetworkCreateOptions{
			Driver:  "bridge",
			Options: map[string]string{OptionICC: "false"},
			Labels:  b.networkLabels(),
		})
		if err != nil && !cerrdefs.IsConflict(err) {
			return "", fmt.Errorf("create network %s: %w", name, err)
		}
		if res.ID != "" {
			b.log.Info("created network", "network", name, "network_id", shortID(res.ID), "inter_container", false)
		}
		if name, nets, err = b.isolatedNetworks(ctx); err != nil {
			return "", err
		}
		if len(nets) == 0 {
			return "", fmt.Errorf("create network %s: not there right after creation, or not isolated", name)
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
			return "", fmt.Errorf("ensure network %s: %w", name, ctx.Err())
		case <-time.After(wait):
		}
		if name, nets, err = b.isolatedNetworks(ctx); err != nil {
			return "", err
		}
		if len(nets) == 0 {
			return "", fmt.Errorf("ensure network %s: removed while settling", name)
		}
		win = pickNetwork(nets)
	}
	b.removeLosers(ctx, nets, win.ID)
	if b.netID != "" && b.netID != win.ID {
		b.log.Info("engines' network changed", "network", name, "network_id", shortID(win.ID))
	}
	b.netID = win.ID
	return win.ID, nil
}

// forgetNetwork drops the settled network, so the next Ensure looks the
// engines' network up (and creates it) again.
func (b *Backend) forgetNetwork() {
	b.netMu.Lock()
	defer b.netMu.Unlock()
	b.netID = ""
}

// isolatedNetworks returns the name the engines' network has (the
// configured one, or its _isolated sibling while an open network holds the
// configured name) and the isolated networks of that name (several only
// while concurrent creations settle; none when it must be created). Open
// networks of the configured name are retired on the way.
func (b *Backend) isolatedNetworks(ctx context.Context) (string, []network.Summary, error) {
	// docker's name filter matches substrings: it lists the sibling too.
	res, err := b.cli.NetworkList(ctx, client.NetworkListOptions{
		Filters: make(client.Filters).Add("name", b.cfg.Network),
	})
	if err != nil {
		return "", nil, fmt.Errorf("list networks: %w", err)
	}
	sibling := b.cfg.Network + IsolatedSuffix
	var own, open, sib []network.Summary
	for _, n := range res.Items {
		switch {
		case n.Name == b.cfg.Network && isolated(n):
			own = append(own, n)
		case n.Name == b.cfg.Network:
			open = append(open, n)
		case n.Name == sibling && isolated(n):
			sib = append(sib, n)
		case n.Name == sibling:
			return "", nil, fmt.Errorf("networks %s and %s both let containers reach each other: engines need one that does not (remove %s, or set ORCH_ENGINE_NETWORK to a free name)",
				b.cfg.Network, sibling, sibling)
		}
	}
	inUse := false
	if len(open) > 0 {
		inUse = b.retireOpenCached(ctx, open)
	}
	switch {
	case len(own) > 0:
		return b.cfg.Network, own, nil
	case len(sib) > 0:
		return sibling, sib, nil
	case inUse:
		return sibling, nil, nil
	}
	return b.cfg.Network, nil, nil
}

// openRecheck is how long the outcome of retireOpen is reused: it lists
// every container of the host, and Ensure asks on every call.
const openRecheck = 30 * time.Second

// retireOpenCached is retireOpen, run at most every openRecheck while the
// same open networks are there (called under netMu).
func (b *Backend) retireOpenCached(ctx context.Context, open []network.Summary) bool {
	ids := make([]string, len(open))
	for i, n := range open {
		ids[i] = n.ID
	}
	slices.Sort(ids)
	key := strings.Join(ids, ",")
	if b.openKey == key && time.Since(b.openAt) < openRecheck {
		return b.openInUse
	}
	b.openInUse = b.retireOpen(ctx, open)
	b.openKey, b.openAt = key, time.Now()
	return b.openInUse
}

// retireOpen deals with networks of the engines' name that let containers
// reach each other: this node's unused ones are removed, the others are
// reported (at most every legacyWarnEvery each). It reports whether one
// is still there.
func (b *Backend) retireOpen(ctx context.Context, open []network.Summary) (stillThere bool) {
	for _, n := range open {
		ours := n.Labels[orchestrator.LabelManaged] == "true" && n.Labels[orchestrator.LabelNode] == b.cfg.Node
		users, err := b.containersOn(ctx, n)
		if err == nil && users == 0 && ours {
			if _, err := b.cli.NetworkRemove(ctx, n.ID, client.NetworkRemoveOptions{}); err == nil || cerrdefs.IsNotFound(err) {
				b.log.Warn("removed the engines' old network: it let engines reach each other", "network", n.Name, "network_id", shortID(n.ID))
				continue
			}
		}
		stillThere = true
		if !b.warnOpen.due(n.ID) {
			continue
		}
		in := -1
		if err == nil {
			in = users
		}
		msg := "network lets engines reach each other: engines move to the isolated network as they are recreated; it is removed once empty"
		if !ours {
			msg = "network lets containers reach each other and is not this node's: engines go on the isolated network; remove it by hand once nothing uses it"
		}
		b.log.Warn(msg, "network", n.Name, "network_id", shortID(n.ID), "containers", in,
			"isolated_network", b.cfg.Network+IsolatedSuffix)
	}
	return stillThere
}

// containersOn counts the containers, in any state, attached to n. The
// daemon's network filter misses created and stopped containers, and
// removing a network under one of those would leave it unable to start.
func (b *Backend) containersOn(ctx context.Context, n network.Summary) (int, error) {
	res, err := b.cli.ContainerList(ctx, client.ContainerListOptions{All: true})
	if err != nil {
		return 0, fmt.Errorf("list containers: %w", err)
	}
	count := 0
	for _, c := range res.Items {
		on := c.HostConfig.NetworkMode == n.ID || c.HostConfig.NetworkMode == n.Name
		if c.NetworkSettings != nil {
			for name, ep := range c.NetworkSettings.Networks {
				on = on || name == n.Name || (ep != nil && ep.NetworkID == n.ID)
			}
		}
		if on {
			count++
		}
	}
	return count, nil
}

// removeLosers removes this node's duplicate networks other than the
// winner. One that containers still use stays (they joined it by id and
// keep working); networks someone else labelled are never touched.
func (b *Backend) removeLosers(ctx context.Context, nets []network.Summary, winID string) {
	for _, n := range nets {
		if n.ID == winID || n.Labels[orchestrator.LabelManaged] != "true" || n.Labels[orchestrator.LabelNode] != b.cfg.Node {
			continue
		}
		b.log.Info("removing duplicate network", "network", n.Name, "network_id", shortID(n.ID))
		if _, err := b.cli.NetworkRemove(ctx, n.ID, client.NetworkRemoveOptions{}); err != nil && !cerrdefs.IsNotFound(err) {
			b.log.Warn("remove duplicate network", "network_id", shortID(n.ID), "error", err)
		}
	}
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

// isolation tells, for a List, which networks are isolated, by id and by
// name (one network listing, however many containers). A name two
// networks share is left out: only their ids tell them apart.
func (b *Backend) isolation(ctx context.Context) (networkIsolation, error) {
	res, err := b.cli.NetworkList(ctx, client.NetworkListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list networks: %w", err)
	}
	out := make(networkIsolation, 2*len(res.Items))
	names := map[string]int{}
	for _, n := range res.Items {
		out[n.ID] = isolated(n)
		names[n.Name]++
	}
	for _, n := range res.Items {
		if names[n.Name] == 1 {
			out[n.Name] = isolated(n)
		}
	}
	return out, nil
}

// networkIsolation maps network ids and names to whether the network is
// isolated.
type networkIsolation map[string]bool

// unisolated reports whether c is attached to a network known to let
// containers reach each other. A container that was never started names
// its network only in its host config; a started one in its endpoints.
func (m networkIsolation) unisolated(c container.Summary) bool {
	refs := []string{c.HostConfig.NetworkMode}
	if c.NetworkSettings != nil {
		for name, ep := range c.NetworkSettings.Networks {
			refs = append(refs, name)
			if ep != nil {
				refs = append(refs, ep.NetworkID)
			}
		}
	}
	for _, r := range refs {
		if iso, known := m[r]; known && !iso {
			return true
		}
	}
	return false
}

// rateGate lets one event per key through every period.
type rateGate struct {
	mu     sync.Mutex
	period time.Duration
	last   map[string]time.Time
}

func (g *rateGate) due(key string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.last == nil {
		g.last = map[string]time.Time{}
	}
	if t, ok := g.last[key]; ok && time.Since(t) < g.period {
		return false
	}
	g.last[key] = time.Now()
	return true
}
