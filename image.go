package orchestrator

import (
	"fmt"
	"strings"
)

// Images is the set of images a product may ask for as engine_version
// (provision, upgrade). engine_version is the product's to choose,
// but an engine runs with the operator's passthrough environment (provider
// keys), so a tenant must not be able to run an image of its own choosing:
// only the operator's repositories are allowed.
type Images struct {
	repos []string // any tag or digest of these
	exact []string // exactly these references
	any   bool
}

// ParseImages reads ORCH_ENGINE_IMAGE_ALLOWLIST: comma-separated entries,
// each a repository ("registry.example.com/team/engine": any tag or digest
// of it), an exact reference with a tag or digest, or "*" (any image:
// only for fleets where every product is trusted). The default image is
// always allowed; an empty list allows its repository.
func ParseImages(defaultImage, list string) (Images, error) {
	var im Images
	for _, e := range strings.Split(list, ",") {
		e = strings.TrimSpace(e)
		switch {
		case e == "":
		case e == "*":
			im.any = true
		case strings.ContainsAny(e, " \t*"):
			return Images{}, fmt.Errorf("%q is not an image reference or repository", e)
		case hasTagOrDigest(e) || strings.HasPrefix(e, "/"):
			im.exact = append(im.exact, e)
		default:
			im.repos = append(im.repos, e)
		}
	}
	if defaultImage != "" {
		im.exact = append(im.exact, defaultImage)
		if len(im.repos) == 0 && !im.any && strings.TrimSpace(list) == "" {
			im.repos = append(im.repos, Repository(defaultImage))
		}
	}
	return im, nil
}

// Allows reports whether ref may be run as an engine.
func (im Images) Allows(ref string) bool {
	if im.any {
		return true
	}
	for _, e := range im.exact {
		if ref == e {
			return true
		}
	}
	if !hasTagOrDigest(ref) {
		return false // a bare repository means :latest, never pinned
	}
	for _, r := range im.repos {
		if Repository(ref) == r {
			return true
		}
	}
	return false
}

// Repository strips the tag and digest from an image reference
// ("host:5000/team/engine:1.2@sha256:…" → "host:5000/team/engine").
func Repository(ref string) string {
	if i := strings.Index(ref, "@"); i >= 0 {
		ref = ref[:i]
	}
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		ref = ref[:i]
	}
	return ref
}

func hasTagOrDigest(ref string) bool { return Repository(ref) != ref }
